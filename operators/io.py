"""Input resolution and reading: Parquet, JSONL, CSV (a file, a folder or a glob) or a `datasets` save_to_disk folder.

``resolve_input`` runs on the driver before Ray starts: it lists the files, detects the format and reads the
first file's schema, so a wrong path or a missing column fails at once, naming what was found. ``read_input``
builds the Ray Dataset: Ray Data's own readers for Parquet/JSONL/CSV; a per-file streaming reader where Ray has
none (the Arrow stream files of ``save_to_disk``) or where row positions are needed (``add_ids``: Ray's readers
do not expose a row's position in its file).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

FORMATS = ("parquet", "jsonl", "csv", "hf")
SOURCE_COLUMN = "_source"
EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}


class InputError(ValueError):
    """The input cannot be read as asked: wrong path, format or columns. Raised before any work starts."""


@dataclass(frozen=True)
class InputFiles:
    format: str
    root: str  # ids made by add_ids are relative to this folder, so they survive moving the data
    files: tuple[str, ...]
    schema: pa.Schema  # of the first file


def _hf_files(folder: Path) -> list[str]:
    state = json.loads((folder / "state.json").read_text())
    return [str(folder / f["filename"]) for f in state["_data_files"]]


def _format_of(path: str) -> str | None:
    return EXTENSIONS.get(os.path.splitext(path)[1].lower())


def _first_schema(fmt: str, path: str) -> pa.Schema:
    try:
        if fmt == "parquet":
            return pq.read_schema(path)
        if fmt == "hf":
            with pa.memory_map(path) as source:
                return pa.ipc.open_stream(source).schema
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        if fmt == "jsonl":
            head = head[: head.rfind(b"\n") + 1] or head
            return pajson.read_json(pa.BufferReader(head)).schema
        return pacsv.read_csv(pa.BufferReader(head[: head.rfind(b"\n") + 1] or head)).schema
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise InputError(f"cannot read {path!r} as {fmt}: {e}") from e


def resolve_input(path: str, fmt: str | None = None) -> InputFiles:
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {fmt!r}")
    p = Path(path)
    if p.is_dir() and (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
        files, root, fmt = _hf_files(p), str(p), "hf"
    elif p.is_dir():
        found = sorted(
            str(f) for f in p.rglob("*") if f.is_file() and _format_of(str(f)) and not f.name.startswith((".", "_"))
        )
        formats = {_format_of(f) for f in found}
        if fmt is None and len(formats) > 1:
            raise InputError(f"folder {path!r} mixes formats {sorted(formats)}; pass --format")
        fmt = fmt or next(iter(formats), None)
        files, root = [f for f in found if _format_of(f) == fmt], str(p)
    elif p.is_file():
        files, root = [str(p)], str(p.parent)
        fmt = fmt or _format_of(str(p))
    else:
        files = sorted(glob.glob(path, recursive=True))
        root = (
            str(Path(os.path.commonpath(files)).parent if len(files) == 1 else os.path.commonpath(files))
            if files
            else ""
        )
        fmt = fmt or (_format_of(files[0]) if files else None)
    if not files:
        raise InputError(
            f"no input files found at {path!r} (looked for {sorted(EXTENSIONS)} or a save_to_disk folder)"
        )
    if fmt is None:
        raise InputError(f"cannot tell the format of {files[0]!r} from its name; pass --format ({FORMATS})")
    return InputFiles(format=fmt, root=root, files=tuple(files), schema=_first_schema(fmt, files[0]))


def check_columns(inp: InputFiles, *, id_column: str, text_column: str, keep_columns: tuple[str, ...], add_ids: bool):
    """Fail before any work when a needed column is absent from the first file, naming the columns found."""
    found = inp.schema.names
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


def _iter_file(fmt: str, path: str, columns: list[str] | None):
    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=8192, columns=columns)
    elif fmt == "hf":
        with pa.memory_map(path) as source:
            yield from pa.ipc.open_stream(source)
    elif fmt == "csv":
        yield from pacsv.open_csv(path)
    else:
        yield from pajson.read_json(path).to_batches(max_chunksize=8192)


def read_files_with_row_ids(batch: dict[str, np.ndarray], *, fmt: str, root: str, id_column: str | None):
    """Per-file streaming reader (a generator UDF): one input row = one file path, output = that file's rows.

    With id_column, each row gets the id ``{path relative to root}:{row position in file}``: stable across
    reruns and machines as long as the files are unchanged.
    """
    for path in batch["path"]:
        rel = os.path.relpath(path, root)
        offset = 0
        for rb in _iter_file(fmt, path, None):
            table = pa.Table.from_batches([rb])
            if id_column:
                ids = pa.array([f"{rel}:{offset + i}" for i in range(table.num_rows)], pa.string())
                table = table.append_column(id_column, ids)
            table = table.append_column(SOURCE_COLUMN, pa.array([rel] * table.num_rows, pa.string()))
            offset += table.num_rows
            yield table


def reads_natively(inp: InputFiles, add_ids: bool) -> bool:
    return not add_ids and inp.format != "hf"


def has_source_column(inp: InputFiles, add_ids: bool) -> bool:
    """Whether read_input's rows carry ``_source``: not when Ray's file column would clash with a user "path"."""
    return not (reads_natively(inp, add_ids) and "path" in inp.schema.names)


def read_input(inp: InputFiles, *, add_ids: bool, id_column: str, columns: list[str] | None, num_cpus: float):
    """The Ray Dataset of the input rows, plus a ``_source`` column (each row's file) for the id registry.

    ``columns`` prunes what Parquet reads (None: all).
    """
    import ray.data

    if reads_natively(inp, add_ids):
        # Ray's readers name the file column "path"; renamed so it cannot clash with a user column of that name.
        args = {"num_cpus": num_cpus, "include_paths": has_source_column(inp, add_ids)}
        if inp.format == "parquet":
            ds = ray.data.read_parquet(list(inp.files), **args)
            if columns:  # Ray pushes the projection into the read
                ds = ds.select_columns(columns + (["path"] if args["include_paths"] else []))
        elif inp.format == "csv":
            ds = ray.data.read_csv(list(inp.files), **args)
        else:
            ds = ray.data.read_json(list(inp.files), lines=True, **args)
        return ds.rename_columns({"path": SOURCE_COLUMN}) if args["include_paths"] else ds
    ds = ray.data.from_items([{"path": f} for f in inp.files], override_num_blocks=len(inp.files))
    return ds.map_batches(
        read_files_with_row_ids,
        batch_size=1,
        num_cpus=num_cpus,
        fn_kwargs={"fmt": inp.format, "root": inp.root, "id_column": id_column if add_ids else None},
    )
