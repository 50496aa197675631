"""An output prefix across attempts of one job: refuse, replace or resume; clean up; check; write the manifest.

The commit protocol itself (what a committed part is, how rows are tracked) is in ``operators.ledger``.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from operators import ledger
from operators.storage import (
    StorageConfig,
    StorageError,
    check_bucket,
    list_files,
    read_json,
    resolve,
    storage_error,
    write_json,
)
from pipelines.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class Output:
    uri: str
    fs: pafs.FileSystem
    root: str
    attempt: int  # 0 for a fresh output, n for the n-th resume
    state: ledger.LedgerState  # what earlier attempts committed, as found at the start
    removed: list[str] = field(default_factory=list)  # orphaned parts deleted at the start

    def finish(self, sources: list[str]) -> ledger.LedgerState:
        """After a successful attempt: drop late commits of killed attempts and orphans, then check that every
        input file's rows are committed exactly once. Returns the final ledger state."""
        try:
            end = ledger.load(self.fs, self.root)
            # A write task of a killed attempt may have committed after this attempt read the ledger; its rows
            # were redone by this attempt, so that late copy goes.
            late = [n for n in end.commits if n not in self.state.commits and _attempt_of(n) < self.attempt]
            for name in late:
                rec = end.commits.pop(name)
                for f in (rec.get("file"), rec.get("rejects")):
                    if f:
                        self.fs.delete_file(posixpath.join(self.root, f))
                self.fs.delete_file(posixpath.join(self.root, ledger.COMMITS_DIR, name + ".json"))
            if late:
                logger.warning("removed %d part(s) committed late by an interrupted attempt", len(late))
                end = ledger.load(self.fs, self.root)
            ledger.remove_orphans(self.fs, self.root, end)
        except OSError as e:
            raise storage_error(e, self.uri) from e
        problems = exactly_once_problems(end, sources)
        if problems:
            raise RuntimeError(f"output {self.uri} is not exactly-once: " + "; ".join(problems[:5]))
        return end

    def read(self, inp, *, columns: list[str] | None, num_cpus: float, add_ids: bool = False, id_column: str = "",
             concurrency: int | None = None):  # fmt: skip
        """``inp`` as a Ray Dataset of the rows this output has not committed yet (None if none are left), read
        with the ledger: complete files skipped, committed rows dropped, each file's row count recorded."""
        from operators.io import read_input

        return read_input(inp, add_ids=add_ids, id_column=id_column, columns=columns, num_cpus=num_cpus,
                          complete=self.state.complete(), skip=self.state.partial(), ledger_fs=self.fs,
                          ledger_root=self.root, concurrency=concurrency)  # fmt: skip

    def write_manifest(self, manifest: dict) -> None:
        try:
            write_json(self.fs, posixpath.join(self.root, ledger.MANIFEST), manifest)
        except OSError as e:
            raise storage_error(e, self.uri) from e


def _attempt_of(name: str) -> int:
    return int(name.split("-")[1])  # part-<attempt>-<task>


def exactly_once_problems(state: ledger.LedgerState, sources: list[str]) -> list[str]:
    """Input files whose committed row ranges do not tile 0..rows-1 exactly once (missing or repeated rows)."""
    lengths: dict[str, int] = {}
    for rec in state.commits.values():
        for src, ranges in rec["sources"].items():
            lengths[src] = lengths.get(src, 0) + sum(e - s for s, e in ranges)
    problems = []
    for src in sources:
        total = state.totals.get(src)
        if total is None:
            problems.append(f"{src}: never read to its end")
        elif not ledger.covers(state.done.get(src, []), total):
            problems.append(f"{src}: rows missing (committed {state.done.get(src)} of {total})")
        elif lengths.get(src, 0) != total:
            problems.append(f"{src}: {lengths.get(src, 0) - total} row(s) committed twice")
    return problems


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def open_output(uri: str, storage: StorageConfig, fingerprint: dict, *, overwrite: bool) -> Output:
    """Claim ``uri`` for a run with these output settings (``fingerprint``).

    Empty or absent: a fresh output. Holding a run with the same settings: resume it. Anything else is refused
    unless ``overwrite``, which deletes what is there. Fails fast (StorageError) on permission or bucket errors.
    """
    fs, root = resolve(uri, storage)
    try:
        check_bucket(fs, uri)
        if overwrite:
            if fs.get_file_info(root).type == pafs.FileType.Directory:
                fs.delete_dir_contents(root, missing_dir_ok=True)
            elif fs.get_file_info(root).type == pafs.FileType.File:
                raise ConfigError(f"output {uri!r} is a file, not a folder or prefix")
        run_path = posixpath.join(root, ledger.RUN_FILE)
        existing = list_files(fs, root)
        previous = None
        if existing:
            if run_path not in existing:
                raise ConfigError(
                    f"output {uri!r} is not empty and holds no kalm run ({ledger.RUN_FILE} missing); "
                    "pass --overwrite to replace its contents"
                )
            previous = read_json(fs, run_path)
            diff = _differences(previous["fingerprint"], fingerprint)
            if diff:
                raise ConfigError(
                    f"output {uri!r} holds a run with other settings ({'; '.join(diff)}); rerun with the same "
                    "settings to resume it, or pass --overwrite to replace it"
                )
        attempt = previous["attempts"] if previous else 0
        fs.create_dir(root, recursive=True)
        state = ledger.load(fs, root)
        write_json(fs, run_path, {"fingerprint": fingerprint, "attempts": attempt + 1})
        removed = ledger.remove_orphans(fs, root, state)
    except (ConfigError, StorageError):
        raise
    except OSError as e:
        raise storage_error(e, uri) from e
    if attempt:
        logger.info(
            "resuming %s (attempt %d): %d rows committed before, %d input files complete",
            uri,
            attempt,
            state.rows(),
            len(state.complete()),
        )
    return Output(uri=uri, fs=fs, root=root, attempt=attempt, state=state, removed=removed)


def _preload_file(fs, path: str, id_column: str, rejects: bool, registry: list) -> int:
    import pyarrow.parquet as pq
    import ray

    from operators.validate import claimed_id, id_key, shard_keys

    table = pq.read_table(path, columns=[id_column] + (["reason"] if rejects else []), filesystem=fs)
    ids = table.column(id_column).to_pylist()
    if rejects:  # only rows that passed validation claimed their id in the earlier attempt
        ids = [i for i, r in zip(ids, table.column("reason").to_pylist()) if claimed_id(r)]
    keys = [id_key(x) for x in ids if x is not None]
    ray.get([registry[s].preload.remote([keys[j] for j in sel]) for s, sel in shard_keys(keys, len(registry))])
    return len(keys)


def preload_registry(out: Output, registry: list, *, id_column: str, num_cpus: float) -> int:
    """Fill the id registry with the ids earlier attempts committed, one Ray task per committed file."""
    import ray

    files = sorted(out.state.files())
    if not files:
        return 0
    task = ray.remote(num_cpus=num_cpus)(_preload_file)
    refs = [
        task.remote(out.fs, posixpath.join(out.root, f), id_column, f.startswith(ledger.REJECTS_DIR), registry)
        for f in files
    ]
    n = sum(ray.get(refs))
    logger.info("id registry preloaded with %d committed ids from %d files", n, len(files))
    return n
