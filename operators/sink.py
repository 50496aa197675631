"""RowSink: writes a pipeline's rows to Parquet or JSONL and rejected rows to ``_rejects/``, in one pass.

Ray Data's built-in ``write_parquet`` writes every row it is given; routing rows by their ``_reject`` mark in the
same write is why this sink exists (a second pass over the data for the rejects would read the input twice).
Vectors are stored as ``fixed_size_list<float32|float16>`` (Ray's tensor extension type is not readable by
other Parquet tools). Rejects keep their file and row position (``_source``, ``_row``) so a user can find them.
Each write task commits its files to the ledger and returns its counts; ``on_write_complete`` adds them up.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from operators import ledger
from operators.arrow import release_unused_memory
from operators.io import ROW_COLUMN, SOURCE_COLUMN
from operators.ledger import REJECTS_DIR
from operators.storage import with_retries
from operators.validate import REJECT_COLUMN

logger = logging.getLogger(__name__)


def plain_column(col: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """Ray's tensor extension types (what object arrays of numpy arrays become) -> plain Arrow lists, which every
    Parquet and JSON reader understands; other columns unchanged."""
    if not isinstance(col.type, pa.ExtensionType):
        return col
    values = col.to_pylist()
    return pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in values])


def vector_column(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A vector column as the Embedder emits it: ``fixed_size_list`` (one array, chunks combined). One chunk is
    taken as it is: combining copies even a single chunk, and a block's vectors are most of what a write holds."""
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise TypeError(f"vector columns must be fixed_size_list arrays (operators.arrow), got {col.type}")
    return col


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


INTERNAL = (REJECT_COLUMN, SOURCE_COLUMN, ROW_COLUMN, "input_ids", "num_tokens", "truncated")
# Parquet row groups of about this much data: Arrow's writer works on a row group at once, and its allocations grow
# with the group. Written as one row group, a 123 MB file of 896-d vectors peaked at 1.8x its size in allocations
# (``pq.write_table`` alone); in 29 MB groups at 0.55x. 32 MB groups still scan well. With the blocks also taken
# without a copy, a write task's allocations for that file fell from 153 MB to 29 MB (issue 9 note).
ROW_GROUP_BYTES = 32 * 2**20
MIN_ROW_GROUP_ROWS = 1024


def row_group_rows(table: pa.Table) -> int:
    """Rows per Parquet row group of ``table``: about ``ROW_GROUP_BYTES`` of its data, at least
    ``MIN_ROW_GROUP_ROWS``."""
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    return max(MIN_ROW_GROUP_ROWS, ROW_GROUP_BYTES // per_row)


FORMATS = ("parquet", "jsonl")


JSONL_CHUNK_ROWS = 8192


def write_jsonl(table: pa.Table, path: str, filesystem: pafs.FileSystem) -> None:
    """One JSON object per line (what FlagEmbedding and most trainers read); UTF-8, not ASCII-escaped. Rows become
    Python objects ``JSONL_CHUNK_ROWS`` at a time, not a whole file's at once."""
    with filesystem.open_output_stream(path) as f:
        for start in range(0, table.num_rows, JSONL_CHUNK_ROWS):
            rows = table.slice(start, JSONL_CHUNK_ROWS).to_pylist()
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())


class RowSink(Datasink):
    """Writes each task's rows as one ``part-<attempt>-<task>.<parquet|jsonl>`` (+ its rejects), then commits it.

    Needs ``_reject``, ``_source`` and ``_row``. ``columns``: the output columns in order (None: every column
    but the internal ones); ``vector_columns`` are stored as fixed-size lists. Rejects keep the id (if any), the
    reason, their file and row, and ``reject_columns`` (None: the output columns that are not vectors) so a user
    can find and fix them. The commit record written after the parts (``operators.ledger``) is what makes the rows
    count as done; a task killed before it leaves parts that the next run deletes and redoes. Write errors are
    retried when transient and otherwise fail the job.
    """

    def __init__(
        self,
        path: str,
        *,
        columns: tuple[str, ...] | None = None,
        vector_columns: tuple[str, ...] = (),
        id_column: str | None = None,
        reject_columns: tuple[str, ...] | None = None,
        output_format: str = "parquet",
        rows_per_file: int = 100_000,
        filesystem: pafs.FileSystem | None = None,
        attempt: int = 0,
    ):
        if output_format not in FORMATS:
            raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
        self.path = path.rstrip("/")
        self.columns = columns
        self.vector_columns = vector_columns
        self.id_column = id_column
        self.reject_columns = reject_columns
        self.output_format = output_format
        self.rows_per_file = rows_per_file
        self.filesystem = filesystem or pafs.LocalFileSystem()
        self.attempt = attempt
        self.stats = WriteStats()

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def on_write_start(self, schema=None) -> None:
        for d in (REJECTS_DIR, ledger.COMMITS_DIR, ledger.SOURCES_DIR):
            self.filesystem.create_dir(posixpath.join(self.path, d), recursive=True)

    def _write_table(self, table: pa.Table, rel: str, fmt: str) -> str:
        path = posixpath.join(self.path, rel)
        if fmt == "jsonl":
            write = lambda: write_jsonl(table, path, self.filesystem)  # noqa: E731
        else:
            rows = row_group_rows(table)
            write = lambda: pq.write_table(  # noqa: E731
                table, path, filesystem=self.filesystem, compression="zstd", row_group_size=rows
            )
        with_retries(write, what=f"writing {path}")
        return rel

    def _good(self, table: pa.Table) -> pa.Table:
        names = self.columns or tuple(c for c in table.column_names if c not in INTERNAL)
        vec = self.vector_columns
        return pa.table(
            {c: vector_column(table.column(c)) if c in vec else plain_column(table.column(c)) for c in names}
        )

    def _bad(self, table: pa.Table) -> pa.Table:
        cols = {}
        if self.id_column:
            cols[self.id_column] = (
                table.column(self.id_column)
                if self.id_column in table.column_names
                else pa.nulls(table.num_rows, pa.string())
            )
        cols.update(reason=table.column(REJECT_COLUMN), **{SOURCE_COLUMN: table.column(SOURCE_COLUMN)})
        cols[ROW_COLUMN] = table.column(ROW_COLUMN)
        keep = self.reject_columns
        if keep is None:
            keep = tuple(c for c in (self.columns or table.column_names) if c not in INTERNAL)
        keep = [c for c in keep if c in table.column_names and c not in cols and c not in self.vector_columns]
        cols.update({c: plain_column(table.column(c)) for c in keep})
        return pa.table(cols)

    def write(self, blocks, ctx) -> WriteStats:
        stats = WriteStats()
        good: list[pa.Table] = []
        bad: list[pa.Table] = []
        positions: dict[str, list[np.ndarray]] = {}
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows == 0:
                continue
            sources = np.asarray(table.column(SOURCE_COLUMN).to_numpy(zero_copy_only=False), dtype=object)
            rows = np.asarray(table.column(ROW_COLUMN).to_numpy(), dtype=np.int64)
            for src in np.unique(sources):
                positions.setdefault(str(src), []).append(rows[sources == src])
            reasons = np.asarray(table.column(REJECT_COLUMN).to_numpy(zero_copy_only=False), dtype=object)
            ok = reasons == ""
            stats.rejected.update(reasons[~ok].tolist())
            if "truncated" in table.column_names:
                stats.truncated += int(np.asarray(table.column("truncated"))[ok].sum())
            if ok.all():  # the usual block: its columns as Ray handed them, no copy (filter copies even all-true)
                good.append(self._good(table))
            elif ok.any():
                good.append(self._good(table.filter(pa.array(ok))))
            if (~ok).any():
                bad.append(self._bad(table.filter(pa.array(~ok))))
        # Input rows, not output rows: a row a stage expanded (one training row per positive) counts once, and the
        # ledger's ranges need each position once. Its output rows must reach one write task (they leave their map
        # call as one block), or the exactly-once check reports the row as committed twice.
        unique = {src: np.unique(np.concatenate(p)) for src, p in positions.items()}
        stats.rows = sum(len(p) for p in unique.values())
        if not stats.rows:
            return stats
        # One file per write task (Ray bundles >= rows_per_file rows into each). The name is deterministic, so
        # a write task that Ray retries overwrites its own earlier attempt instead of adding a second copy.
        name = f"part-{self.attempt:04d}-{ctx.task_idx:06d}"
        record = {"file": None, "rejects": None}
        if good:
            table = pa.concat_tables(good, promote_options="permissive")
            stats.written = table.num_rows
            record["file"] = self._write_table(table, f"{name}.{self.output_format}", self.output_format)
            stats.files.append(record["file"])
        if bad:
            rej = pa.concat_tables(bad, promote_options="permissive")
            record["rejects"] = self._write_table(rej, posixpath.join(REJECTS_DIR, name + ".parquet"), "parquet")
        record.update(
            rows=stats.rows,
            written=stats.written,
            rejected=dict(stats.rejected),
            truncated=stats.truncated,
            sources={src: ledger.to_ranges(p) for src, p in unique.items()},
        )
        ledger.commit(self.filesystem, self.path, name, record)
        release_unused_memory()  # the Parquet writer's buffers: an idle write worker would keep them (operators.arrow)
        return stats

    def on_write_complete(self, write_result) -> None:
        for s in write_result.write_returns:
            self.stats.add(s)
