"""Packs: one object per video per map group (an uncompressed, byte-reproducible tar whose first member is a
JSON head), and packed references ``<pack>#<member>@<offset>+<size>`` that read one member of a pack with one
ranged read and know its size without a request.

A map group writes each video's files (clips, crops, embeddings) and its rows as one pack instead of one
object per file: at Panda-70M size that is ~6 objects per video instead of ~10 per clip. The next group
downloads the pack once and unpacks the members it needs into its scratch folder; the shard writer reads a
committed clip or crop straight out of its pack."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import tempfile

from curation.storage import Store, atomic_local, call_with_retry, is_transient

HEAD = "_head.json"  # the pack's first member: the group's record of the video (rows, earlier packs)
_REF = re.compile(r"^(?P<pack>[^#]+)#(?P<member>[^#@]+)@(?P<offset>\d+)\+(?P<size>\d+)$")
_MTIME, _MODE, _OWNER = 0, 0o444, "phantom"


def ref_of(pack: str, member: str, offset: int, size: int) -> str:
    return f"{pack}#{member}@{int(offset)}+{int(size)}"


def parse_ref(ref: str) -> tuple[str, str, int, int] | None:
    """(pack, member, offset, size) of a packed reference; None for a plain relative path."""
    m = _REF.match(ref) if "#" in ref else None
    if m is None:
        return None
    return m["pack"], m["member"], int(m["offset"]), int(m["size"])


def member_rel(ref: str) -> str:
    """The relative path a reference names: the member of a packed one, else the path itself."""
    p = parse_ref(ref)
    return p[1] if p else ref


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, _MTIME, _MODE
    ti.uname = ti.gname = _OWNER
    return ti


def build_pack(path: str, head: dict, files: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Write the pack to the local ``path``: ``head`` (JSON, sorted keys) first, then each member (name ->
    local file) in sorted order, with fixed mtime, mode and owner (the same inputs give the same bytes).
    Returns member -> (offset of its data, size)."""
    for name in files:
        if "#" in name or "@" in name or name == HEAD:
            raise ValueError(f"cannot pack {name!r}: '#', '@' and {HEAD!r} are reserved in pack members")
    data = json.dumps(head, sort_keys=True).encode()
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_tarinfo(HEAD, len(data)), io.BytesIO(data))
        for name in sorted(files):
            with open(files[name], "rb") as src:
                tf.addfile(_tarinfo(name, os.fstat(src.fileno()).st_size), src)
    return members_of(path)


def members_of(path_or_file) -> dict[str, tuple[int, int]]:
    """member -> (data offset, size) of a local pack (a path or an open binary file; its head left out)."""
    args = {"name": path_or_file} if isinstance(path_or_file, str) else {"fileobj": path_or_file}
    with tarfile.open(mode="r:", **args) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isfile() and m.name != HEAD}


def write_pack(store: Store, rel: str, head: dict, files: dict[str, str], scratch: str) -> dict[str, str]:
    """Build the pack in ``scratch`` and put it at ``rel`` in ``store`` (one object, written atomically);
    returns member -> packed reference."""
    os.makedirs(scratch, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=scratch, prefix=".pack-", suffix=".tar.tmp")
    os.close(fd)
    try:
        where = build_pack(tmp, head, files)
        store.put_file(rel, tmp)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return {name: ref_of(rel, name, off, size) for name, (off, size) in where.items()}


def read_head(store: Store, rel: str) -> dict | None:
    """The head of the pack at ``rel`` (a few ranged reads, not the whole object); None when it is missing
    or is not a pack (a torn or foreign object)."""

    def read() -> dict | None:
        with store.fs.open_input_file(store.path(rel)) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            first = tf.next()
            if first is None or first.name != HEAD:
                return None
            return json.loads(tf.extractfile(first).read())

    try:
        return call_with_retry(read, what=f"{store!r}.read_head({rel!r})")
    except FileNotFoundError:
        return None
    except (tarfile.TarError, ValueError, OSError) as e:
        if is_transient(e):  # the store is down past its retries: not the same as a missing pack
            raise
        return None


def unpack(store: Store, pack: str, members: set[str] | None, root: str) -> dict[str, str]:
    """Download the pack once and copy ``members`` (all when None) to ``root``/<member> (each written
    atomically: ``storage.atomic_local``); the downloaded copy is deleted after (a pack is read once per
    group). Returns member -> packed reference of every member."""
    out: dict[str, str] = {}
    # pinned while it is opened: the cache's cap cannot evict it first
    with store.local_path_ctx(pack) as local, open(local, "rb") as src:
        if not store.is_local:
            os.unlink(local)  # the open file stays readable; no other worker reads this video's pack now
        where = members_of(src)
        for name, (off, size) in sorted(where.items()):
            out[name] = ref_of(pack, name, off, size)
            if members is not None and name not in members:
                continue
            parts = name.split("/")
            if name.startswith("/") or ".." in parts:
                raise ValueError(f"pack {pack!r} has a member outside its folder: {name!r}")
            dest = os.path.join(root, name)
            if os.path.exists(dest):
                continue
            src.seek(off)
            atomic_local(dest, lambda f, n=size: _copy_n(src, f, n))
    return out


def _copy_n(src, dst, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 1 << 20))
        if not chunk:
            raise OSError("pack ends before its member does")
        dst.write(chunk)
        n -= len(chunk)


def ref_size(store: Store, ref: str) -> int:
    """The size of what ``ref`` names: from the reference itself when packed (no request), else the file's."""
    p = parse_ref(ref)
    if p is not None:
        return p[3]
    from pyarrow import fs

    info = store.fs.get_file_info(store.path(ref))
    if info.type != fs.FileType.File:
        raise FileNotFoundError(f"missing {ref}")
    return int(info.size)


def read_ref(store: Store, ref: str) -> bytes:
    """The bytes ``ref`` names: one ranged read of its pack when packed, else the whole file."""
    p = parse_ref(ref)
    if p is None:
        return store.read_bytes(ref)
    pack, member, off, size = p

    def read() -> bytes:
        with store.fs.open_input_file(store.path(pack)) as f:
            return bytes(f.read_at(size, off))

    data = call_with_retry(read, what=f"{store!r}.read_ref({ref!r})")
    if len(data) != size:
        raise OSError(f"{store.uri_of(pack)} ends before its member {member!r} does")
    return data

