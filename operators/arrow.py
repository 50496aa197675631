"""Arrow column helpers for the columns the embedding path hands between stages: token ids as ``list<int32>`` and
vectors as ``fixed_size_list<float>``. Both are one flat buffer plus (for lists) offsets, so Ray stores and ships
them without a Python object per row, and every Parquet reader understands them."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np
import pyarrow as pa


def token_lists(ids: list[list[int]]) -> pa.ListArray:
    """Per-row token ids -> one ``list<int32>`` array: a flat int32 buffer and int32 offsets."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def flat_ids(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A ``list<int32>`` column -> (values [T] int32, offsets [N + 1] int64 from 0), zero-copy where Arrow allows.
    A sliced array (what a batch of a larger block is) keeps its parent's buffers: offsets are rebased here."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = np.asarray(column.offsets, dtype=np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    values = np.asarray(column.values.slice(start, end - start), dtype=np.int32)
    return values, offsets - start


def fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """[N, D] numpy -> fixed_size_list<D> Arrow array (zero copy of the flat buffer)."""
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def vectors(table: pa.Table, column: str) -> np.ndarray:
    """A ``fixed_size_list`` vector column -> [N, D] numpy."""
    col = table.column(column).combine_chunks()
    return np.asarray(col.flatten()).reshape(-1, col.type.list_size)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_unused_memory() -> None:
    """Hand the memory a Ray worker's allocators keep after frees back to the OS (0.1 ms when little is kept).

    Long-lived Ray processes (model actors, reused task workers) otherwise grow. pyarrow's default pool (mimalloc)
    keeps freed pages and returns them only while it allocates: a process that wrote a 150 MB table still held
    260 MB more than at its start after freeing it, and 37 MB after ``release_unused``. glibc keeps freed heap
    memory in per-thread arenas, and Ray runs actor calls on threads of its own: in a 1M-row ``kalm embed`` each
    Embedder actor grew by ~110 MB (391 to 500 MB of anonymous memory, ~0.2 MB a call) where the same calls in one
    process did not grow, and with ``malloc_trim`` after each call it stayed at 380-407 MB (issue 9 note). Called at
    the end of each model call, read and write task.
    """
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def object_array(values: list) -> np.ndarray:
    """A 1-d object array of ``values``, as Ray's numpy batches hold non-numeric columns (np.array would make a 2-d
    array of lists of equal lengths, and floats of ints beside a None)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
