"""Texts by id, for ID-keyed inputs (what mining writes): ``query_id, pos_ids, neg_ids`` rows whose texts live in a
queries table and a corpus.

``TextStore`` actors each hold a hash partition of one table's ``id -> text`` (loaded by parallel read tasks, one per
file); ``resolve_texts`` replaces a batch's ids by their texts with one round trip per shard. Chosen over a Ray Data
join (explode the candidate lists, hash-join twice, group back by query) because every row keeps its candidate
order and block boundaries without a shuffle, and each text crosses the network once per use. It costs the texts'
size plus ~100 bytes per id of actor memory, spread over the shards (and the cluster): ~60 GB for 100M passages of
~500 characters, so give it enough shards, or join ahead of time for corpora far past that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from operators.io import InputFiles, read_file
from operators.validate import REJECT_COLUMN, id_key, shard_keys


class TextStore:
    """One shard of an id -> text map. The first text stored under an id wins (duplicate ids in a corpus)."""

    def __init__(self):
        self.texts: dict[bytes, str] = {}
        self.longest = 0  # the longest list stored by put_union

    def put(self, keys: list[bytes], texts: list) -> int:
        for k, t in zip(keys, texts):
            self.texts.setdefault(k, t)
        return len(keys)

    def put_union(self, keys: list[bytes], lists: list) -> int:
        """Store the union of id lists under each key (positives of queries that share a text)."""
        for k, items in zip(keys, lists):
            current = self.texts.setdefault(k, [])
            current.extend(x for x in items if x not in current)
            self.longest = max(self.longest, len(current))
        return len(keys)

    def longest_list(self) -> int:
        return self.longest

    def get(self, keys: list[bytes]) -> list:
        return [self.texts.get(k) for k in keys]

    def size(self) -> int:
        return len(self.texts)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def load_file(
    inp: InputFiles, path: str, id_column: str, text_column: str, stores: list, key_of=None, union: bool = False
) -> int:
    """Read one file of a table into the store shards (a Ray task). Returns rows stored.

    ``key_of`` maps a key column value to the lookup key (default: the id itself); ``union`` stores the union of
    list values under a key instead of the first value."""
    import ray

    n = 0
    for table in read_file(inp, path, columns=[id_column, text_column], id_column=None, skip=None,
                           ledger_fs=None, ledger_root=None):  # fmt: skip
        ids, values = table.column(id_column).to_pylist(), table.column(text_column).to_pylist()
        ok = (lambda v: isinstance(v, list)) if union else (lambda v: isinstance(v, str))
        keep = [i for i, (x, v) in enumerate(zip(ids, values)) if x is not None and ok(v)]
        keys = [id_key(key_of(ids[i]) if key_of else ids[i]) for i in keep]
        method = "put_union" if union else "put"
        ray.get([getattr(stores[s], method).remote([keys[j] for j in sel], [values[keep[j]] for j in sel])
                 for s, sel in shard_keys(keys, len(stores))])  # fmt: skip
        n += len(keys)
    return n


# Input bytes per TextStore shard: on-disk text grows ~2-3x in memory as Python strings, so ~2-3 GB per shard.
BYTES_PER_STORE_SHARD = 2**30
MAX_STORE_SHARDS = 64


def store_shards_for(total_bytes: int | None) -> int:
    """TextStore shards for a table of ``total_bytes`` (None: unknown, the most). Each shard is an actor, a worker
    process that costs a second or two to start, so a small table gets one."""
    if total_bytes is None:
        return MAX_STORE_SHARDS
    return max(1, min(MAX_STORE_SHARDS, -(-total_bytes // BYTES_PER_STORE_SHARD)))


def build_store(
    inp: InputFiles,
    *,
    id_column: str,
    text_column: str,
    shards: int | None,
    num_cpus: float,
    key_of=None,
    union=False,
) -> list:
    """Start ``shards`` TextStore actors (None: ``store_shards_for`` the table) and fill them from every file of
    ``inp`` in parallel."""
    import ray

    shards = shards or store_shards_for(inp.total_bytes)
    stores = [ray.remote(num_cpus=0)(TextStore).remote() for _ in range(shards)]
    return fill_store(stores, inp, id_column=id_column, text_column=text_column, num_cpus=num_cpus, key_of=key_of,
                      union=union)  # fmt: skip


def fill_store(stores: list, inp: InputFiles, *, id_column: str, text_column: str, num_cpus: float, key_of=None,
               union=False) -> list:  # fmt: skip
    """Add every file of ``inp`` to existing stores (a second table into the same id -> text map)."""
    import ray

    task = ray.remote(num_cpus=num_cpus)(load_file)
    ray.get([task.remote(inp, f, id_column, text_column, stores, key_of, union) for f in inp.files])
    return stores


def lookup(stores: list, ids: list) -> list:
    """ids -> their texts (None where unknown), in order."""
    import ray

    keys = [id_key(_plain(x)) for x in ids]
    out: list = [None] * len(keys)
    parts = shard_keys(keys, len(stores))
    results = ray.get([stores[s].get.remote([keys[j] for j in sel]) for s, sel in parts])
    for (_, sel), texts in zip(parts, results):
        for j, t in zip(sel, texts):
            out[j] = t
    return out


@dataclass(frozen=True, kw_only=True)
class IdColumns:
    query_id: str = "query_id"
    pos_ids: str = "pos_ids"
    neg_ids: str = "neg_ids"
    query: str = "query"  # the text columns resolve_texts adds
    pos: str = "pos"
    neg: str = "neg"


def resolve_texts(batch: dict[str, np.ndarray], *, cols: IdColumns, queries: list, docs: list) -> dict:
    """Add query/pos/neg texts for ID-keyed rows; a row with an unknown or null id is rejected, naming which."""
    n = len(batch[cols.query_id])
    reasons = batch.get(REJECT_COLUMN, np.full(n, "", dtype=object)).copy()
    q_text = lookup(queries, list(batch[cols.query_id]))
    lists = {}
    for src, dst in ((cols.pos_ids, cols.pos), (cols.neg_ids, cols.neg)):
        values = batch.get(src, np.full(n, None, dtype=object))
        flat, lengths = [], []
        for v in values:
            items = [] if v is None or isinstance(v, (str, bytes)) else list(v)
            flat += items
            lengths.append(len(items))
        texts = lookup(docs, flat) if flat else []
        out = np.empty(n, dtype=object)
        start = 0
        for i, (v, k) in enumerate(zip(values, lengths)):
            out[i] = texts[start : start + k]
            start += k
            if reasons[i]:
                continue
            if isinstance(v, (str, bytes)):
                reasons[i] = f"{src}_not_list"
            elif v is None and src == cols.pos_ids:
                reasons[i] = f"{src}_missing"
            elif any(t is None for t in out[i]):
                reasons[i] = f"{src}_unknown_id"
        lists[dst] = out
    for i, t in enumerate(q_text):
        if not reasons[i] and t is None:
            reasons[i] = f"{cols.query_id}_unknown"
    batch[cols.query] = np.array(q_text, dtype=object)
    batch.update(lists)
    batch[REJECT_COLUMN] = reasons
    return batch
