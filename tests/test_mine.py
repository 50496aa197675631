"""`kalm mine` end to end, and its fidelity to sentence-transformers' `mine_hard_negatives` on the bundled sample."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from pipelines.cli import main
from pipelines.defaults import SAMPLE_CORPUS, SAMPLE_QUERIES


def test_negatives_equal_sentence_transformers_mine_hard_negatives(ray_local, default_model, tmp_path):
    """Exact search, the real default model, the same rules (window, relative margin, top sampling), no prompts:
    every query gets the same negatives, in the same order, as sentence-transformers picks."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    corpus = pq.read_table(SAMPLE_CORPUS).to_pylist()
    text = {r["id"]: r["text"] for r in corpus}
    queries = pq.read_table(SAMPLE_QUERIES).to_pylist()
    out = tmp_path / "mine"
    rc = main(["mine", "--output", str(out), "--model", default_model, "--query-prompt", "", "--num-negatives", "5",
               "--range-min", "2", "--range-max", "30", "--relative-margin", "0.05"])  # fmt: skip
    assert rc == 0
    ours = {r["query_id"]: r for r in pq.read_table(out / "candidates").to_pylist()}
    assert len(ours) == len(queries)

    pairs = Dataset.from_list([{"query": q["query"], "positive": text[p]} for q in queries for p in q["positive_ids"]])
    model = SentenceTransformer(default_model, device="cpu")
    st = mine_hard_negatives(pairs, model, corpus=list(text.values()), num_negatives=5, range_min=2, range_max=30,
                             relative_margin=0.05, sampling_strategy="top", output_format="n-tuple", batch_size=64,
                             verbose=False)  # fmt: skip
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

    # The training file: KaLM/FlagEmbedding JSONL, texts matching the ids, scores aligned; loadable by datasets.
    import datasets

    train = datasets.load_dataset("json", data_files=[str(f) for f in sorted((out / "train").glob("part-*.jsonl"))],
                                  split="train")  # fmt: skip
    assert train.num_rows == len(queries) == report["training_file"]["rows_out"]
    query_text = {q["query_id"]: q["query"] for q in queries}
    for row in train:
        mine = ours[row["query_id"]]
        assert row["neg"] == [text[i] for i in mine["neg_ids"]] and row["pos"] == [text[i] for i in mine["pos_ids"]]
        assert len(row["neg_scores"]) == len(row["neg"]) and len(row["pos_scores"]) == len(row["pos"])
        assert row["prompt"] == "" and row["query"] == query_text[row["query_id"]]
