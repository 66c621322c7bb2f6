"""The `sample` source: reads an already-built bundled sample folder (its Panda-70M CSV and videos)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

BUILD_HINT = "python -m curation.demo.footage"  # what builds the folder (`make curate` does it first)


@dataclasses.dataclass(frozen=True)
class SamplePaths:
    """The layout of a built sample folder, shared by its builder (curation.demo.footage) and this reader."""

    root: str
    csv: str
    videos_dir: str
    ground_truth: str

    @property
    def stamp(self) -> str:
        """STAMP.json, written last by the builder: present only when the build finished."""
        return os.path.join(self.root, "STAMP.json")


def sample_paths(sample_dir: str | os.PathLike) -> SamplePaths:
    root = os.path.abspath(sample_dir)
    return SamplePaths(
        root=root,
        csv=os.path.join(root, "panda70m.csv"),
        videos_dir=os.path.join(root, "videos"),
        ground_truth=os.path.join(root, "ground_truth.json"),
    )


def iter_sample(sample_dir: str | os.PathLike, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """One record per video of the built sample under ``sample_dir``, read like any Panda-70M CSV.
    Raises FileNotFoundError at once, saying how to build it, when the folder holds no finished build."""
    from curation.sources.panda70m import iter_panda_csv

    paths = sample_paths(sample_dir)
    if not (os.path.isfile(paths.stamp) and os.path.isfile(paths.csv) and os.path.isdir(paths.videos_dir)):
        raise FileNotFoundError(
            f"source sample: {paths.root} holds no built sample (no STAMP.json, panda70m.csv or videos/); "
            f"build it with `{BUILD_HINT} {sample_dir}` (`python -m curation.run` builds it first)"
        )
    return iter_panda_csv(paths.csv, paths.videos_dir, source="sample", limit=limit)
