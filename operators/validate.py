"""Row validation: the first step after reading. Nothing is dropped here; bad rows are marked.

Needs the id and text columns; adds ``_reject``: "" for a valid row, else the reason. Every later stage passes
marked rows through untouched and the sink writes them to ``_rejects/``, so rows in = rows out + rows rejected.

Duplicate ids are found across the whole run by ``IdRegistry`` actors, each owning a hash partition of the ids:
the first row to claim an id is kept, later ones are rejected as ``id_duplicate``. A claim carries the claiming
row's identity (source file, the batch's ids, position in the batch), so when Ray retries a batch after a worker
died, its rows claim their ids again as the same owner and stay valid instead of being rejected as duplicates of
themselves. Each id costs ~150 bytes of actor memory (two 16-byte digests in a dict): ~15 GB per 100M rows, spread
over the shards, so at billion-row scale run enough shards over the cluster, or turn the check off
(``dedupe_ids: false``) when ids are known unique.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

REJECT_COLUMN = "_reject"
REASONS = (
    "id_null",
    "id_duplicate",
    "text_null",
    "text_not_string",
    "text_empty",
    "column_missing:<name>",
    "embedding_not_finite",
)


@dataclass(frozen=True, kw_only=True)
class ValidateConfig:
    id_column: str = "id"
    text_column: str = "text"
    dedupe_ids: bool = True
    id_shards: int = 4
    source_column: str | None = None  # the reader's file-path column; used for claim owners, then dropped

    def __post_init__(self):
        if self.id_shards < 1:
            raise ValueError(f"id_shards must be >= 1, got {self.id_shards}")
        if self.id_column == self.text_column:
            raise ValueError(f"id and text columns must differ, both are {self.id_column!r}")


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
    """One shard of the run's id set. Claims are atomic per call (an actor runs one call at a time)."""

    def __init__(self):
        self.owner: dict[bytes, bytes] = {}

    def claim(self, keys: list[bytes], owners: list[bytes]) -> np.ndarray:
        """True where the row owns its id: it claimed it first, or it is the same row claiming again (a retry)."""
        first = np.zeros(len(keys), dtype=bool)
        for i, (k, o) in enumerate(zip(keys, owners)):
            first[i] = self.owner.setdefault(k, o) == o
        return first

    def size(self) -> int:
        return len(self.owner)


def row_owners(keys: list[bytes], sources: list[str]) -> list[bytes]:
    """Identity of each row of a batch: its source, the digest of the batch's ids, and its position in the batch.

    Deterministic for a re-read of the same block (a Ray retry), different for the same ids at another place.
    """
    batch = hashlib.blake2b(b"".join(keys), digest_size=16).digest()
    return [hashlib.blake2b(src.encode() + batch + i.to_bytes(8, "little"), digest_size=16).digest()
            for i, src in enumerate(sources)]  # fmt: skip


def validate_rows(
    batch: dict[str, np.ndarray], *, cfg: ValidateConfig, registry: list | None
) -> dict[str, np.ndarray]:
    """Mark invalid rows in ``_reject``. With a registry (list of IdRegistry handles), also mark duplicate ids."""
    n = len(next(iter(batch.values()))) if batch else 0
    missing = [c for c in (cfg.id_column, cfg.text_column) if c not in batch]
    if missing:
        # The driver checked the first file's schema; a later file without the column must not crash the run.
        reasons = np.full(n, f"column_missing:{missing[0]}", dtype=object)
        ids = None
    else:
        reasons = reject_reasons(batch[cfg.id_column], batch[cfg.text_column])
        ids = batch[cfg.id_column]
    if registry:
        import ray

        valid = np.flatnonzero(reasons == "")
        keys = [id_key(ids[i].item() if isinstance(ids[i], np.generic) else ids[i]) for i in valid]
        sources = batch.get(cfg.source_column) if cfg.source_column else None
        owners = row_owners(keys, [str(sources[i]) if sources is not None else "" for i in valid])
        shard_of = np.array([k[0] % len(registry) for k in keys], dtype=np.int64)
        refs, members = [], []
        for s, handle in enumerate(registry):
            sel = np.flatnonzero(shard_of == s)
            if len(sel):
                refs.append(handle.claim.remote([keys[j] for j in sel], [owners[j] for j in sel]))
                members.append(sel)
        for sel, first in zip(members, ray.get(refs)):
            reasons[valid[sel[~first]]] = "id_duplicate"
    batch[REJECT_COLUMN] = reasons
    if cfg.source_column:
        batch.pop(cfg.source_column, None)
    return batch
