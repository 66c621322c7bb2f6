"""Step 7 of the global phase: publish a result atomically. Shards are written under their ``global_hash``,
never over the published ones; one small pointer, written last, makes the new result the one readers see,
so a reader sees the old result or the new one, never a mix.

Layout (``sub``: ``shards_subdir`` / ``eval_subdir``; ``gh``: the global hash):

    global/results/<gh>/<sub>/.index.json, .records/   the result's index and its per-shard records
    local store:   global/results/<gh>/<sub>/shard-*.tar   the tars beside them: one plain shards folder
                   <sub> -> global/results/<gh>/<sub>      the pointer: a relative symlink, swapped by rename
    object store:  <sub>/<gh>/shard-*.tar                  under <sub>: read_webdataset(<sub>) finds them
                   <sub>/.index.json                       the pointer: the result's index, names "<gh>/..."
    global/current.json                                    {global_hash, previous, folders}: for tools

Readers need nothing new: ``list_shards`` / ``read_index`` / ``curation.inspect`` on ``<out>/<sub>`` go
through the symlink (the OS follows it once, when the folder is resolved) or read the one index object (one
GET). The previous result is kept, so a reader that listed it just before a publish can finish reading it;
older ones are deleted."""

from __future__ import annotations

import os

from curation.shards import INDEX_FILE
from curation.storage import Store

RESULTS = "global/results"
POINTER = "global/current.json"


def result_dirs(store: Store, sub: str, global_hash: str) -> dict[str, str]:
    """Where one result's shards (``tars``) and its index and records (``meta``) go, relative to the store."""
    meta = f"{RESULTS}/{global_hash}/{sub}"
    return {"tars": meta if store.is_local else f"{sub}/{global_hash}", "meta": meta}


def current(store: Store) -> dict | None:
    """The published pointer (``global/current.json``), or None before the first publish."""
    return store.read_json(POINTER)


def publish(store: Store, global_hash: str, indexes: dict[str, dict]) -> None:
    """Make ``global_hash`` the published result: per folder ``sub`` its pointer (symlink or index object),
    then ``global/current.json`` last; then delete every result but this one and the previous one."""
    prev = current(store) or {}
    folders = {}
    for sub, index in indexes.items():
        dirs = result_dirs(store, sub, global_hash)
        store.write_json(f"{dirs['meta']}/{INDEX_FILE}", index, indent=1)
        if store.is_local:
            _swap_link(store, sub, dirs["meta"])
        else:
            names = [{**e, "name": f"{global_hash}/{e['name']}"} for e in index["shards"]]
            pointer = {**index, "folder": global_hash, "shards": names}
            store.write_json(f"{sub}/{INDEX_FILE}", pointer, indent=1)
        folders[sub] = dirs["tars"]
    previous = prev.get("global_hash") if prev.get("global_hash") != global_hash else prev.get("previous")
    pointer = {"global_hash": global_hash, "previous": previous, "folders": folders}
    store.write_json(POINTER, pointer, indent=1)
    _collect(store, keep={global_hash, previous}, subs=list(indexes))


def _swap_link(store: Store, sub: str, target_rel: str) -> None:
    """Point the folder ``sub`` at ``target_rel`` with one rename (atomic on POSIX). A real folder left there
    by a writer before results were hash-keyed is moved under global/results/legacy-<sub> first (once)."""
    link = store.path(sub)
    os.makedirs(os.path.dirname(link) or ".", exist_ok=True)
    if os.path.isdir(link) and not os.path.islink(link):
        legacy = store.path(f"{RESULTS}/legacy-{sub}")
        store.delete_dir(f"{RESULTS}/legacy-{sub}")
        os.makedirs(os.path.dirname(legacy), exist_ok=True)
        os.replace(link, legacy)
    target = os.path.relpath(store.path(target_rel), os.path.dirname(link))
    tmp = f"{link}.link-{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _collect(store: Store, keep: set, subs: list[str]) -> None:
    """Delete the results not in ``keep`` (their index, records and tars)."""
    for gh in store.subdirs(RESULTS):
        if gh in keep or gh.startswith("legacy-"):
            continue
        store.delete_dir(f"{RESULTS}/{gh}")
        if not store.is_local:
            for sub in subs:
                store.delete_dir(f"{sub}/{gh}")
