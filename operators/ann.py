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
ID_MAP_BYTES = 200  # per vector: a 20-character string id in a Python list and a dict (tracemalloc: 152 bytes)


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

    def bytes_per_vector(self) -> int:
        """Actor memory per indexed vector: the codes (float32, or ``pq_m`` bytes for IVF-PQ); the ids (8 bytes in
        the id map, 8 more in an IVF list and 8 in its direct map); HNSW's links (2M at level 0, +10% for the upper
        levels and offsets); and this shard's corpus-id list and id -> position dict (Python objects,
        ``ID_MAP_BYTES``). Checked against faiss's own serialised size in tests/test_ann.py."""
        code = self.pq_m if self.index_type == "ivfpq" else 4 * self.dim
        ids = 24 if self.needs_training() else 8
        links = int(2 * self.hnsw_m * 4 * 1.1) + 16 if self.index_type == "hnsw" else 0
        return code + ids + links + 8 + ID_MAP_BYTES

    def rows_for_memory(self, gib: float) -> int:
        """The most vectors a shard actor of ``gib`` GiB holds."""
        return max(1, int(gib * 2**30 / self.bytes_per_vector()))

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


SHARD_BITS = 40  # global id = shard << 40 | position in shard: ids stay unique and sortable across shards


class ShardSearcher:
    """One index shard. ``train`` (IVF only) -> ``add`` batches -> ``search``; or ``load`` a serialised one;
    or ``add_parquet`` the embedding files ``kalm embed`` wrote, keeping their row ids. Given ``saved`` (filesystem,
    prefix of a ``save``), it loads that shard as it starts, so an actor Ray restarts holds the same shard again."""

    def __init__(self, cfg: IndexConfig, expected_rows: int, shard: int = 0, saved: tuple | None = None):
        import faiss

        self.faiss, self.cfg, self.shard = faiss, cfg, shard
        self.row_ids: list = []  # corpus ids by position in this shard (add_parquet)
        self.position: dict = {}
        if cfg.threads:
            faiss.omp_set_num_threads(cfg.threads)
        base = faiss.index_factory(cfg.dim, cfg.factory(expected_rows), faiss.METRIC_INNER_PRODUCT)
        if hasattr(base, "hnsw"):
            base.hnsw.efConstruction = cfg.ef_construction  # before any add
        self.index = faiss.IndexIDMap2(base)  # keeps id -> position, so score_ids can reconstruct by id
        self._tune()
        if saved is not None:
            self.load_saved(*saved)

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

    def add_parquet(self, fs, paths: list[str], id_column: str, vector_column: str) -> int:
        """Add the vectors of embedding Parquet files (fixed_size_list columns), streaming one row group at a time.
        IVF shards train on the first ``train_rows`` vectors (files are in corpus order, not sorted by topic)."""
        import pyarrow.parquet as pq

        pending: list[np.ndarray] = []
        for path in paths:
            with fs.open_input_file(path) as f:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=[id_column, vector_column]):
                    col = rb.column(vector_column)
                    vecs = col.values.to_numpy(zero_copy_only=False).reshape(len(rb), col.type.list_size)
                    ids = rb.column(id_column).to_pylist()
                    start = len(self.row_ids)
                    self.row_ids.extend(ids)
                    self.position.update((x, start + i) for i, x in enumerate(ids))
                    positions = np.arange(start, start + len(ids), dtype=np.int64) | (self.shard << SHARD_BITS)
                    if not self.index.is_trained:
                        pending.append((vecs.astype(np.float32), positions))
                        if sum(len(v) for v, _ in pending) < self.cfg.train_rows:
                            continue
                        self.train(np.concatenate([v for v, _ in pending]))
                        for v, p in pending:
                            self.add(v, p)
                        pending = []
                    else:
                        self.add(vecs, positions)
        if pending:  # a shard smaller than train_rows trains on all it has
            self.train(np.concatenate([v for v, _ in pending]))
            for v, p in pending:
                self.add(v, p)
        return self.index.ntotal

    def search_ids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like ``search``, plus the corpus ids of the hits: scores, global ids [q, k], corpus ids [q, k] (object)."""
        scores, gids = self.search(queries, k)
        local = gids & ((1 << SHARD_BITS) - 1)
        names = np.empty(gids.shape, dtype=object)
        for (r, c), g in np.ndenumerate(gids):
            names[r, c] = self.row_ids[local[r, c]] if g >= 0 else None
        return scores, gids, names

    def score_ids(self, queries: np.ndarray, wanted: list[list]) -> list[dict]:
        """Inner product of query i with each corpus id in wanted[i] held by this shard: [{id: score}] per query.
        Reconstructs stored vectors (exact for Flat/HNSW/IVF-Flat, the PQ approximation for IVF-PQ)."""
        base = self.faiss.downcast_index(self.index.index)
        if hasattr(base, "make_direct_map") and base.direct_map.type == 0:
            base.make_direct_map()  # IVF: reconstruct by position needs the direct map (built once, 8 bytes/vector)
        out = []
        for q, ids in zip(np.asarray(queries, dtype=np.float32), wanted):
            found = {x: self.position[x] for x in ids if x in self.position}
            if found:
                gids = np.array(list(found.values()), dtype=np.int64) | (self.shard << SHARD_BITS)
                vecs = np.stack([self.index.reconstruct(int(g)) for g in gids])
                out.append(dict(zip(found, (vecs @ q).tolist())))
            else:
                out.append({})
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: [q, dim] -> scores, ids [q, k] (ids -1 where the shard has fewer than k vectors)."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def size(self) -> int:
        return self.index.ntotal

    def save(self, fs, prefix: str) -> int:
        """Write this shard as ``{prefix}.faiss`` (faiss's own format) and ``{prefix}.ids.parquet`` (corpus id by
        position). The index goes through a local temp file in 64 MB chunks, so saving a large shard does not hold a
        second copy of it in memory (``serialize`` would). Returns the vectors saved."""
        import os
        import tempfile

        import pyarrow as pa
        import pyarrow.parquet as pq

        from operators.storage import with_retries

        def upload():
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "shard.faiss")
                self.faiss.write_index(self.index, local)
                with open(local, "rb") as src, fs.open_output_stream(f"{prefix}.faiss") as dst:
                    while chunk := src.read(64 << 20):
                        dst.write(chunk)
            pq.write_table(pa.table({"id": self.row_ids}), f"{prefix}.ids.parquet", filesystem=fs)

        with_retries(upload, what=f"saving index shard {prefix}")
        return self.index.ntotal

    def load_saved(self, fs, prefix: str) -> int:
        """Load a shard ``save`` wrote (local path or object storage), through a local temp file."""
        import os
        import tempfile

        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "shard.faiss")
            with fs.open_input_stream(f"{prefix}.faiss") as src, open(local, "wb") as dst:
                while chunk := src.read(64 << 20):
                    dst.write(chunk)
            self.index = self.faiss.read_index(local)
        self.row_ids = pq.read_table(f"{prefix}.ids.parquet", filesystem=fs).column("id").to_pylist()
        self.position = {x: i for i, x in enumerate(self.row_ids)}
        if len(self.row_ids) != self.index.ntotal:
            raise ValueError(f"{prefix}: {self.index.ntotal} vectors but {len(self.row_ids)} ids")
        self._tune()
        return self.index.ntotal

    def serialize(self) -> bytes:
        return self.faiss.serialize_index(self.index).tobytes()

    def load(self, data: bytes) -> int:
        self.index = self.faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        self._tune()
        return self.index.ntotal
