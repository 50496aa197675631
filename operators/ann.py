"""ShardSearcher: one shard of a faiss inner-product index, held by a Ray actor.

The corpus is split into shards of at most ``shard_rows`` vectors (sized to an actor's memory: 4 bytes x dim per
vector for Flat/HNSW, ~``pq_m`` bytes for IVF-PQ), each held by one actor, so the index can exceed one node. Every
query batch fans out to all shards; each returns its exact (for that index type) top-k and
``negatives.merge_topk`` merges them exactly. Ids are the corpus rows' global int64 positions (``IndexIDMap2``).

Index types: ``flat`` (exact inner product, the default), ``ivf`` (IVF-Flat), ``ivfpq`` (IVF-PQ) trained on a
sample, and ``hnsw``. Vectors are L2-normalised embeddings, so inner product is cosine. Indexes serialise to bytes
(``faiss.serialize_index``) so they can be saved to and loaded from object storage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    dim: int
    index_type: str = "flat"
    shard_rows: int = 5_000_000  # vectors per shard actor: ~7.7 GB of float32 at 384-d
    nlist: int | None = None  # IVF lists; default ~4 * sqrt(rows per shard)
    nprobe: int = 32
    pq_m: int = 16  # IVF-PQ sub-quantizers (bytes per vector)
    hnsw_m: int = 32
    # HNSW build/search breadth. Measured on 25k clustered 64-d vectors (tests/test_ann.py): recall@10 0.61 at faiss's
    # default efConstruction 40 / efSearch 128, 0.95 at 200 / 128, 0.9995 at 200 / 512.
    ef_construction: int = 200
    ef_search: int = 256
    train_rows: int = 100_000  # IVF training sample per shard
    threads: int | None = None  # faiss OpenMP threads per actor; default: faiss's own

    def __post_init__(self):
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        if self.dim < 1 or self.shard_rows < 1 or self.nprobe < 1 or self.ef_search < 1:
            raise ValueError("dim, shard_rows, nprobe and ef_search must be >= 1")
        if self.index_type == "ivfpq" and self.dim % self.pq_m:
            raise ValueError(f"pq_m ({self.pq_m}) must divide the vector dimension ({self.dim})")

    def needs_training(self) -> bool:
        return self.index_type in ("ivf", "ivfpq")

    def lists_for(self, rows: int) -> int:
        return self.nlist or max(1, min(65536, int(4 * math.sqrt(max(rows, 1)))))

    def factory(self, rows: int) -> str:
        if self.index_type == "flat":
            return "Flat"
        if self.index_type == "hnsw":
            return f"HNSW{self.hnsw_m},Flat"
        nlist = self.lists_for(rows)
        return f"IVF{nlist},Flat" if self.index_type == "ivf" else f"IVF{nlist},PQ{self.pq_m}"


def shard_count(rows: int, cfg: IndexConfig) -> int:
    return max(1, math.ceil(rows / cfg.shard_rows))


class ShardSearcher:
    """One index shard. ``train`` (IVF only) -> ``add`` batches -> ``search``; or ``load`` a serialised one."""

    def __init__(self, cfg: IndexConfig, expected_rows: int):
        import faiss

        self.faiss, self.cfg = faiss, cfg
        if cfg.threads:
            faiss.omp_set_num_threads(cfg.threads)
        base = faiss.index_factory(cfg.dim, cfg.factory(expected_rows), faiss.METRIC_INNER_PRODUCT)
        if hasattr(base, "hnsw"):
            base.hnsw.efConstruction = cfg.ef_construction  # before any add
        self.index = faiss.IndexIDMap2(base)
        self._tune()

    def _tune(self) -> None:
        base = self.faiss.downcast_index(self.index.index)
        if hasattr(base, "nprobe"):
            base.nprobe = self.cfg.nprobe
        if hasattr(base, "hnsw"):
            base.hnsw.efSearch = self.cfg.ef_search

    def train(self, sample: np.ndarray) -> None:
        """sample: [n, dim] float32, a random sample of this shard's vectors (IVF only)."""
        if not self.index.is_trained:
            self.index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> int:
        """vectors: [n, dim] float32, ids: [n] int64 global corpus positions. Returns the shard's size."""
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: [q, dim] -> scores, ids [q, k] (ids -1 where the shard has fewer than k vectors)."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def size(self) -> int:
        return self.index.ntotal

    def serialize(self) -> bytes:
        return self.faiss.serialize_index(self.index).tobytes()

    def load(self, data: bytes) -> int:
        self.index = self.faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        self._tune()
        return self.index.ntotal
