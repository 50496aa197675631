"""Exactly-once output and resume: a ledger of committed output files, and what input rows they hold.

Why a ledger and not Ray Data's checkpointing (``DataContext.checkpoint_config``): Ray's checkpoint keys rows by
a unique id column and, on restart, loads every checkpointed id into memory and ships the sorted array to each
read task. At a billion rows of ~20-byte ids that is ~20-30 GB per filtering actor, before the cost of sorting
it. It also needs ids unique and non-null, while this pipeline must take inputs with null and duplicate ids and
set those rows aside, counted; and its filter would silently drop a later duplicate of a committed id.

The ledger keys rows by where they come from: (input file, row position), which every row has, unique or not.
- A write task writes its Parquet part(s), then ``_commits/<part>.json``: the files, the counts, and per input
  file the row positions it holds as ranges (``[[start, end), ...]``; rows travel in contiguous batches, so a
  part of ~100k rows holds a handful of ranges). The commit record is the commit point: object stores publish
  a PUT whole, and a local file is written aside and renamed. A part without a record is an orphan of a crash
  and is deleted on resume.
- A reader finishing an input file writes ``_sources/<digest>.json`` with the file's row count.
- On resume, a file whose ranges cover its row count is not read at all; a file partly done is read and its
  committed rows are dropped at the reader; the rest is processed as usual. Memory: one small record per
  output file and a few ranges per input file, e.g. ~10k records for a billion 384-d rows: megabytes.
Names are deterministic, ``part-<attempt>-<task>``: a retried write task rewrites its own file and record.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from operators.storage import exists, list_files, read_json, with_retries, write_json

logger = logging.getLogger(__name__)

COMMITS_DIR = "_commits"
SOURCES_DIR = "_sources"
REJECTS_DIR = "_rejects"
RUN_FILE = "_run.json"
MANIFEST = "_manifest.json"


def to_ranges(positions: np.ndarray) -> list[list[int]]:
    """Row positions [N] (any order, unique) -> sorted half-open ranges [[start, end), ...]."""
    if len(positions) == 0:
        return []
    p = np.sort(np.asarray(positions, dtype=np.int64))
    breaks = np.flatnonzero(np.diff(p) != 1) + 1  # where a run of consecutive positions ends
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(p)]])
    return [[int(p[s]), int(p[e - 1]) + 1] for s, e in zip(starts, ends)]


def merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    """Union of half-open ranges, sorted, adjacent ones joined."""
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def covers(ranges: list[list[int]], n: int) -> bool:
    """Whether merged ``ranges`` hold every position of 0..n-1."""
    return n == 0 or (len(ranges) == 1 and ranges[0][0] <= 0 and ranges[0][1] >= n)


def in_ranges(positions: np.ndarray, ranges: list[list[int]]) -> np.ndarray:
    """[N] positions -> [N] bool, True where a position lies in one of the merged ``ranges``."""
    if not ranges:
        return np.zeros(len(positions), dtype=bool)
    r = np.asarray(ranges, dtype=np.int64)  # [R, 2], sorted and disjoint
    i = np.searchsorted(r[:, 0], positions, side="right") - 1  # the last range starting at or before p
    return (i >= 0) & (positions < r[np.maximum(i, 0), 1])


def source_record_path(root: str, source: str) -> str:
    return posixpath.join(root, SOURCES_DIR, hashlib.blake2b(source.encode(), digest_size=12).hexdigest() + ".json")


def record_source(fs: pafs.FileSystem, root: str, source: str, rows: int) -> None:
    """Called by a reader once it has read all of ``source``: its row count, so resume can skip it."""
    write_json(fs, source_record_path(root, source), {"source": source, "rows": rows})


@dataclass
class LedgerState:
    """What earlier attempts committed under an output prefix."""

    commits: dict[str, dict] = field(default_factory=dict)  # record name -> record
    done: dict[str, list[list[int]]] = field(default_factory=dict)  # source -> merged committed ranges
    totals: dict[str, int] = field(default_factory=dict)  # source -> row count, for sources read to the end

    def complete(self) -> set[str]:
        return {s for s, n in self.totals.items() if covers(self.done.get(s, []), n)}

    def partial(self) -> dict[str, list[list[int]]]:
        """Sources with committed rows that are not complete: their committed ranges, to skip at the reader."""
        complete = self.complete()
        return {s: r for s, r in self.done.items() if s not in complete}

    def rows(self) -> int:
        return sum(c["rows"] for c in self.commits.values())

    def files(self) -> set[str]:
        """Paths (relative to the output root) of every committed data and rejects file."""
        return {f for c in self.commits.values() for f in (c.get("file"), c.get("rejects")) if f}

    def counts(self) -> dict:
        rejected: Counter = Counter()
        for c in self.commits.values():
            rejected.update(c["rejected"])
        return {
            "rows_in": self.rows(),
            "rows_out": sum(c["written"] for c in self.commits.values()),
            "rows_rejected": sum(rejected.values()),
            "rejected_by_reason": dict(sorted(rejected.items())),
            "rows_truncated": sum(c["truncated"] for c in self.commits.values()),
        }


def load(fs: pafs.FileSystem, root: str, threads: int = 16) -> LedgerState:
    """Read every commit and source record under ``root`` (in parallel: one small GET each)."""
    commit_paths = [p for p in list_files(fs, posixpath.join(root, COMMITS_DIR)) if p.endswith(".json")]
    source_paths = [p for p in list_files(fs, posixpath.join(root, SOURCES_DIR)) if p.endswith(".json")]
    commit_paths = [p for p in commit_paths if not posixpath.basename(p).startswith(".")]
    source_paths = [p for p in source_paths if not posixpath.basename(p).startswith(".")]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        commits = list(pool.map(lambda p: read_json(fs, p), commit_paths))
        sources = list(pool.map(lambda p: read_json(fs, p), source_paths))
    state = LedgerState()
    by_source: dict[str, list] = {}
    for path, rec in zip(commit_paths, commits):
        state.commits[posixpath.basename(path)] = rec
        for src, ranges in rec["sources"].items():
            by_source.setdefault(src, []).extend(ranges)
    state.done = {s: merge_ranges(r) for s, r in by_source.items()}
    state.totals = {rec["source"]: rec["rows"] for rec in sources}
    return state


def commit(fs: pafs.FileSystem, root: str, name: str, record: dict) -> None:
    write_json(fs, posixpath.join(root, COMMITS_DIR, name + ".json"), record)


def remove_orphans(fs: pafs.FileSystem, root: str, state: LedgerState) -> list[str]:
    """Delete output parts no commit record names (left by a killed write). Returns their relative paths."""
    removed, referenced = [], state.files()
    for directory in (root, posixpath.join(root, REJECTS_DIR)):
        if not exists(fs, directory):
            continue
        infos = fs.get_file_info(pafs.FileSelector(directory, recursive=False))
        for info in infos:
            rel = posixpath.relpath(info.path, root)
            name = posixpath.basename(info.path)
            if info.type == pafs.FileType.File and name.startswith("part-") and rel not in referenced:
                with_retries(lambda p=info.path: fs.delete_file(p), what=f"deleting {info.path}")
                removed.append(rel)
    if removed:
        logger.info("removed %d uncommitted part(s) left by an interrupted run", len(removed))
    return removed
