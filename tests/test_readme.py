"""The README states what is true: the shard and index names it documents are the ones written, and every
module path it names exists."""

from __future__ import annotations

import re
from pathlib import Path

from curation.global_phase.write import shard_name
from curation.image_pairs import shard_name as image_pair_shard_name
from curation.shards import INDEX_FILE

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_documented_shard_and_index_names_are_the_written_ones():
    assert "shard-PPPPP-SSSSSS.tar" in README and "shard-<partition>-<seq>.tar" in README
    for name in (shard_name(3, 17), image_pair_shard_name(3, 17)):
        assert re.fullmatch(r"shard-\d{5}-\d{6}\.tar", name), name
    assert INDEX_FILE == ".index.json" and "`.index.json`" in README
    assert "index.json`" not in README.replace("`.index.json`", "")  # no bare index.json left


def test_every_module_path_the_readme_names_exists():
    root = Path(__file__).resolve().parents[1]
    named = set(re.findall(r"`((?:curation|training|model|bench|configs)/[\w./{},-]+)`", README))
    assert named
    missing = []
    for path in named:
        m = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", path)
        for p in [m.group(1) + x + m.group(3) for x in m.group(2).split(",")] if m else [path]:
            if "*" not in p and not (root / p).exists():
                missing.append(p)
    assert not missing, missing
