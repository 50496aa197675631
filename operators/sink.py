"""EmbeddingSink: writes embedded rows to Parquet and rejected rows to ``_rejects/``, in one pass.

Ray Data's built-in ``write_parquet`` writes every row it is given; routing rows by their ``_reject`` mark in the
same write is why this sink exists (a second pass over the data for the rejects would read the input twice).
Vectors are stored as ``fixed_size_list<float32|float16>`` (Ray's tensor extension type is not readable by
other Parquet tools). Each write task returns its counts; ``on_write_complete`` adds them up on the driver.
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from operators.validate import REJECT_COLUMN

logger = logging.getLogger(__name__)

REJECTS_DIR = "_rejects"


def fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """[N, D] numpy -> fixed_size_list<D> Arrow array (zero copy of the flat buffer)."""
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def vector_column(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col
    # Ray's tensor extension array (what [N, D] numpy batches become) converts back to [N, D].
    return fixed_size_list(np.asarray(col.to_numpy(zero_copy_only=False)))


@dataclass
class WriteStats:
    rows: int = 0
    written: int = 0
    rejected: Counter = field(default_factory=Counter)
    truncated: int = 0
    files: list[str] = field(default_factory=list)

    def add(self, other: WriteStats) -> None:
        self.rows += other.rows
        self.written += other.written
        self.rejected.update(other.rejected)
        self.truncated += other.truncated
        self.files.extend(other.files)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows,
            "rows_out": self.written,
            "rows_rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "rows_truncated": self.truncated,
            "files": sorted(self.files),
        }


class EmbeddingSink(Datasink):
    def __init__(
        self,
        path: str,
        *,
        id_column: str,
        vector_columns: tuple[str, ...],
        keep_columns: tuple[str, ...] = (),
        rows_per_file: int = 100_000,
        filesystem: pafs.FileSystem | None = None,
    ):
        self.path = path.rstrip("/")
        self.id_column = id_column
        self.vector_columns = vector_columns
        self.keep_columns = keep_columns
        self.rows_per_file = rows_per_file
        self.filesystem = filesystem or pafs.LocalFileSystem()
        self.stats = WriteStats()

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def on_write_start(self, schema=None) -> None:
        self.filesystem.create_dir(posixpath.join(self.path, REJECTS_DIR), recursive=True)

    def _write_table(self, table: pa.Table, directory: str, name: str) -> str:
        path = posixpath.join(directory, name)
        pq.write_table(table, path, filesystem=self.filesystem, compression="zstd")
        return path

    def write(self, blocks, ctx) -> WriteStats:
        stats = WriteStats()
        good: list[pa.Table] = []
        bad: list[pa.Table] = []
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows == 0:
                continue
            reasons = np.asarray(table.column(REJECT_COLUMN).to_numpy(zero_copy_only=False), dtype=object)
            ok = reasons == ""
            stats.rows += table.num_rows
            stats.rejected.update(reasons[~ok].tolist())
            if "truncated" in table.column_names:
                stats.truncated += int(np.asarray(table.column("truncated"))[ok].sum())
            if ok.any():
                kept = table.filter(pa.array(ok))
                cols = {self.id_column: kept.column(self.id_column)}
                cols.update({c: vector_column(kept.column(c)) for c in self.vector_columns})
                cols.update({c: kept.column(c) for c in self.keep_columns})
                good.append(pa.table(cols))
            if (~ok).any():
                rej = table.filter(pa.array(~ok))
                cols = {
                    self.id_column: rej.column(self.id_column)
                    if self.id_column in rej.column_names
                    else pa.nulls(rej.num_rows, pa.string()),
                    "reason": rej.column(REJECT_COLUMN),
                }
                cols.update({c: rej.column(c) for c in self.keep_columns if c in rej.column_names})
                bad.append(pa.table(cols))
        # One file per write task: Ray bundles at least rows_per_file rows into each task.
        name = f"part-{ctx.task_idx:06d}-{uuid.uuid4().hex[:8]}.parquet"
        if good:
            table = pa.concat_tables(good, promote_options="permissive")
            stats.written = table.num_rows
            stats.files.append(self._write_table(table, self.path, name))
        if bad:
            self._write_table(
                pa.concat_tables(bad, promote_options="permissive"), posixpath.join(self.path, REJECTS_DIR), name
            )
        return stats

    def on_write_complete(self, write_result) -> None:
        for s in write_result.write_returns:
            self.stats.add(s)
