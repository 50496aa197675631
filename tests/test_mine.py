"""`kalm mine` and `kalm select` end to end: fidelity to sentence-transformers' `mine_hard_negatives` on the bundled
sample (JSONL and column outputs, and a re-selection), teacher rescoring, the saved index, and bad input."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.cli import main
from pipelines.defaults import SAMPLE_CORPUS, SAMPLE_QUERIES
from tests.conftest import WORDS
from tests.reference import cross_scores


def _st_mine(model, pairs, corpus, cache, **rules):
    from sentence_transformers.util import mine_hard_negatives

    return mine_hard_negatives(pairs, model, corpus=corpus, sampling_strategy="top", output_format="n-tuple",
                               batch_size=64, cache_folder=cache, verbose=False, **rules)  # fmt: skip


def _tuples(rows, n, anchor="anchor"):
    """sentence-transformers names the anchor column after its input's ("query" here)."""
    return {(r[anchor], r["positive"], *(r[f"negative_{i}"] for i in range(1, n + 1))) for r in rows}


def test_negatives_equal_sentence_transformers_mine_hard_negatives(ray_local, default_model, tmp_path):
    """Exact search, the real default model, the same rules (window, margins, top sampling), no prompts: every
    query gets the same negatives, in the same order, as sentence-transformers picks; the column form holds the
    same tuples as its n-tuple output; and `kalm select` re-applying other rules to the candidates table, without a
    search, again matches sentence-transformers mining from scratch with those rules. The corpus is the sample's
    positives and every third other passage (1,215 of 2,946), which keeps both tools' embedding time down."""
    import datasets
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    queries = pq.read_table(SAMPLE_QUERIES).to_pylist()
    positives = {p for q in queries for p in q["positive_ids"]}
    corpus = [r for i, r in enumerate(pq.read_table(SAMPLE_CORPUS).to_pylist()) if r["id"] in positives or i % 3 == 0]
    pq.write_table(pa.Table.from_pylist(corpus), tmp_path / "corpus.parquet")
    text = {r["id"]: r["text"] for r in corpus}
    out = tmp_path / "mine"
    rc = main(["mine", "--output", str(out), "--model", default_model, "--query-prompt", "", "--num-negatives", "5",
               "--range-min", "2", "--range-max", "30", "--relative-margin", "0.05", "--corpus",
               str(tmp_path / "corpus.parquet")])  # fmt: skip
    assert rc == 0
    ours = {r["query_id"]: r for r in pq.read_table(out / "candidates").to_pylist()}
    assert len(ours) == len(queries)

    pairs = Dataset.from_list([{"query": q["query"], "positive": text[p]} for q in queries for p in q["positive_ids"]])
    model = SentenceTransformer(default_model, device="cpu")
    cache = str(tmp_path / "st-cache")
    st = _st_mine(model, pairs, list(text.values()), cache, num_negatives=5, range_min=2, range_max=30,
                  relative_margin=0.05)  # fmt: skip
    theirs = {}
    for row in st:
        theirs.setdefault(row["query"], [row[f"negative_{i}"] for i in range(1, 6)])
    compared = same = 0
    for q in queries:  # queries sharing a text share their positives, as sentence-transformers groups them
        if q["query"] in theirs:
            compared += 1
            same += [text[i] for i in ours[q["query_id"]]["neg_ids"]] == theirs[q["query"]]
    print(f"fidelity: {same} of {compared} queries pick the same 5 negatives as mine_hard_negatives")
    assert compared >= 250 and same == compared
    # queries sentence-transformers drops (fewer than 5 survivors) are the ones we keep short
    short = {q["query"] for q in queries if len(ours[q["query_id"]]["neg_ids"]) < 5}
    assert short == {q["query"] for q in queries if q["query"] not in theirs}

    report = json.loads((out / "_manifest.json").read_text())
    assert report["queries"]["rows_in"] == len(queries)
    assert report["candidates_removed_by_rule"]["relative_margin"] > 0
    assert report["pool"] == 30 + report["max_positives"] + 1  # room for the positives and the query's own text
    assert all(len(r["candidate_ids"]) == report["pool"] for r in ours.values())

    # The training file: KaLM/FlagEmbedding JSONL, texts matching the ids, scores aligned; loadable by datasets.
    train = datasets.load_dataset("json", data_files=[str(f) for f in sorted((out / "train").glob("part-*.jsonl"))],
                                  split="train")  # fmt: skip
    assert train.num_rows == len(queries) == report["training_files"]["train"]["rows_out"]
    query_text = {q["query_id"]: q["query"] for q in queries}
    for row in train:
        mine = ours[row["query_id"]]
        assert row["neg"] == [text[i] for i in mine["neg_ids"]] and row["pos"] == [text[i] for i in mine["pos_ids"]]
        assert len(row["neg_scores"]) == len(row["neg"]) and len(row["pos_scores"]) == len(row["pos"])
        assert row["prompt"] == "" and row["query"] == query_text[row["query_id"]]

    # The column form: the same (anchor, positive, negative_1..5) tuples as sentence-transformers' n-tuple output.
    cols = datasets.load_dataset("parquet", data_files=[str(f) for f in sorted((out / "train-st").glob("*.parquet"))],
                                 split="train")  # fmt: skip
    assert cols.column_names == ["anchor", "positive", *(f"negative_{i}" for i in range(1, 6))]
    assert _tuples(cols, 5) == _tuples(st, 5, "query")
    st_counts = report["training_files"]["train-st"]
    assert st_counts["rows_in"] == len(queries) and st_counts["rows_out"] == cols.num_rows
    assert st_counts["rejected_by_reason"] == {"fewer_negatives_than_columns": len(short)}

    # kalm select: other rules on the same candidates, no search; equal to sentence-transformers mining afresh.
    sel = tmp_path / "select"
    t0 = time.perf_counter()
    rc = main(["select", "--candidates", str(out), "--output", str(sel), "--num-negatives", "3", "--range-max", "20",
               "--absolute-margin", "0.1"])  # fmt: skip
    print(f"kalm select: {time.perf_counter() - t0:.1f} s")
    assert rc == 0
    again = {r["query_id"]: r for r in pq.read_table(sel / "candidates").to_pylist()}
    st2 = _st_mine(model, pairs, list(text.values()), cache, num_negatives=3, range_min=0, range_max=20,
                   absolute_margin=0.1)  # fmt: skip
    theirs2 = {}
    for row in st2:
        theirs2.setdefault(row["query"], [row[f"negative_{i}"] for i in range(1, 4)])
    for q in queries:
        if q["query"] in theirs2:
            assert [text[i] for i in again[q["query_id"]]["neg_ids"]] == theirs2[q["query"]], q["query_id"]
    sel_cols = pq.read_table(sel / "train-st").to_pylist()
    assert _tuples(sel_cols, 3) == _tuples(st2, 3, "query")
    sel_report = json.loads((sel / "_manifest.json").read_text())
    assert sel_report["command"] == "select" and sel_report["queries"]["rows_in"] == len(queries)
    assert sel_report["candidates_removed_by_rule"]["absolute_margin"] > 0
    # Rules needing more neighbours than the candidates kept are refused before any work, naming the fix.
    rc = main(["select", "--candidates", str(out), "--output", str(tmp_path / "wide"), "--range-max", "60"])
    assert rc == 2 and not (tmp_path / "wide").exists()


def _words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


def _small_inputs(tmp_path):
    """40 passages and 8 queries: one without positives, one whose only positive is not in the corpus, one with a
    positive in the corpus and one not."""
    corpus = [{"id": f"d{i}", "text": _words(i, 5 + i % 7)} for i in range(40)]
    queries = [{"query_id": f"q{i}", "query": _words(i + 100, 4), "positive_ids": [f"d{i * 3}"]} for i in range(8)]
    queries[5]["positive_ids"] = []
    queries[6]["positive_ids"] = ["nowhere"]
    queries[7]["positive_ids"] = ["d7", "gone"]
    pq.write_table(pa.Table.from_pylist(corpus), tmp_path / "corpus.parquet")
    pq.write_table(pa.Table.from_pylist(queries, schema=pa.schema([("query_id", pa.string()), ("query", pa.string()),
                   ("positive_ids", pa.list_(pa.string()))])), tmp_path / "queries.parquet")  # fmt: skip
    return corpus, queries


def test_teacher_rescores_candidates_and_the_index_is_saved_and_reused(
    ray_local, tiny_bert, tiny_cross_encoder, tmp_path
):
    """A cross-encoder teacher rescores positives and candidates: its scores equal transformers' own forward on the
    same pairs, selection uses them (margin against the lowest teacher positive), and bad rows are counted. A second
    run loading the saved index from the first gives the same candidates without embedding the corpus."""
    corpus, queries = _small_inputs(tmp_path)
    text = {r["id"]: r["text"] for r in corpus}
    out = tmp_path / "mine"
    args = ["--queries", str(tmp_path / "queries.parquet"), "--corpus", str(tmp_path / "corpus.parquet"),
            "--model", tiny_bert, "--query-prompt", "", "--num-negatives", "3", "--range-max", "12",
            "--absolute-margin", "0.0", "--teacher", tiny_cross_encoder, "--teacher-kind", "cross-encoder",
            "--teacher-max-length", "32"]  # fmt: skip
    assert main(["mine", "--output", str(out), *args]) == 0
    rows = {r["query_id"]: r for r in pq.read_table(out / "candidates").to_pylist()}
    rejects = {r["query_id"]: r["reason"] for r in pq.read_table(out / "candidates" / "_rejects").to_pylist()}
    assert rejects == {"q5": "no_positives", "q6": "positives_not_in_corpus"}
    assert set(rows) == {f"q{i}" for i in (0, 1, 2, 3, 4, 7)}
    assert rows["q7"]["pos_ids"] == ["d7"] and rows["q7"]["missing_positives"] == 1
    report = json.loads((out / "_manifest.json").read_text())
    assert report["queries"]["rejected_by_reason"] == {"no_positives": 1, "positives_not_in_corpus": 1}
    assert report["positives_missing_from_corpus"] == 1 and report["teacher"]["kind"] == "cross-encoder"

    qtext = {q["query_id"]: q["query"] for q in queries}
    for qid in ("q0", "q7"):
        r = rows[qid]
        ref = cross_scores(tiny_cross_encoder, [{"query": qtext[qid], "pos": [text[i] for i in r["pos_ids"]],
                                                 "neg": [text[i] for i in r["candidate_ids"]]}], 32)[0]  # fmt: skip
        got = r["teacher_pos_scores"] + r["teacher_candidate_scores"]
        assert np.abs(np.array(got) - np.array(ref)).max() <= 1e-4
    for r in rows.values():
        teacher_of = dict(zip(r["candidate_ids"], r["teacher_candidate_scores"]))
        assert r["neg_scores"] == [teacher_of[i] for i in r["neg_ids"]]
        assert r["neg_scores"] == sorted(r["neg_scores"], reverse=True)
        assert all(s <= min(r["teacher_pos_scores"]) for s in r["neg_scores"])  # absolute margin 0 on the teacher
        assert not set(r["neg_ids"]) & set(r["positive_ids"])
    train = [json.loads(x) for f in sorted((out / "train").glob("*.jsonl")) for x in f.read_text().splitlines()]
    for t in train:  # the labels are the teacher's
        assert t["pos_scores"] == rows[t["query_id"]]["teacher_pos_scores"]

    meta = json.loads((out / "_work" / "index" / "_index.json").read_text())
    assert meta["vectors"] == len(corpus) and meta["index_type"] == "flat"
    again = tmp_path / "again"
    assert main(["mine", "--output", str(again), "--index", str(out / "_work" / "index"), *args]) == 0
    assert not (again / "_work" / "corpus").exists()  # the corpus was not embedded again
    second = {r["query_id"]: r for r in pq.read_table(again / "candidates").to_pylist()}
    for qid, r in rows.items():
        assert second[qid]["candidate_ids"] == r["candidate_ids"] and second[qid]["neg_ids"] == r["neg_ids"]
        assert np.allclose(second[qid]["candidate_scores"], r["candidate_scores"], atol=1e-6)


def test_empty_or_malformed_inputs_fail_before_any_work(tmp_path, capsys):
    """An empty corpus, a missing column and a missing saved index: exit 2 naming the problem, before Ray starts."""
    _small_inputs(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    base = ["mine", "--queries", str(tmp_path / "queries.parquet"), "--output", str(tmp_path / "o")]
    t0 = time.perf_counter()
    assert main([*base, "--corpus", str(empty)]) == 2
    assert "empty.jsonl' holds no JSON object lines" in capsys.readouterr().err
    assert main([*base, "--corpus", str(tmp_path / "queries.parquet")]) == 2
    assert "missing column(s) ['id', 'text']" in capsys.readouterr().err
    assert main([*base, "--corpus", str(tmp_path / "corpus.parquet"), "--index", str(tmp_path / "nope")]) == 2
    assert "holds no saved index" in capsys.readouterr().err
    assert main([*base, "--num-negatives", "5", "--range-max", "3"]) == 2
    assert "widen range_max" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "o").exists()


def test_flagembedding_rows_without_a_corpus_mine_from_their_own_texts(ray_local, tiny_bert, tmp_path):
    """KaLM/FlagEmbedding rows {query, pos, neg} (texts, no ids, no corpus): the pos and neg texts form the pool,
    each distinct text embedded once; a query's negatives come from that pool and never equal its positives; bad
    rows are set aside with their reason and every row is accounted for."""
    rows = [{"query": _words(i + 200, 4), "pos": [_words(i, 6)], "neg": [_words(i + 50, 5), _words(i + 51, 5)]}
            for i in range(12)]  # fmt: skip
    rows[3]["pos"] = [_words(3, 6), _words(7, 6)]  # two positives, one of them another query's positive
    rows[4]["neg"] = [_words(5, 6)]  # another query's positive as this one's given negative: same text, one id
    bad = [{"query": "", "pos": [_words(1, 3)], "neg": []}, {"query": "lonely", "pos": [], "neg": [_words(2, 2)]},
           {"query": "null text", "pos": [None], "neg": []}]  # fmt: skip
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows + bad))
    out = tmp_path / "mine"
    assert main(["mine", "--queries", str(src), "--output", str(out), "--model", tiny_bert, "--query-prompt", "",
                 "--num-negatives", "2", "--range-max", "10"]) == 0  # fmt: skip
    report = json.loads((out / "_manifest.json").read_text())
    assert report["text_positives"] is True
    assert report["queries"]["rows_in"] == len(rows)  # the bad rows were set aside before the search
    prep = json.loads((out / "_work" / "text-queries" / "_manifest.json").read_text())["counts"]
    assert prep["rows_in"] == len(rows) + len(bad) and prep["rows_out"] == len(rows)
    assert prep["rejected_by_reason"] == {"pos_empty": 1, "pos_text_null": 1, "query_empty": 1}
    distinct = {t for r in rows for t in (*r["pos"], *r["neg"])}
    pool = json.loads((out / "_work" / "pool-vectors" / "_manifest.json").read_text())["counts"]
    assert pool["rows_out"] == len(distinct)  # each text once; repeats across rows counted as id_duplicate
    assert pool["rejected_by_reason"] == {"id_duplicate": sum(len(set(r["pos"] + r["neg"])) for r in rows)
                                          - len(distinct)}  # fmt: skip
    train = [json.loads(x) for f in sorted((out / "train").glob("*.jsonl")) for x in f.read_text().splitlines()]
    assert len(train) == len(rows)
    by_query = {r["query"]: r for r in rows}
    for t in train:
        src_row = by_query[t["query"]]
        assert sorted(t["pos"]) == sorted(src_row["pos"])
        assert t["neg"] and not set(t["neg"]) & set(src_row["pos"]) and set(t["neg"]) <= distinct


def test_positive_ids_of_another_type_than_the_corpus_ids_are_refused(tmp_path, capsys):
    """Integer positive ids against string corpus ids would match nothing and reject every query: refused upfront."""
    _small_inputs(tmp_path)
    pq.write_table(pa.table({"query_id": ["a"], "query": ["x y"], "positive_ids": [[1, 2]]}), tmp_path / "q.parquet")
    assert main(["mine", "--queries", str(tmp_path / "q.parquet"), "--corpus", str(tmp_path / "corpus.parquet"),
                 "--output", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "must be a list of corpus ids of the corpus id type (string); found list<element: int64>" in (
        capsys.readouterr().err
    )
