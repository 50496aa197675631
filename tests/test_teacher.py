"""Teacher scoring: pure fold/softmax, the operator against independent references (sentence-transformers for a
real bi-encoder, a direct transformers forward for a cross-encoder), and `kalm score` end to end."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.model import inspect_model
from operators.teacher import TeacherConfig, TeacherScorer, VectorCache, flatten_pairs, fold_scores, softmax
from operators.validate import REJECT_COLUMN, TrainingRowsConfig, training_reject_reasons, validate_training_rows
from pipelines.cli import EXIT_BAD_CONFIG, main
from tests.conftest import WORDS
from tests.reference import cross_scores, reference


def test_flatten_and_fold_keep_alignment():
    pos = [["a"], ["b", "c"], ["d"]]
    neg = [[], ["x"], ["y", "z", "w"]]
    row_of, n_pos, n_neg = flatten_pairs(pos, neg)
    assert row_of.tolist() == [0, 1, 1, 1, 2, 2, 2, 2]
    scores = np.arange(8, dtype=float)  # pair k has score k
    p, n = fold_scores(scores, n_pos, n_neg)
    assert [x.tolist() for x in p] == [[0], [1, 2], [4]]
    assert [x.tolist() for x in n] == [[], [3], [5, 6, 7]]


def test_softmax_matches_hand_computation():
    probs = softmax(np.array([1.0, 0.0]), 0.5)  # e^2 / (e^2 + 1)
    assert probs.tolist() == pytest.approx([np.e**2 / (np.e**2 + 1), 1 / (np.e**2 + 1)])
    assert softmax(np.array([1000.0, 999.0]), 0.05).sum() == pytest.approx(1.0)  # stable at large logits


def test_training_row_reasons():
    q = np.array(["q", None, 3, " ", "q", "q", "q", "q"], dtype=object)
    pos = np.array([["a"], ["a"], ["a"], ["a"], None, [], ["a", None], ["a"]], dtype=object)
    neg = np.array([[], [], [], [], [], [], [], "not a list"], dtype=object)
    assert training_reject_reasons(q, pos, neg).tolist() == [
        "", "query_missing", "query_not_string", "query_empty", "pos_missing", "pos_empty", "pos_text_null",
        "neg_not_list",
    ]  # fmt: skip


def _words(i, n):
    return " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(n))


def _rows():
    """0, 1 and many negatives; a document repeated across rows and within a row; a document far over max_length."""
    long_doc = _words(3, 300)
    return [
        {"query": _words(0, 4), "pos": [_words(1, 6)], "neg": []},
        {"query": _words(1, 3), "pos": [_words(2, 5), _words(1, 6)], "neg": [_words(4, 7)]},
        {"query": _words(2, 5), "pos": [_words(5, 4)], "neg": [long_doc, _words(1, 6), _words(6, 3), _words(6, 3)]},
        {"query": _words(0, 4), "pos": [long_doc], "neg": [_words(7, 9), _words(8, 2)]},
    ]


def _batch(rows):
    b = {k: np.array([r[k] for r in rows] + [], dtype=object) for k in ("query", "pos", "neg")}
    b[REJECT_COLUMN] = np.full(len(rows), "", dtype=object)
    return validate_training_rows(b, cfg=TrainingRowsConfig())


@pytest.mark.parametrize("max_tokens,max_rows", [(64, 1), (512, 3), (4096, 64)])
def test_cross_encoder_equals_direct_forward_whatever_the_batching(tiny_cross_encoder, max_tokens, max_rows):
    rows = _rows()
    cfg = TeacherConfig(model=inspect_model(tiny_cross_encoder), kind="cross-encoder", max_length=32,
                        max_tokens=max_tokens, max_rows=max_rows, temperature=0.05)  # fmt: skip
    out = TeacherScorer(cfg)(_batch(rows)).to_pydict()
    expected = cross_scores(tiny_cross_encoder, rows, 32)
    for i, r in enumerate(rows):
        got = list(out["pos_scores"][i]) + list(out["neg_scores"][i])
        assert len(out["pos_scores"][i]) == len(r["pos"]) and len(out["neg_scores"][i]) == len(r["neg"])
        assert np.abs(np.array(got) - np.array(expected[i])).max() <= 1e-4
        assert np.allclose(out["teacher_probs"][i], softmax(np.array(expected[i]), 0.05), atol=1e-3)
    assert out["neg_scores"][2][2] == out["neg_scores"][2][3]  # the same pair twice, scored once


def test_cross_encoder_sigmoid(tiny_cross_encoder):
    rows = _rows()[:2]
    cfg = TeacherConfig(model=inspect_model(tiny_cross_encoder), kind="cross-encoder", max_length=32,
                        activation="sigmoid")  # fmt: skip
    out = TeacherScorer(cfg)(_batch(rows)).to_pydict()
    expected = 1 / (1 + np.exp(-np.array(cross_scores(tiny_cross_encoder, rows, 32)[1])))
    assert np.abs(np.array(list(out["pos_scores"][1]) + list(out["neg_scores"][1])) - expected).max() <= 1e-4


def test_bi_encoder_vector_cache_gives_the_same_scores_and_stays_in_its_bounds(tiny_bert):
    """A later batch meeting the same texts takes their vectors from the cache, and the scores equal an uncached
    scorer's and the independent reference's; a cache too small for one vector holds nothing."""
    rows = _rows()
    info = inspect_model(tiny_bert)
    cached = TeacherScorer(TeacherConfig(model=info, kind="bi-encoder", max_length=32))
    first = cached(_batch(rows)).to_pydict()
    misses = cached.cache.misses
    again = cached(_batch(rows)).to_pydict()
    assert cached.cache.misses == misses and cached.cache.hits >= misses  # every text of the second batch was cached
    plain = TeacherScorer(TeacherConfig(model=info, kind="bi-encoder", max_length=32, cache_mb=0))
    ref = plain(_batch(rows)).to_pydict()
    assert len(plain.cache.items) == 0
    for out in (first, again):
        for col in ("pos_scores", "neg_scores"):
            assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(out[col], ref[col]))
    want = reference(tiny_bert, [rows[1]["query"], *rows[1]["pos"], *rows[1]["neg"]], max_length=32)
    assert np.allclose(list(first["pos_scores"][1]) + list(first["neg_scores"][1]), want[1:] @ want[0], atol=1e-4)
    small = VectorCache(max_bytes=3 * (32 * 4 + 10))
    for i in range(10):
        small.put(f"text-{i:05d}", np.ones(32, dtype=np.float32))
    assert len(small.items) == 3 and small.bytes <= small.max_bytes and "text-00009" in small.items


def test_bi_encoder_equals_sentence_transformers_cosine_on_the_real_teacher():
    """all-mpnet-base-v2, the bundled teacher, against sentence-transformers on the same texts."""
    from sentence_transformers import SentenceTransformer

    from pipelines.defaults import default_teacher, sample_pairs

    path = default_teacher()
    rows = [json.loads(line) for line in open(sample_pairs()).readlines()[:4]]
    rows[1]["neg"] = []
    info = inspect_model(path)
    cfg = TeacherConfig(model=info, kind="bi-encoder", max_length=info.st_max_seq_length, pooling=info.st_pooling)
    out = TeacherScorer(cfg)(_batch(rows)).to_pydict()
    st = SentenceTransformer(path, device="cpu")
    for i, r in enumerate(rows):
        q = st.encode([r["query"]], normalize_embeddings=True)
        d = st.encode(r["pos"] + r["neg"], normalize_embeddings=True)
        expected = (d @ q[0]).tolist()
        got = list(out["pos_scores"][i]) + list(out["neg_scores"][i])
        assert len(got) == len(expected) and np.abs(np.array(got) - np.array(expected)).max() <= 1e-4


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_kalm_score_end_to_end_with_bad_rows(ray_local, tiny_cross_encoder, tmp_path):
    good = _rows() * 3  # 12 rows, split over blocks and batches below
    bad = [
        {"pos": ["a"], "neg": []},  # no query
        {"query": "q"},  # no pos
        {"query": "q", "pos": ["a"], "neg": "not a list"},
        {"query": "q", "pos": ["a", None], "neg": []},
        "{not json",
    ]
    src = tmp_path / "train.jsonl"
    _write_jsonl(src, good[:5] + bad + good[5:])
    out = tmp_path / "out"
    rc = main(["score", "--input", str(src), "--output", str(out), "--teacher", str(tiny_cross_encoder),
               "--teacher-kind", "cross-encoder", "--max-length", "32", "--batch-size", "3", "--block-mb", "0.001",
               "--temperature", "0.05", "--rows-per-file", "4"])  # fmt: skip
    assert rc == 0
    lines = [json.loads(x) for f in sorted(out.glob("part-*.jsonl")) for x in f.read_text().splitlines()]
    assert len(lines) == len(good)
    expected = {r["query"]: s for r, s in zip(good, cross_scores(tiny_cross_encoder, good, 32))}
    for line in lines:
        assert len(line["pos_scores"]) == len(line["pos"]) and len(line["neg_scores"]) == len(line["neg"])
        got = line["pos_scores"] + line["neg_scores"]
        assert np.abs(np.array(got) - np.array(expected[line["query"]])).max() <= 1e-4
        assert sum(line["teacher_probs"]) == pytest.approx(1.0)
    rejects = pq.read_table(out / "_rejects").to_pylist()
    assert sorted(r["reason"] for r in rejects) == sorted(
        ["query_missing", "pos_missing", "neg_wrong_type", "pos_text_null", "json_invalid"]
    )
    assert sorted(r["_row"] for r in rejects) == [5, 6, 7, 8, 9]  # their line numbers in the file
    m = json.loads((out / "_manifest.json").read_text())
    assert (m["counts"]["rows_in"], m["counts"]["rows_out"], m["counts"]["rows_rejected"]) == (17, 12, 5)

    import datasets  # the output is directly loadable as a training set

    ds = datasets.load_dataset("json", data_files=[str(f) for f in sorted(out.glob("part-*.jsonl"))], split="train")
    assert ds.num_rows == 12 and set(ds.column_names) >= {"query", "pos", "neg", "pos_scores", "neg_scores"}


def test_score_validates_inside_the_read_tasks(ray_local, tiny_cross_encoder, tmp_path):
    """Ray Data fuses the validation into the read only while it takes whole blocks: a batch size would undo it."""
    from pipelines.output import open_output
    from pipelines.progress import Tally
    from pipelines.score import ScoreJobConfig, build_dataset, plan

    src = tmp_path / "train.jsonl"
    _write_jsonl(src, _rows() * 3)
    job = ScoreJobConfig(input=str(src), teacher=str(tiny_cross_encoder), teacher_kind="cross-encoder",
                         max_length=32, batch_size=3, block_mb=0.001)  # fmt: skip
    out = open_output(str(tmp_path / "out"), job.storage(), {}, overwrite=False)
    ds = build_dataset(plan(job, gpus_in_cluster=0), out, Tally())
    assert sum(len(b["query"]) for b in ds.iter_batches(batch_size=None)) == 12
    assert "ReadProvenance->MapBatches(validate_training_table)" in ds.stats()


def test_score_refuses_input_without_query_column(tmp_path, tiny_cross_encoder, capsys):
    _write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "pos": ["a"]}])
    rc = main(["score", "--input", str(tmp_path / "x.jsonl"), "--teacher", str(tiny_cross_encoder)])
    assert rc == EXIT_BAD_CONFIG and "missing column(s) ['query']" in capsys.readouterr().err


def test_kalm_score_id_keyed_rows(ray_local, tiny_cross_encoder, tmp_path):
    """Rows of ids (what mining writes) are scored against the texts they point to; unknown ids are set aside."""
    docs = {f"d{i}": _words(i, 3 + i % 5) for i in range(12)}
    queries = {"q0": _words(20, 4), "q1": _words(21, 6)}
    pq.write_table(pa.table({"id": list(docs), "text": list(docs.values())}), tmp_path / "corpus.parquet")
    pq.write_table(pa.table({"query_id": list(queries), "query": list(queries.values())}), tmp_path / "q.parquet")
    rows = [
        {"query_id": "q0", "pos_ids": ["d1"], "neg_ids": ["d2", "d3", "d2"]},
        {"query_id": "q1", "pos_ids": ["d4", "d5"], "neg_ids": []},
        {"query_id": "q1", "pos_ids": ["d6"], "neg_ids": ["nope"]},  # unknown candidate id
        {"query_id": "zz", "pos_ids": ["d1"], "neg_ids": ["d2"]},  # unknown query id
    ]
    _write_jsonl(tmp_path / "cands.jsonl", rows)
    out = tmp_path / "out"
    rc = main(["score", "--input", str(tmp_path / "cands.jsonl"), "--queries", str(tmp_path / "q.parquet"),
               "--corpus", str(tmp_path / "corpus.parquet"), "--output", str(out), "--teacher", tiny_cross_encoder,
               "--teacher-kind", "cross-encoder", "--max-length", "32", "--output-format", "parquet"])  # fmt: skip
    assert rc == 0
    got = pq.read_table(out).to_pylist()
    assert sorted(got[0]) == ["neg_ids", "neg_scores", "pos_ids", "pos_scores", "query_id"]  # ids kept, no texts
    text_rows = [{"query": queries[r["query_id"]], "pos": [docs[d] for d in r["pos_ids"]],
                  "neg": [docs[d] for d in r["neg_ids"]]} for r in rows[:2]]  # fmt: skip
    expected = cross_scores(tiny_cross_encoder, text_rows, 32)
    by_first = {tuple(r["pos_ids"]): r for r in got}
    for r, e in zip(rows[:2], expected):
        line = by_first[tuple(r["pos_ids"])]
        assert np.abs(np.array(line["pos_scores"] + line["neg_scores"]) - np.array(e)).max() <= 1e-4
    rejects = sorted(r["reason"] for r in pq.read_table(out / "_rejects").to_pylist())
    assert rejects == ["neg_ids_unknown_id", "query_id_unknown"]


@pytest.mark.parametrize("kind", ["bi-encoder", "cross-encoder"])
def test_non_finite_teacher_scores_are_set_aside_not_written(tiny_bert, tiny_cross_encoder, tmp_path, kind):
    """A teacher that yields NaN for texts holding one word (its embedding row poisoned, as an fp16 overflow would):
    those rows are rejected as ``teacher_score_not_finite`` with empty labels, the others keep finite scores."""
    import shutil

    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    src = tiny_bert if kind == "bi-encoder" else tiny_cross_encoder
    model_dir = tmp_path / "nan-teacher"
    shutil.copytree(src, model_dir)
    model = (AutoModel if kind == "bi-encoder" else AutoModelForSequenceClassification).from_pretrained(model_dir)
    word = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("error")
    with torch.no_grad():
        model.get_input_embeddings().weight[word] = float("nan")
    model.save_pretrained(model_dir, safe_serialization=True)
    rows = [{"query": "the list", "pos": ["a file"], "neg": ["the map"]},
            {"query": "the list", "pos": ["a file"], "neg": ["an error here"]},
            {"query": "an error", "pos": ["a file"], "neg": []},
            {"query": "the code", "pos": ["a key"], "neg": ["the set", "a line"]}]  # fmt: skip
    cfg = TeacherConfig(model=inspect_model(str(model_dir)), kind=kind, max_length=32, query_prompt="")
    out = TeacherScorer(cfg)(_batch(rows)).to_pydict()
    assert out[REJECT_COLUMN] == ["", "teacher_score_not_finite", "teacher_score_not_finite", ""]
    assert out["pos_scores"][1] == out["neg_scores"][1] == out["pos_scores"][2] == []
    for i in (0, 3):
        assert len(out["pos_scores"][i]) == 1 and np.isfinite(out["pos_scores"][i] + out["neg_scores"][i]).all()
