"""A model or index actor SIGKILLed mid-run (its process, as the kernel's OOM killer or a lost node would): the run
completes, and its output holds every valid input row exactly once, with counts that add up. Also: a stage that
stops moving ends with a clear error instead of hanging.

The kill comes from a thread of the test, once the run has committed some output, so it lands mid-run; the tests
check that it did (fewer commits before the kill than at the end) and that Ray started a replacement actor."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from tests.conftest import WORDS


class Killer(threading.Thread):
    """SIGKILLs the first process whose title holds ``title`` once ``done()`` (work finished so far: commits, or
    rows) is above 0; records ``done()`` at that moment and which processes held that title afterwards (restarts)."""

    def __init__(self, title: str, done, deadline_s: float = 240, progress=lambda: 0):
        super().__init__(daemon=True)
        self.progress, self.searched_then = progress, 0
        self.title, self.done, self.deadline = title, done, time.time() + deadline_s
        self.killed: int | None = None
        self.commits_before = 0
        self.seen_after: set[int] = set()
        self._done = threading.Event()

    def _matching(self) -> list[int]:
        import psutil

        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if self.title in " ".join(p.info["cmdline"] or []):
                    found.append(p.info["pid"])
            except psutil.Error:
                pass
        return found

    def run(self) -> None:
        while not self._done.is_set() and time.time() < self.deadline:
            if self.killed is None:
                done = self.done()
                pids = self._matching() if done else []
                if pids:
                    self.commits_before = done
                    self.searched_then = self.progress()
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed = pids[0]
            else:
                self.seen_after.update(p for p in self._matching() if p != self.killed)
            time.sleep(0.05)

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def _run_and_kill(title: str, out: Path, argv: list[str]) -> None:
    """Runs ``kalm argv`` while a Killer SIGKILLs the process titled ``title`` after the first commit; checks the run
    succeeded, the kill landed mid-run and Ray started a replacement."""
    killer = Killer(title, lambda: _commits(out))
    killer.start()
    try:
        rc = main(argv)
    finally:
        killer.stop()
    assert rc == 0
    assert killer.killed is not None and killer.commits_before < _commits(out), "the kill did not land mid-run"
    assert killer.seen_after, f"no replacement {title} was started"


def _commits(out: Path) -> int:
    return len(list((out / "_commits").glob("*.json"))) if (out / "_commits").exists() else 0


def _text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3 + i % 9)) + f" {i}"


def test_embedder_killed_mid_run(ray_local, tiny_bert, tmp_path):
    n = 2000
    ids = [f"r{i}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "text": [_text(i) for i in range(n)]}), tmp_path / "in.parquet",
                   row_group_size=250)  # fmt: skip
    out = tmp_path / "out"
    _run_and_kill("MapBatches(Embedder)", out, ["embed", "--input", str(tmp_path / "in.parquet"), "--output",
                  str(out), "--model", tiny_bert, "--max-rows", "4", "--batch-size", "64", "--rows-per-file", "250",
                  "--block-mb", "0.02"])  # fmt: skip
    got = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    assert len(got) == n and set(got) == set(ids)  # every row, once
    c = json.loads((out / "_manifest.json").read_text())["counts"]
    assert c["rows_in"] == c["rows_out"] + c["rows_rejected"] == n and c["rows_rejected"] == 0


def test_teacher_killed_mid_run(ray_local, tiny_bert, tmp_path):
    n = 800
    rows = [{"query": f"q {_text(i)}", "pos": [_text(i + 1)], "neg": [_text(i + 2), _text(i + 3)]} for i in range(n)]
    rows[7] = {"query": "q", "pos": "not a list"}  # a bad row: set aside with its reason, counted
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    _run_and_kill("MapBatches(TeacherScorer)", out, ["score", "--input", str(tmp_path / "rows.jsonl"), "--output",
                  str(out), "--teacher", tiny_bert, "--query-prompt", "", "--max-rows", "8", "--batch-size", "16",
                  "--rows-per-file", "50", "--block-mb", "0.01"])  # fmt: skip
    lines = [json.loads(x) for f in sorted(out.glob("part-*.jsonl")) for x in f.read_text().splitlines()]
    queries = [r["query"] for r in lines]
    assert len(queries) == n - 1 and set(queries) == {r["query"] for i, r in enumerate(rows) if i != 7}
    assert all(len(r["neg_scores"]) == 2 and len(r["pos_scores"]) == 1 for r in lines)
    rejects = pq.read_table(out / "_rejects").to_pylist()
    assert [(r["_row"], r["reason"]) for r in rejects] == [(7, "pos_wrong_type")]
    c = json.loads((out / "_manifest.json").read_text())["counts"]
    assert (c["rows_in"], c["rows_out"], c["rows_rejected"]) == (n, n - 1, 1)


def test_index_shard_killed_mid_search(ray_local, tiny_bert, tmp_path, monkeypatch):
    """The searching shard is restarted by Ray from its saved files; the candidates equal exact search in numpy.
    The search stage commits its candidates in one file and searches 1,200 queries in a second or two here, so the
    kill comes as soon as the stage's miner is up; the stage's progress count at that moment shows it had not
    finished."""
    import logging
    import re

    import psutil

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    progress = logging.getLogger("pipelines.progress")
    progress.addHandler(handler)
    monkeypatch.setattr(progress, "level", logging.INFO)
    monkeypatch.setenv("KALM_PROGRESS_S", "0.5")

    def searched() -> int:
        pattern = r"search, select \(candidates\): ([\d,]+) /"
        found = [int(m[1].replace(",", "")) for x in lines if (m := re.match(pattern, x))]
        return found[-1] if found else 0

    def miner_up() -> int:
        return int(
            any(
                "MapBatches(QueryMiner)" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])
            )
        )

    corpus = [{"id": f"d{i}", "text": _text(i)} for i in range(1500)]
    queries = [{"query_id": f"q{i}", "query": _text(i + 5000), "positive_ids": [f"d{(i * 7) % 1500}"]}
               for i in range(1200)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(corpus), tmp_path / "corpus.parquet")
    pq.write_table(pa.Table.from_pylist(queries), tmp_path / "queries.parquet")
    args = ["--queries", str(tmp_path / "queries.parquet"), "--corpus", str(tmp_path / "corpus.parquet"),
            "--model", tiny_bert, "--query-prompt", "", "--num-negatives", "3", "--range-max", "10",
            "--search-batch", "16", "--miners", "1", "--no-st-columns"]  # fmt: skip
    out = tmp_path / "mine"
    killer = Killer("ShardSearcher", miner_up, progress=searched)
    killer.start()
    try:
        rc = main(["mine", "--output", str(out), *args])
    finally:
        killer.stop()
        progress.removeHandler(handler)
    assert rc == 0
    assert killer.killed is not None and killer.searched_then < len(queries), lines[-5:]
    assert killer.seen_after, "no replacement shard was started"
    got = {r["query_id"]: r for r in pq.read_table(out / "candidates").to_pylist()}
    assert len(got) == len(queries)  # every query once
    # Exact search in numpy over the run's own vectors: the restarted shard held the same vectors as before.
    import numpy as np

    docs = pq.read_table(out / "_work" / "corpus").to_pydict()
    qs = pq.read_table(out / "_work" / "queries").to_pydict()
    scores = np.stack(qs["embedding"]) @ np.stack(docs["embedding"]).T
    for qid, row in zip(qs["query_id"], scores):  # the candidates are the raw neighbours, positives included
        mine = got[qid]
        assert np.allclose(mine["candidate_scores"], np.sort(row)[::-1][: len(mine["candidate_scores"])], atol=1e-5)
        want = dict(zip(docs["id"], row))
        assert np.allclose([want[d] for d in mine["candidate_ids"]], mine["candidate_scores"], atol=1e-5), qid


def test_a_stage_that_stops_moving_ends_with_a_clear_error(ray_local, monkeypatch):
    """One block never finishes (as a task waiting on an actor that has nowhere to restart): the stage ends after
    KALM_STALL_S with a StallError naming it and how many rows were done, instead of hanging."""
    import ray

    from pipelines.faults import StallError
    from pipelines.progress import track

    monkeypatch.setenv("KALM_STALL_S", "4")
    monkeypatch.setenv("KALM_PROGRESS_S", "1")

    def tag(b):
        import numpy as np

        b["_source"], b["_row"] = np.array(["f"] * len(b["id"]), dtype=object), b["id"]
        return b

    def stuck(b):
        if 37 in b["id"].tolist():
            time.sleep(120)  # bounded, should the cancelled task outlive the stage
        return b

    ds = ray.data.range(100, override_num_blocks=10).map_batches(tag, batch_size=None)
    ds = ds.map_batches(stuck, batch_size=None, num_cpus=0.25)
    # An application's SIGINT handler that lets the first interrupt pass (as Ray defers SIGINT inside some calls):
    # the watchdog interrupts again until the stage has ended.
    seen = []

    def handler(signum, frame):
        seen.append(time.perf_counter())
        if len(seen) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    t0 = time.perf_counter()
    try:
        with pytest.raises(StallError, match=r"stuck stage: no row finished for 4 s \(\d+ done\)") as e:
            with track("stuck stage", lambda: 100) as tracker:
                for _ in tracker.wrap(ds).iter_batches(batch_size=None):
                    pass
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - t0 < 60 and "rerun the same command to resume" in str(e.value)
    assert "(100 done)" not in str(e.value)
    assert len(seen) == 2 and seen[1] - seen[0] >= 9  # the second one, REINTERRUPT_S after the first


def test_index_shards_no_node_can_hold_end_with_a_clear_error(ray_local, monkeypatch):
    """A shard reserving more memory than any node has would wait forever for a node: it ends with StallError
    naming the setting to lower."""
    from pipelines.faults import StallError
    from pipelines.mine import MineJobConfig, _ready, _start_shards

    monkeypatch.setenv("KALM_STALL_S", "3")
    shards = _start_shards(MineJobConfig(), 32, [10**12])  # ~160 TB of vectors
    with pytest.raises(StallError, match="index shards did not start within 3 s: no node has the memory"):
        _ready(shards, MineJobConfig())
