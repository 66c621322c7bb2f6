"""Packs (one object per video per map group) on a real S3 API (moto's server on loopback) and a local
folder: the same inputs give the same bytes, a packed reference reads its member with one ranged read and
knows its size, the head reads without the members, unpacking writes only the members asked for, and bad
names are refused."""

import os

import pytest

from curation.packs import (
    HEAD,
    build_pack,
    member_rel,
    parse_ref,
    read_head,
    read_ref,
    ref_size,
    unpack,
    write_pack,
)
from curation.runner import files_of, with_refs
from curation.storage import Store


def _files(root, n=3):
    out = {}
    for i in range(n):
        rel = f"clips/v{i % 2}/v-{i:04d}.mp4"
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(bytes([i]) * (700 * i + 1))  # sizes across block boundaries
        out[rel] = p
    return out


def test_a_pack_is_byte_reproducible_and_its_refs_read_each_member(tmp_path):
    files = _files(str(tmp_path / "src"))
    a, b = str(tmp_path / "a.tar"), str(tmp_path / "b.tar")
    where_a = build_pack(a, {"rows": [1]}, files)
    os.utime(next(iter(files.values())), (1, 1))  # a file's mtime does not reach the pack
    where_b = build_pack(b, {"rows": [1]}, files)
    assert open(a, "rb").read() == open(b, "rb").read() and where_a == where_b
    assert sorted(where_a) == sorted(files)
    store = Store(str(tmp_path))
    for name, (off, size) in where_a.items():
        ref = f"a.tar#{name}@{off}+{size}"
        assert parse_ref(ref) == ("a.tar", name, off, size) and member_rel(ref) == name
        assert read_ref(store, ref) == open(files[name], "rb").read()
        assert ref_size(store, ref) == os.path.getsize(files[name])
    plain = "clips/v0/v-0000.mp4"
    assert parse_ref(plain) is None and member_rel(plain) == plain


def test_pack_on_s3_head_refs_and_unpack(s3_bucket, tmp_path):
    store = Store(f"{s3_bucket}/run")
    files = _files(str(tmp_path / "src"))
    head = {"source_sig": "abc", "rows": [{"clip_path": "clips/v0/v-0000.mp4"}]}
    refs = write_pack(store, "cache/cut-h/ab/v.tar", head, files, str(tmp_path / "scratch"))
    assert os.listdir(tmp_path / "scratch") == []  # the local build is gone once uploaded
    assert read_head(store, "cache/cut-h/ab/v.tar") == head
    assert read_head(store, "cache/cut-h/ab/missing.tar") is None
    store.write_bytes("not-a-pack.tar", b"hello")
    assert read_head(store, "not-a-pack.tar") is None
    for name, ref in refs.items():
        assert read_ref(store, ref) == open(files[name], "rb").read()
    want = {"clips/v0/v-0000.mp4", "clips/v0/v-0002.mp4"}
    dest = tmp_path / "dest"
    got = unpack(store, "cache/cut-h/ab/v.tar", want, str(dest))
    assert got == refs  # every member's reference, also of those not unpacked
    on_disk = {os.path.relpath(os.path.join(d, n), dest) for d, _, ns in os.walk(dest) for n in ns}
    assert on_disk == want
    for name in want:
        assert (dest / name).read_bytes() == open(files[name], "rb").read()


def test_reserved_and_escaping_member_names_are_refused(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"x")
    for bad in (HEAD, "a#b.jpg", "a@b.jpg"):
        with pytest.raises(ValueError):
            build_pack(str(tmp_path / "p.tar"), {}, {bad: str(p)})
    build_pack(str(tmp_path / "evil.tar"), {}, {"../evil.jpg": str(p)})
    with pytest.raises(ValueError, match="outside"):
        unpack(Store(str(tmp_path)), "evil.tar", None, str(tmp_path / "dest"))
    assert not (tmp_path / "evil.jpg").exists()


def test_committed_rows_name_packed_files_and_nothing_else():
    rows = [{"clip_path": "clips/v/v-0.mp4", "caption": "clips/v/v-0.mp4", "embedding_file": "emb/v/v-0.npy",
             "subjects": [{"crops": [{"path": "refs/v/v-0/s00_r0.jpg", "box": [0, 0, 1, 1]}]}],
             "video_path": "s3://b/videos/v.mp4"}]
    refs = {r: f"cache/p.tar#{r}@512+1" for r in files_of(rows)}
    out = with_refs(rows, refs)
    assert out[0]["clip_path"] == "cache/p.tar#clips/v/v-0.mp4@512+1"
    assert out[0]["caption"] == "clips/v/v-0.mp4"  # not a file key: left alone
    assert out[0]["subjects"][0]["crops"][0]["path"].startswith("cache/p.tar#refs/")
    assert out[0]["video_path"] == "s3://b/videos/v.mp4" and rows[0]["clip_path"] == "clips/v/v-0.mp4"
