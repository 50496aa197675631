"""Input resolution and reading: Parquet, JSONL, CSV (a file, a folder or a glob) or a `datasets` save_to_disk
folder, on a local disk or in object storage (``s3://...``; see ``operators.storage``).

``resolve_input`` runs on the driver before Ray starts: it lists the files, detects the format and reads the
first file's schema, so a wrong path, a missing bucket or a missing column fails at once, naming what was found.
``read_input`` builds the Ray Dataset with one streaming read task per file, through a Ray Data ``Datasource``.
It is this project's own reader rather than Ray's ``read_parquet``/``read_json`` because exactly-once output
needs what those do not expose:
each row's file and position in it (``_source``, ``_row``), rows already committed dropped at the read, and a
record when a file has been read to its end (``operators.ledger``). Each file streams in batches of 8192 rows.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from operators import ledger
from operators.arrow import release_unused_memory
from operators.storage import StorageConfig, StorageError, check_bucket, file_sizes, resolve, storage_error

logger = logging.getLogger(__name__)

FORMATS = ("parquet", "jsonl", "csv", "hf")
SOURCE_COLUMN = "_source"  # the row's input file, relative to the input root
ROW_COLUMN = "_row"  # the row's position in that file
REJECT_COLUMN = "_reject"  # = operators.validate.REJECT_COLUMN (io must not depend on validate)
RESERVED = (SOURCE_COLUMN, ROW_COLUMN, REJECT_COLUMN)
EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
READ_BATCH_ROWS = 8192
MAX_READ_TASKS = 20_000  # one task per file up to this; beyond, files are grouped (task overhead ~ms each)


class InputError(ValueError):
    """The input cannot be read as asked: wrong path, format or columns. Raised before any work starts."""


@dataclass(frozen=True)
class InputFiles:
    uri: str
    format: str
    fs: pafs.FileSystem
    root: str  # sources (and ids made by add_ids) are relative to this folder, so they survive moving the data
    files: tuple[str, ...]  # paths inside fs
    schema: pa.Schema  # of the first file
    total_bytes: int | None = None  # of all files, from the listing (sizes the id registry)

    def source(self, path: str) -> str:
        return posixpath.relpath(path, self.root)


def _format_of(path: str) -> str | None:
    return EXTENSIONS.get(posixpath.splitext(path)[1].lower())


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _open_hf(fs: pafs.FileSystem, path: str):
    if isinstance(fs, pafs.LocalFileSystem):
        return pa.memory_map(path)
    return fs.open_input_file(path)


def _first_schema(fs: pafs.FileSystem, fmt: str, path: str) -> pa.Schema:
    try:
        if fmt == "parquet":
            return pq.read_schema(path, filesystem=fs)
        if fmt == "hf":
            with _open_hf(fs, path) as source:
                return pa.ipc.open_stream(source).schema
        with fs.open_input_stream(path) as f:
            head = f.read(1 << 20)
        head = head[: head.rfind(b"\n") + 1] or head
        if fmt == "jsonl":
            try:
                schema = pajson.read_json(pa.BufferReader(head)).schema
            except pa.ArrowInvalid:  # mixed types or broken lines: the reader sets those rows aside
                parsed = parse_jsonl_lines(head).schema  # its own _reject column is not the file's
                schema = parsed.remove(parsed.get_field_index(REJECT_COLUMN))
            if not schema.names:
                raise InputError(f"{path!r} holds no JSON object lines (an empty file, or not JSONL)")
            return schema
        if not head.strip():
            raise InputError(f"{path!r} is empty")
        return pacsv.read_csv(pa.BufferReader(head)).schema
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"cannot read {path!r}: not found") from e
    except (pa.ArrowInvalid, ValueError) as e:
        raise InputError(f"cannot read {path!r} as {fmt}: {e}") from e


def _glob(fs: pafs.FileSystem, pattern: str) -> dict[str, int]:
    first = min((pattern.find(c) for c in "*?[" if c in pattern), default=-1)
    if first < 0:
        return {}
    base = posixpath.dirname(pattern[:first]) or "/"
    return {p: n for p, n in sorted(file_sizes(fs, base).items()) if fnmatch.fnmatchcase(p, pattern)}


def resolve_input(uri: str, fmt: str | None = None, storage: StorageConfig | None = None) -> InputFiles:
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {fmt!r}")
    fs, path = resolve(uri, storage)
    try:
        check_bucket(fs, uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory and all(
            fs.get_file_info(posixpath.join(path, f)).type == pafs.FileType.File
            for f in ("state.json", "dataset_info.json")
        ):
            with fs.open_input_stream(posixpath.join(path, "state.json")) as f:
                state = json.loads(f.read())
            files, root, fmt = [posixpath.join(path, d["filename"]) for d in state["_data_files"]], path, "hf"
            sizes = file_sizes(fs, path)
        elif info.type == pafs.FileType.Directory:
            sizes = file_sizes(fs, path)
            found = [f for f in sorted(sizes) if _format_of(f) and not _hidden(posixpath.relpath(f, path))]
            formats = {_format_of(f) for f in found}
            if fmt is None and len(formats) > 1:
                raise InputError(f"folder {uri!r} mixes formats {sorted(formats)}; pass --format")
            fmt = fmt or next(iter(formats), None)
            files, root = [f for f in found if _format_of(f) == fmt], path
        elif info.type == pafs.FileType.File:
            files, root, sizes = [path], posixpath.dirname(path), {path: info.size}
            fmt = fmt or _format_of(path)
        else:
            sizes = _glob(fs, path)
            files = list(sizes)
            root = posixpath.commonpath(files) if len(files) > 1 else posixpath.dirname(files[0]) if files else ""
            if len(files) > 1 and root in files:  # pragma: no cover - a file cannot be a prefix of another
                root = posixpath.dirname(root)
            fmt = fmt or (_format_of(files[0]) if files else None)
    except (StorageError, InputError):
        raise
    except OSError as e:
        raise storage_error(e, uri) from e
    if not files:
        raise InputError(f"no input files found at {uri!r} (looked for {sorted(EXTENSIONS)} or a save_to_disk folder)")
    if fmt is None:
        raise InputError(f"cannot tell the format of {files[0]!r} from its name; pass --format ({FORMATS})")
    try:
        first = files[0]
        if fmt in ("jsonl", "csv") and len(files) > 1:  # an empty part among others is only 0 rows
            # one HEAD per file until a non-empty one: usually the first (a folder may hold thousands)
            first = next((f for f in files if sizes.get(f, 1)), files[0])
        schema = _first_schema(fs, fmt, first)
    except OSError as e:
        raise storage_error(e, uri) from e
    total = sum(sizes[f] for f in files) if all(f in sizes for f in files) else None
    return InputFiles(uri=uri, format=fmt, fs=fs, root=root, files=tuple(files), schema=schema, total_bytes=total)


def check_columns(inp: InputFiles, *, id_column: str, text_column: str, keep_columns: tuple[str, ...], add_ids: bool):
    """Fail before any work when a needed column is absent from the first file, naming the columns found."""
    found = inp.schema.names
    clash = [c for c in RESERVED if c in found]
    if clash:
        raise InputError(f"{inp.files[0]}: column(s) {clash} are reserved for row provenance; rename them")
    if add_ids and id_column in found:
        raise InputError(f"--add-ids would create id column {id_column!r}, but {inp.files[0]} already has it")
    needed = [text_column, *keep_columns] + ([] if add_ids else [id_column])
    missing = [c for c in needed if c not in found]
    if missing:
        hint = ""
        if id_column in missing:
            hint = (
                "; name the id column with --id-column, or pass --add-ids to derive stable ids "
                "from file + row position"
            )
        raise InputError(f"{inp.files[0]}: missing column(s) {missing}; columns found: {found}{hint}")
    check_type(inp, text_column, "strings", is_text)
    if not add_ids:
        check_type(inp, id_column, "strings or integers", is_id)


def is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):  # pandas categoricals are written as dictionary-encoded strings
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t)


def is_id(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return is_text(t) or pa.types.is_integer(t)


def check_type(inp: InputFiles, column: str, expected: str, ok) -> None:
    """A column whose type (from the first file's schema) cannot hold what it should is refused before any work:
    every row would be rejected one by one otherwise. A column of mixed types reads as its most common one; the
    odd values are rejected per row."""
    t = inp.schema.field(column).type
    if not ok(t):
        raise InputError(f"{inp.files[0]}: column {column!r} holds {t} values; expected {expected}")


def _iter_file(fs: pafs.FileSystem, fmt: str, path: str, columns: list[str] | None):
    if fmt == "parquet":
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
            yield from pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=cols)
    elif fmt == "hf":
        with _open_hf(fs, path) as source:
            yield from pa.ipc.open_stream(source)
    elif fmt == "csv":
        with fs.open_input_stream(path) as f:
            yield from pacsv.open_csv(f)
    else:
        with fs.open_input_stream(path) as f:
            data = f.read()  # pyarrow's JSON reader reads the whole file too
        try:
            table = pajson.read_json(pa.BufferReader(data))
        except pa.ArrowInvalid as e:
            logger.warning("%s: %s; parsing it line by line and setting bad lines aside", path, e)
            table = parse_jsonl_lines(data)
        yield from table.to_batches(max_chunksize=READ_BATCH_ROWS)


def _kind(value) -> str:
    return "list" if isinstance(value, list) else "null" if value is None else type(value).__name__


def parse_jsonl_lines(data: bytes) -> pa.Table:
    """JSONL that Arrow's reader refuses (a column changing type, a broken line), parsed line by line.

    Each column keeps its most common type (ints and floats count as one); a value of another type is nulled and
    its row marked ``{column}_wrong_type`` in ``_reject``; a line that is not a JSON object is ``json_invalid``. Row
    positions stay those of the lines, so nothing is lost or shifted. Slower than Arrow's reader: only used
    when that one fails.
    """
    rows, reasons = [], []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            rows.append({})
            reasons.append("json_invalid")
            continue
        rows.append(obj)
        reasons.append("")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    for col in columns:
        kinds = [_kind(r.get(col)) for r in rows]
        counts = {k: kinds.count(k) for k in set(kinds) - {"null"}}
        # The most common type; on a tie the one seen first (as Arrow's reader fixes a type from the first rows).
        main = max(counts, key=lambda k: (counts[k], -kinds.index(k))) if counts else "null"
        for i, k in enumerate(kinds):
            if k not in ("null", main) and not (k in ("int", "float") and main in ("int", "float")):
                rows[i][col] = None
                reasons[i] = reasons[i] or f"{col}_wrong_type"
    if not columns:  # no line was a JSON object: a table of rejects only, one row per line
        return pa.table({REJECT_COLUMN: pa.array(reasons, pa.string())})
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    return table.append_column(REJECT_COLUMN, pa.array(reasons, pa.string()))


def read_file(
    inp: InputFiles,
    path: str,
    *,
    columns: list[str] | None,
    id_column: str | None,
    skip: list[list[int]] | None,
    ledger_fs: pafs.FileSystem | None,
    ledger_root: str | None,
):
    """Stream one input file as Arrow tables with ``_source`` and ``_row`` (a generator).

    With ``id_column`` (add_ids), each row gets the id ``{source}:{row position}``: stable across reruns and
    machines as long as the files are unchanged. ``skip``: ranges of row positions already committed (dropped
    here). At the end of the file its row count is recorded in the ledger.
    """
    source = inp.source(path)
    offset = 0
    for rb in _iter_file(inp.fs, inp.format, path, columns):
        table = pa.Table.from_batches([rb])
        if columns:
            table = table.select([c for c in [*columns, REJECT_COLUMN] if c in table.column_names])
        pos = np.arange(offset, offset + table.num_rows, dtype=np.int64)
        offset += table.num_rows
        if id_column:
            table = table.append_column(id_column, pa.array([f"{source}:{p}" for p in pos], pa.string()))
        table = table.append_column(SOURCE_COLUMN, pa.array([source] * table.num_rows, pa.string()))
        table = table.append_column(ROW_COLUMN, pa.array(pos))
        if REJECT_COLUMN not in table.column_names:  # every block has the same columns; the reader may set it
            table = table.append_column(REJECT_COLUMN, pa.array([""] * table.num_rows, pa.string()))
        if skip:
            table = table.filter(pa.array(~ledger.in_ranges(pos, skip)))
        if table.num_rows:
            yield table
    if ledger_fs is not None:
        ledger.record_source(ledger_fs, ledger_root, source, offset)
    release_unused_memory()  # the decoder's buffers, kept by an idle read worker otherwise (operators.arrow)


class ProvenanceDatasource(Datasource):
    """Ray Data datasource over the input files: one read task per file (or per group when there are more files
    than the requested parallelism), each streaming its file through ``read_file``."""

    def __init__(self, inp: InputFiles, files: list[str], **read_args):
        super().__init__()
        self.inp, self.files, self.read_args = inp, files, read_args

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown before reading (JSONL/CSV): Ray then plans by file count

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        groups = np.array_split(np.arange(len(self.files)), max(1, min(parallelism, len(self.files))))
        # Each task pickles only its own paths and skip ranges: with ~1e4 tasks, shipping every path to every
        # task would cost O(files^2) bytes.
        slim = dataclasses.replace(self.inp, files=())
        args = {k: v for k, v in self.read_args.items() if k != "skip"}
        skip_all = self.read_args["skip"]
        tasks = []
        for group in groups:
            paths = [self.files[i] for i in group]
            skips = {p: skip_all.get(slim.source(p)) for p in paths}

            def read(paths=paths, skips=skips):
                for path in paths:
                    yield from read_file(slim, path, skip=skips[path], **args)

            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=tuple(paths))
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def read_input(
    inp: InputFiles,
    *,
    add_ids: bool,
    id_column: str,
    columns: list[str] | None,
    num_cpus: float,
    complete: set[str] = frozenset(),
    skip: dict[str, list[list[int]]] | None = None,
    ledger_fs: pafs.FileSystem | None = None,
    ledger_root: str | None = None,
    concurrency: int | None = None,
):
    """The Ray Dataset of the input rows not yet committed, with ``_source`` and ``_row``; None if none are left.

    ``columns`` prunes what is read (None: all). ``complete``: sources to leave out entirely. ``concurrency``: read
    tasks at once (None: as many as Ray's CPUs allow). Each holds a row group of its file in memory, and a task
    worker keeps that memory after its task, so unbounded reads make a run's memory follow its number of files.
    """
    import ray.data

    files = [f for f in inp.files if inp.source(f) not in complete]
    if not files:
        return None
    source = ProvenanceDatasource(
        inp,
        files,
        columns=columns,
        id_column=id_column if add_ids else None,
        skip=skip or {},
        ledger_fs=ledger_fs,
        ledger_root=ledger_root,
    )
    return ray.data.read_datasource(source, num_cpus=num_cpus, override_num_blocks=min(len(files), MAX_READ_TASKS),
                                    concurrency=concurrency)  # fmt: skip
