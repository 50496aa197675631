"""Row validation: the first step after reading. Nothing is dropped here; bad rows are marked.

Needs the id and text columns; adds ``_reject``: "" for a valid row, else the reason. Every later stage passes
marked rows through untouched and the sink writes them to ``_rejects/``, so rows in = rows out + rows rejected.

Duplicate ids are found across the whole run by ``IdRegistry`` actors, each owning a hash partition of the ids:
the first row to claim an id is kept, later ones are rejected as ``id_duplicate``. A claim carries the claiming
row's identity (its input file and row position), so when Ray retries a batch after a worker died, its rows
claim their ids again as the same owner and stay valid instead of being rejected as duplicates of themselves.
On resume the registry is first filled with the ids already committed (``COMMITTED`` owner): the rows still to
do are other rows, so a match there is a true duplicate. Each id costs 24 bytes of actor memory (a 16-byte digest
and an 8-byte owner word in sorted arrays, briefly twice that while two runs merge): 2.4 GB per 100M rows,
spread over the shards, or turn the check off (``dedupe_ids: false``) when ids are known unique. The number of shards
follows the input's size (``id_shards_for``): each shard is an actor, a worker process that costs a second or two to
start, which is most of a small job's time on a small machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from operators.arrow import object_array

REJECT_COLUMN = "_reject"
VALIDATION_REASONS = ("id_null", "id_duplicate", "text_null", "text_not_string", "text_empty", "column_missing:<name>")
REASONS = (*VALIDATION_REASONS, "embedding_not_finite", "teacher_score_not_finite")


@dataclass(frozen=True, kw_only=True)
class ValidateConfig:
    id_column: str = "id"
    text_column: str = "text"
    dedupe_ids: bool = True
    id_shards: int = 4
    source_column: str = "_source"  # the reader's provenance columns: a row's identity for claims
    row_column: str = "_row"

    def __post_init__(self):
        if self.id_shards < 1:
            raise ValueError(f"id_shards must be >= 1, got {self.id_shards}")
        if self.id_column == self.text_column:
            raise ValueError(f"id and text columns must differ, both are {self.id_column!r}")


# Input bytes per registry shard. Text rows take >= ~25 bytes on disk even compressed, so a shard holds at most
# ~20M ids (~0.5 GB at 24 bytes an id, twice that while its two largest runs merge).
BYTES_PER_ID_SHARD = 500 * 2**20
MAX_ID_SHARDS = 64


def id_shards_for(total_bytes: int | None) -> int:
    """Registry shards for an input of ``total_bytes`` (None: unknown, the most shards)."""
    if total_bytes is None:
        return MAX_ID_SHARDS
    return max(1, min(MAX_ID_SHARDS, -(-total_bytes // BYTES_PER_ID_SHARD)))


def _is_null(x) -> bool:
    return x is None or (isinstance(x, float) and np.isnan(x))


def reject_reasons(ids: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """Per-row reason a row cannot be embedded, "" when it can. ids, texts: [N] -> [N] str (object)."""
    out = np.full(len(texts), "", dtype=object)
    for i, (rid, text) in enumerate(zip(ids, texts)):
        if _is_null(rid):
            out[i] = "id_null"
        elif _is_null(text):
            out[i] = "text_null"
        elif not isinstance(text, str):
            out[i] = "text_not_string"
        elif not text.strip():
            out[i] = "text_empty"
    return out


def id_key(rid) -> bytes:
    """A 16-byte digest of an id, typed so 1 and "1" stay distinct ids. Collisions: ~1e-20 at a billion ids."""
    return hashlib.blake2b(f"{type(rid).__name__}:{rid}".encode(), digest_size=16).digest()


class IdRegistry:
    """One shard of the run's id set. Claims are atomic per call (an actor runs one call at a time).

    Held as sorted numpy runs of (key high 64 bits, key low 64 bits, owner 64 bits): 24 bytes an id, against
    ~150 for a dict of digests, and every lookup of a call is one vectorised ``searchsorted`` per run. Written by
    hand because no dependency of this project has an incremental hash set of 128-bit keys in arrays. New ids of a
    call form a run; runs are merged so sizes at least halve from one run to the next (at most ~log2(n) runs).
    """

    def __init__(self):
        self.runs: list[np.ndarray] = []  # each [n, 3] uint64: hi, lo, owner; sorted by (hi, lo)

    def claim(self, keys: list[bytes], owners: list[bytes]) -> np.ndarray:
        """True where the row owns its id: it claimed it first, or it is the same row claiming again (a retry)."""
        return self._claim(_words(keys), _owner_words(owners))

    def preload(self, keys: list[bytes]) -> int:
        """Ids committed by an earlier attempt of the run."""
        self._claim(_words(keys), np.full(len(keys), COMMITTED_WORD, dtype=np.uint64))
        return len(keys)

    def size(self) -> int:
        return sum(len(r) for r in self.runs)

    def _claim(self, words: np.ndarray, owners: np.ndarray) -> np.ndarray:
        n = len(owners)
        holder = np.zeros(n, dtype=np.uint64)  # the owner on record; 0: not recorded before this call
        for run in self.runs:
            holder = np.where(holder == 0, _lookup(run, words), holder)
        new = np.flatnonzero(holder == 0)
        if len(new):
            # Within the call, the first row of each new key claims it (np.unique's index is the first occurrence).
            order = np.lexsort((words[new, 1], words[new, 0]))
            sw = words[new][order]
            first = np.ones(len(new), dtype=bool)
            first[1:] = (sw[1:] != sw[:-1]).any(axis=1)
            group = np.cumsum(first) - 1  # which distinct key each sorted row belongs to
            claimant = new[order][first]  # position in the call of each distinct key's first row
            holder[new[order]] = owners[claimant][group]
            run = np.column_stack([words[claimant, 0], words[claimant, 1], owners[claimant]])
            self._add(run)  # sorted by (hi, lo): claimants came out of the lexsort in key order
        return holder == owners

    def _add(self, run: np.ndarray) -> None:
        self.runs.append(run)
        while len(self.runs) > 1 and 2 * len(self.runs[-1]) >= len(self.runs[-2]):
            merged = np.concatenate([self.runs.pop(), self.runs.pop()])
            self.runs.append(merged[np.lexsort((merged[:, 1], merged[:, 0]))])


def _words(keys: list[bytes]) -> np.ndarray:
    """16-byte digests -> [n, 2] uint64 (high, low word)."""
    return np.frombuffer(b"".join(keys), dtype=">u8").astype(np.uint64).reshape(-1, 2)


def _owner_words(owners: list[bytes]) -> np.ndarray:
    """Owner digests -> their first 8 bytes as uint64, never 0 (no owner) nor COMMITTED_WORD. Two rows claiming the
    same id tell apart unless their 64-bit owner words collide (~5e-20 per pair)."""
    w = np.frombuffer(b"".join(o[:8].ljust(8, b"\0") for o in owners), dtype=">u8").astype(np.uint64)
    return np.where(w < 2, w + 2, w)


def _lookup(run: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The owner recorded in ``run`` for each key in ``words`` [n, 2]; 0 where the run does not hold it."""
    hi = run[:, 0]
    left = np.searchsorted(hi, words[:, 0], side="left")
    right = np.searchsorted(hi, words[:, 0], side="right")
    out = np.zeros(len(words), dtype=np.uint64)
    one = np.flatnonzero(right - left == 1)
    hit = one[run[left[one], 1] == words[one, 1]]
    out[hit] = run[left[hit], 2]
    for i in np.flatnonzero(right - left > 1):  # equal high words (~1e-10 per pair of ids): compare the low words
        same = np.flatnonzero(run[left[i] : right[i], 1] == words[i, 1])
        if len(same):
            out[i] = run[left[i] + same[0], 2]
    return out


COMMITTED = b"\0committed"
COMMITTED_WORD = np.uint64(1)


def claimed_id(reason: str) -> bool:
    """Whether a rejected row had claimed its id: it passed validation and failed later (e.g. non-finite)."""
    return reason not in VALIDATION_REASONS and not reason.startswith("column_missing:")


def shard_keys(keys: list[bytes], shards: int) -> list[tuple[int, np.ndarray]]:
    """(shard, positions in keys) for each registry shard that gets keys; a key's shard is its first byte mod n."""
    shard_of = np.array([k[0] % shards for k in keys], dtype=np.int64)
    return [(s, sel) for s in range(shards) if len(sel := np.flatnonzero(shard_of == s))]


def row_owner(source: str, row: int) -> bytes:
    """Identity of an input row: its file and position. The same on a re-read (a Ray retry or a resume)."""
    return hashlib.blake2b(f"{source}\0{row}".encode(), digest_size=16).digest()


def validate_rows(batch: pa.Table | dict[str, np.ndarray], *, cfg: ValidateConfig, registry: list | None):
    """Mark invalid rows in ``_reject``. With a registry (list of IdRegistry handles), also mark duplicate ids.

    ``batch``: an Arrow table (as Ray hands it with ``batch_format="pyarrow"``), returned as a table with every
    other column untouched; or a dict of numpy arrays, returned as one. Only the columns the checks read are
    converted to numpy: a kept list column (``positive_ids``) converted and back would reach Ray as an object
    array of arrays, which it can only store pickled, and the texts would be copied into Python strings and out.
    """
    if isinstance(batch, pa.Table):
        wanted = (cfg.id_column, cfg.text_column, REJECT_COLUMN, cfg.source_column, cfg.row_column)
        # Ids as Python objects: to_numpy would make an integer column with a null float, and 5 then keys as 5.0.
        cols = {c: object_array(batch.column(c).to_pylist()) if c == cfg.id_column else batch.column(c).to_numpy()
                for c in wanted if c in batch.column_names}  # fmt: skip
        reasons = _reasons(cols, batch.num_rows, cfg=cfg, registry=registry)
        if REJECT_COLUMN in batch.column_names:
            batch = batch.drop_columns([REJECT_COLUMN])
        return batch.append_column(REJECT_COLUMN, pa.array(reasons, type=pa.string()))
    n = len(next(iter(batch.values()))) if batch else 0
    batch[REJECT_COLUMN] = _reasons(batch, n, cfg=cfg, registry=registry)
    return batch


def _reasons(batch: dict[str, np.ndarray], n: int, *, cfg: ValidateConfig, registry: list | None) -> np.ndarray:
    missing = [c for c in (cfg.id_column, cfg.text_column) if c not in batch]
    if missing:
        # The driver checked the first file's schema; a later file without the column must not crash the run.
        reasons = np.full(n, f"column_missing:{missing[0]}", dtype=object)
        ids = None
    else:
        reasons = reject_reasons(batch[cfg.id_column], batch[cfg.text_column])
        ids = batch[cfg.id_column]
    earlier = batch.get(REJECT_COLUMN)  # set by the reader (e.g. a JSONL line that is not valid JSON)
    if earlier is not None:
        reasons = np.where(earlier != "", earlier, reasons).astype(object)
    if registry:
        import ray

        valid = np.flatnonzero(reasons == "")
        keys = [id_key(ids[i].item() if isinstance(ids[i], np.generic) else ids[i]) for i in valid]
        sources, rows = batch[cfg.source_column], batch[cfg.row_column]
        owners = [row_owner(str(sources[i]), int(rows[i])) for i in valid]
        refs, members = [], []
        for s, sel in shard_keys(keys, len(registry)):
            refs.append(registry[s].claim.remote([keys[j] for j in sel], [owners[j] for j in sel]))
            members.append(sel)
        for sel, first in zip(members, ray.get(refs)):
            reasons[valid[sel[~first]]] = "id_duplicate"
    return reasons


@dataclass(frozen=True, kw_only=True)
class TrainingRowsConfig:
    """Columns of KaLM/FlagEmbedding training rows: ``{query, pos: [..], neg: [..], prompt?}``."""

    query_column: str = "query"
    pos_column: str = "pos"
    neg_column: str = "neg"


def _list_problem(value, name: str, *, required: bool) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return f"{name}_missing" if required else ""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        return f"{name}_not_list"
    if required and len(value) == 0:
        return f"{name}_empty"
    for item in value:
        if _is_null(item):
            return f"{name}_text_null"
        if not isinstance(item, str):
            return f"{name}_text_not_string"
        if not item.strip():
            return f"{name}_text_empty"
    return ""


def training_reject_reasons(queries, pos, neg) -> np.ndarray:
    """Per-row reason a training row cannot be scored, "" when it can. neg may be None (no column): no negatives."""
    n = len(queries)
    out = np.full(n, "", dtype=object)
    for i in range(n):
        q = queries[i]
        if _is_null(q):
            out[i] = "query_missing"
        elif not isinstance(q, str):
            out[i] = "query_not_string"
        elif not q.strip():
            out[i] = "query_empty"
        else:
            out[i] = _list_problem(pos[i] if pos is not None else None, "pos", required=True) or (
                _list_problem(neg[i], "neg", required=False) if neg is not None else ""
            )
    return out


def validate_training_rows(batch: dict[str, np.ndarray], *, cfg: TrainingRowsConfig) -> dict[str, np.ndarray]:
    """Mark training rows that cannot be scored in ``_reject``; a reason the reader already set is kept."""
    n = len(next(iter(batch.values()))) if batch else 0
    if cfg.query_column not in batch:
        reasons = np.full(n, "query_missing", dtype=object)
    else:
        queries, pos, neg = batch[cfg.query_column], batch.get(cfg.pos_column), batch.get(cfg.neg_column)
        reasons = training_reject_reasons(queries, pos, neg)
    earlier = batch.get(REJECT_COLUMN)
    if earlier is not None:
        reasons = np.where(earlier != "", earlier, reasons).astype(object)
    batch[REJECT_COLUMN] = reasons
    for col in (cfg.pos_column, cfg.neg_column):
        if col in batch:  # numpy arrays inside an object column would be stored as pickled objects by Ray
            values = np.empty(n, dtype=object)
            values[:] = [v.tolist() if isinstance(v, np.ndarray) else v for v in batch[col]]
            if col == cfg.neg_column:  # a valid row without negatives gets [] (a block of only such rows reads null)
                for i in np.flatnonzero((reasons == "") & np.array([v is None for v in values], dtype=bool)):
                    values[i] = []
            batch[col] = values
    return batch


def typed_table(batch: dict[str, np.ndarray], list_types: dict[str, pa.DataType]) -> pa.Table:
    """A batch as an Arrow table with the list columns typed explicitly. Left to inference, a block whose lists are
    all empty or null becomes list<null>, and blocks of different list types then fail to concatenate."""
    cols = {}
    for name, values in batch.items():
        if name in list_types and pa.types.is_list(list_types[name]):
            cols[name] = pa.array([None if v is None else list(v) for v in values], type=list_types[name])
        elif name in list_types:  # a scalar column typed explicitly (an all-null block would infer null)
            cols[name] = pa.array(list(values), type=list_types[name])
        elif isinstance(values, np.ndarray) and values.dtype != object:
            cols[name] = pa.array(values)
        else:
            cols[name] = pa.array(list(values))
    return pa.table(cols)


def validate_training_table(batch: dict[str, np.ndarray], *, cfg: TrainingRowsConfig) -> pa.Table:
    """``validate_training_rows`` for Ray: returns a table whose pos/neg columns are list<string>."""
    out = validate_training_rows(batch, cfg=cfg)
    return typed_table(out, {c: pa.list_(pa.string()) for c in (cfg.pos_column, cfg.neg_column) if c in out})
