"""`kalm distill` end to end on the bundled sample (tiny random student and teacher, so it runs in CI): the run is
interrupted after its embedding stage and rerun, which must reuse the embeddings; every output loads with
`datasets`; lists are aligned; no positive is among its query's negatives; the soft labels equal the teacher called
directly; the report renders its plots in a real headless browser; progress lines count every row."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import mine
from pipelines.cli import EXIT_RUN_FAILED, main
from pipelines.defaults import SAMPLE_CORPUS, SAMPLE_QUERIES
from pipelines.report import score_series
from tests.reference import reference

TEACHER_MAX_LENGTH = 48


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def distilled(ray_local, tiny_bert, tiny_qwen2, tmp_path_factory):
    """One distill run, interrupted after embedding (the index stage raises), then rerun to the end."""
    out = tmp_path_factory.mktemp("distill") / "out"
    args = ["distill", "--output", str(out), "--model", tiny_bert, "--teacher", tiny_qwen2, "--teacher-query-prompt",
            "", "--teacher-max-length", str(TEACHER_MAX_LENGTH), "--num-negatives", "4", "--range-max", "20",
            "--relative-margin", "0.02", "--report-samples", "5"]  # fmt: skip
    mp = pytest.MonkeyPatch()
    mp.setenv("KALM_PROGRESS_S", "1")

    def interrupt(*a, **k):
        raise Interrupted("stopped after the embedding stage")

    mp.setattr(mine, "_open_index", interrupt)
    assert main(args) == EXIT_RUN_FAILED  # the CLI's last line names the failure, without a traceback to read
    mp.undo()
    first = {n: json.loads((out / "_work" / n / "_manifest.json").read_text()) for n in ("corpus", "queries")}
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "_work").rglob("part-*.parquet")}
    assert not (out / "candidates").exists()

    handler, log = _Capture(), logging.getLogger("pipelines.progress")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    mp.setenv("KALM_PROGRESS_S", "1")
    try:
        assert main(args) == 0
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        mp.undo()
    report = json.loads((out / "_manifest.json").read_text())
    return {"out": out, "report": report, "first": first, "mtimes": mtimes, "progress": handler.lines,
            "teacher": tiny_qwen2}  # fmt: skip


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_rerun_after_an_interruption_reuses_the_embeddings(distilled):
    out, report, first = distilled["out"], distilled["report"], distilled["first"]
    n_corpus, n_queries = pq.read_metadata(SAMPLE_CORPUS).num_rows, pq.read_metadata(SAMPLE_QUERIES).num_rows
    assert first["corpus"]["counts"]["rows_in"] == n_corpus and first["queries"]["counts"]["rows_in"] == n_queries
    stages = {s["stage"]: s for s in report["stages"]}
    # The rerun embedded nothing: every row was found committed by the interrupted run, and no vector file changed.
    assert stages["embed corpus"]["rows_this_run"] == 0 and stages["embed corpus"]["rows_in"] == n_corpus
    assert stages["embed queries"]["rows_this_run"] == 0 and stages["embed queries"]["rows_in"] == n_queries
    again = {n: json.loads((out / "_work" / n / "_manifest.json").read_text()) for n in ("corpus", "queries")}
    assert all(again[n]["attempt"]["number"] == 1 and again[n]["attempt"]["rows_processed"] == 0 for n in again)
    assert {p: p.stat().st_mtime_ns for p in distilled["mtimes"]} == distilled["mtimes"]
    # ...and did every later stage: the index was built, all queries searched and scored.
    assert stages["index (built, flat)"]["rows_this_run"] == n_corpus
    mined = stages["search, teacher, select"]
    assert mined["rows_this_run"] == mined["rows_in"] == n_queries
    q = report["queries"]
    assert q["rows_in"] == q["rows_out"] + q["rows_rejected"] == n_queries
    assert report["command"] == "distill" and report["teacher"]["kind"] == "bi-encoder"


def test_outputs_load_with_datasets_aligned_and_without_positives_among_negatives(distilled):
    import datasets

    out, report = distilled["out"], distilled["report"]
    train = datasets.load_dataset("json", data_files=str(out / "train" / "part-*.jsonl"), split="train")
    st = datasets.load_dataset("parquet", data_files=str(out / "train-st" / "part-*.parquet"), split="train")
    cand = datasets.load_dataset("parquet", data_files=str(out / "candidates" / "part-*.parquet"), split="train")
    assert len(train) == report["training_files"]["train"]["rows_out"] > 0
    assert len(cand) == report["queries"]["rows_out"]
    queries = {r["query_id"]: r for r in pq.read_table(SAMPLE_QUERIES).to_pylist()}
    twins = {}  # queries with the same text share their positives
    for r in queries.values():
        twins.setdefault(r["query"].strip().lower(), set()).update(r["positive_ids"])
    for r in train:
        assert len(r["pos"]) == len(r["pos_scores"]) == len(r["pos_ids"]) >= 1
        assert len(r["neg"]) == len(r["neg_scores"]) == len(r["neg_ids"])
        assert r["query"] == queries[r["query_id"]]["query"]
        assert not set(r["neg_ids"]) & twins[r["query"].strip().lower()]
        assert not set(r["neg"]) & set(r["pos"])
    for r in cand:
        assert len(r["candidate_ids"]) == len(r["candidate_scores"]) == len(r["teacher_candidate_scores"])
        assert len(r["pos_ids"]) == len(r["pos_scores"]) == len(r["teacher_pos_scores"])
    full = [r for r in train if len(r["neg"]) >= 4]
    assert len(st) == sum(len(r["pos"]) for r in full)  # one row per (query, positive) with 4 negatives
    assert st.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "negative_4"]


def test_soft_labels_equal_the_teacher_called_directly(distilled):
    """pos_scores/neg_scores are the teacher's cosine: transformers' own forward, mean-pooled by hand, one text at a
    time, truncated as the run was."""
    import datasets

    out, teacher = distilled["out"], distilled["teacher"]
    train = datasets.load_dataset("json", data_files=str(out / "train" / "part-*.jsonl"), split="train")
    rows = [r for r in train if r["neg"]][:4]
    assert rows
    for r in rows:
        vecs = reference(teacher, [r["query"], *r["pos"], *r["neg"]], max_length=TEACHER_MAX_LENGTH)
        want = vecs[1:] @ vecs[0]
        assert np.abs(np.array(r["pos_scores"] + r["neg_scores"]) - want).max() <= 1e-4


def test_progress_lines_count_every_row(distilled):
    lines = distilled["progress"]
    n_queries = pq.read_metadata(SAMPLE_QUERIES).num_rows
    final = [x for x in lines if x.startswith("search, teacher, select (candidates):")]
    assert final and f"{n_queries:,} / {n_queries:,} rows (100.0%)" in final[-1]
    assert any(x.startswith("training-file:train (train):") for x in lines)


def test_report_scores_series_by_hand():
    rows = [
        {"pos_scores": [0.9, 0.7], "teacher_pos_scores": [5.0, 4.0], "candidate_ids": ["a", "b", "c"],
         "candidate_scores": [0.8, 0.6, 0.5], "neg_ids": ["c", "a"], "neg_scores": [1.0, 4.5]},
        {"pos_scores": [], "candidate_ids": [], "candidate_scores": [], "neg_ids": [], "neg_scores": []},
    ]  # fmt: skip
    student, teacher = score_series(rows)
    assert student.pos.tolist() == [0.9, 0.7] and student.neg.tolist() == [0.5, 0.8]
    assert np.allclose(student.margin, [0.2, -0.1])  # lowest positive 0.7 minus each negative
    assert teacher.neg.tolist() == [1.0, 4.5] and np.allclose(teacher.margin, [3.0, -0.5])


def test_report_renders_its_plots_in_a_headless_browser(distilled):
    """Debian's chromium, driven by playwright: every <img> of report.html loaded and decoded (naturalWidth > 0),
    the plots the run calls for are there, and the page shows the run's own counts."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("KALM_REQUIRE_BROWSER"):
            pytest.fail("KALM_REQUIRE_BROWSER is set but chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    out, report = distilled["out"], distilled["report"]
    page_path = out / "report.html"
    assert report["report_html"].endswith("report.html") and page_path.is_file()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-background-networking"])  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete, "
                                                      "e.naturalWidth, e.naturalHeight])")  # fmt: skip
            text = page.inner_text("body")
            page.screenshot(path=str(out / "report-screenshot.png"), full_page=True)
        finally:
            browser.close()
    srcs = {s for s, *_ in images}
    assert {"report/scores_student.png", "report/scores_teacher.png", "report/margins.png", "report/rules.png",
            "report/stages.png"} <= srcs  # fmt: skip
    assert all(complete and w > 100 and h > 100 for _, complete, w, h in images), images
    assert f"{report['queries']['rows_out']:,} of {report['queries']['rows_in']:,} queries kept" in text
    assert "search, teacher, select" in text and text.count("negative") >= 5


def test_progress_arithmetic_by_hand():
    import pyarrow as pa

    from pipelines.progress import count_tasks, eta_s, input_rows, progress_line

    assert (count_tasks(2.0), count_tasks(0.5), count_tasks(16.0)) == (2, 2, 16)  # one per CPU, at least two
    assert eta_s(250, 1000, 50.0) == 15.0 and eta_s(10, None, 5.0) is None and eta_s(0, 100, 0.0) is None
    assert progress_line("embed (corpus)", 250, 1000, 50.0, 75.0) == (
        "embed (corpus): 250 / 1,000 rows (25.0%), 50.0 rows/s, 1m15s elapsed, ETA 15s"
    )
    assert "total unknown" in progress_line("embed (x)", 5, None, 1.0, 5.0)
    # an expanding stage (one row per positive) keeps a row's outputs together: each run is one input row
    batch = pa.table({"_source": ["a", "a", "a", "b", "a"], "_row": [0, 0, 1, 0, 1]})
    assert input_rows(batch) == 4


def test_steady_rate_by_hand():
    """The steady rate leaves out the start and the drain; the counter's timeline stays bounded and every point it
    keeps is a true one, so the rate between kept points is unchanged."""
    from pipelines.progress import TIMELINE_POINTS, RowCounter, bunched, steady_rate

    # 10 s of start-up before the first block, then 100 rows/s, then a slow drain (the last block after 20 s).
    points = [(10.0 + i, 100 * (i + 1)) for i in range(9)] + [(38.0, 1000)]
    assert steady_rate(points) == pytest.approx(100.0)  # blocks at 100 (10%) ... 900 (90%): 800 rows in 8 s
    assert 1000 / 38.0 < 30  # the whole-run rate the start and drain dilute
    # Two replicas started together deliver 1,024-row blocks in pairs every 20 s (102.4 rows/s). Rows between the
    # window's ends over the time between them depend on where the window cuts a pair (10%-85%: 11,264 rows in
    # 120 s = 93.9), and so does a slope through every block (98.4); one point per pair gives the rate.
    pairs = [(t, n) for k in range(8) for t, n in ((20.0 * k, 2048 * k + 1024), (20.0 * k + 0.01, 2048 * k + 2048))]
    for window in ((0.1, 0.9), (0.1, 0.85), (0.0, 1.0)):
        assert steady_rate(pairs, window) == pytest.approx(102.4, rel=1e-3)
    assert bunched(pairs[:4], 1.0) == [pairs[1], pairs[3]]
    # A short run: two replicas' first tasks, three 334-row output blocks each, at once, then one more task each.
    # Nine blocks in the window, but three bunches: no steady state (block by block, a slope of 71.6 rows/s made of
    # what two tasks happened to take; the bench's x1 run read 174.5 that way).
    short = [(0.0, 334), (0.02, 668), (0.05, 1002), (0.3, 1336), (0.31, 1670), (0.33, 2004), (21.0, 2338),
             (21.01, 2672), (21.02, 3006), (23.0, 3340), (23.01, 3674), (23.03, 4008)]  # fmt: skip
    assert steady_rate(short) is None
    # A kalm embed x1 run on 2 busy cores (84cc77b): three calls' 334-row blocks reached the counter up to 2.6 s
    # apart; bunched within 1% of the 13 s run they made five bunches and a rate of 209 rows/s, twice the model's.
    x1 = [(0.0, 334), (0.2, 690), (2.78, 1024), (3.78, 1358), (3.78, 1692), (3.9, 2048), (9.93, 2498),
          (13.21, 2946)]  # fmt: skip
    assert steady_rate(x1) is None
    assert steady_rate([(1.0, 50)]) is None and steady_rate([]) is None
    assert steady_rate([(0.0, 100), (1.0, 200), (2.0, 300), (3.0, 400)], (0.0, 1.0)) is None  # too few to tell
    counter = RowCounter()  # the actor's class, called directly
    for _ in range(5000):
        counter.add("k", 2)
    line = counter.timeline("k")
    rows = [n for _, n in line]
    assert rows[-1] == counter.get("k") == 10_000 and TIMELINE_POINTS <= len(line) <= 2 * TIMELINE_POINTS + 1
    # Every point a true count, evenly spaced over the whole run (a stride of 4 blocks: 8 rows), then the last block.
    assert set(np.diff(rows[:-1])) == {8} and rows[0] == 8
    counter.forget("k")
    assert counter.timeline("k") == [] and counter.get("k") == 0


def test_select_reuses_a_distill_output_with_the_teachers_labels(distilled, tmp_path):
    """`kalm select` re-applies other rules to a distill run's candidates table: no search, no teacher, and the
    labels stay the teacher's scores of the chosen candidates."""
    out = distilled["out"]
    assert main(["select", "--candidates", str(out), "--output", str(tmp_path / "sel"), "--num-negatives", "2",
                 "--range-max", "20", "--relative-margin", "0.02"]) == 0  # fmt: skip
    rows = pq.read_table(tmp_path / "sel" / "candidates").to_pylist()
    assert rows and all(len(r["neg_ids"]) <= 2 for r in rows)
    for r in rows:
        teacher_of = dict(zip(r["candidate_ids"], r["teacher_candidate_scores"]))
        assert r["neg_scores"] == [teacher_of[i] for i in r["neg_ids"]]
    assert not (tmp_path / "sel" / "_work").exists()
