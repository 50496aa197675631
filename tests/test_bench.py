"""kalm bench: its FLOP count against a hand computation, and one small run whose figures must agree with each
other (MFU = model FLOP/s / peak, ratios = the rates they divide)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.bench import model_flops, ratio


def test_model_flops_hand_count(tiny_bert):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    # BERT layer, hidden 32, intermediate 64: Q, K, V, O 4 x (32x32 + 32); FFN 32x64 + 64 + 64x32 + 32; 2 LayerNorms
    # 2 x (2 x 32); pooler 32x32 + 32. Embeddings (words, positions, types and their LayerNorm) are not counted.
    layer = 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 2 * 32
    params = 2 * layer + 32 * 32 + 32
    lengths = np.array([3, 5])
    want = 2 * params * 8 + 4 * 2 * 32 * (9 + 25)
    assert model_flops(model, lengths) == want


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0) is None


@pytest.mark.timeout(600)
def test_bench_run_figures_agree(ray_local, tiny_bert, tmp_path, capsys):
    from pipelines.cli import main

    texts = [" ".join(["the python list dict string"] * (1 + i % 7)) for i in range(60)]
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(60)], "text": texts}), tmp_path / "texts.parquet")
    out = tmp_path / "bench.json"
    rc = main(["bench", "--parts", "peak,forward,st,pipeline", "--input", str(tmp_path / "texts.parquet"),
               "--model", tiny_bert, "--repeat", "1", "--replicas", "2", "--json", str(out)])  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())
    peak, fwd, st, pipe = r["peak"], r["raw_forward"], r["sentence_transformers"], r["pipeline"]
    assert peak["device"] == "cpu" and peak["dtype"] == "float32" and peak["tflops"] > 0
    assert peak["tflops"] == max(peak["tflops_first"], peak["tflops_last"])  # measured at both ends, the higher
    assert fwd["rows"] == 60 and fwd["tokens"] == sum(len(t.split()) + 2 for t in texts)  # [CLS] ... [SEP]
    assert fwd["mfu"] == pytest.approx(fwd["model_tflops"] / peak["tflops"], rel=0.01)
    assert 0 < fwd["mfu"] < 1
    one = r["raw_forward_one_process"]
    assert one["mfu"] == pytest.approx(one["model_tflops"] / peak["tflops"], rel=0.01)
    # The raw forward runs the pipeline's layout (two replicas on the shared Ray's 2 CPUs: 1-thread processes),
    # before and after the pipeline part, averaged; and once as one process on every core.
    assert fwd["replicas"] == pipe["replicas"] == 2 and fwd["threads"] == 1
    assert fwd["rows_per_s"] == pytest.approx((fwd["rows_per_s_before"] + fwd["rows_per_s_after"]) / 2, abs=0.01)
    assert one["replicas"] == 1 and one["rows"] == 60 and one["tokens"] == fwd["tokens"]
    assert one["flops_per_row"] == pytest.approx(fwd["flops_per_row"])  # the same model on the same rows
    assert pipe["runs"]["small"]["rows"] == 60 and pipe["runs"]["large"]["rows"] == 120
    assert st["rows_per_s"] == pytest.approx((st["rows_per_s_before"] + st["rows_per_s_after"]) / 2, abs=0.01)
    assert r["ratios"]["raw_forward_over_sentence_transformers"] == pytest.approx(
        fwd["rows_per_s"] / st["rows_per_s"], rel=0.01)  # fmt: skip
    # The steady rate is the large run's own (its manifest's, from the row counter's timeline); on 120 rows in a
    # few blocks it may not be measurable (None, and then no ratio), but when it is, the ratios are the rates they
    # divide. The marginal rate of 60 extra rows is within start-up noise, so only its presence is checked.
    steady = pipe["steady_rows_per_s"]
    assert "marginal_rows_per_s" in pipe
    assert ("pipeline_steady_over_raw_forward" in r["ratios"]) == (steady is not None)
    if steady is not None:
        assert r["ratios"]["pipeline_steady_over_raw_forward"] == pytest.approx(steady / fwd["rows_per_s"], rel=0.01)
        assert pipe["mfu"] == pytest.approx(steady * fwd["flops_per_row"] / 1e12 / peak["tflops"], rel=0.01)
        assert r["ratios"]["pipeline_steady_over_sentence_transformers"] == pytest.approx(
            steady / st["rows_per_s"], rel=0.01)  # fmt: skip
    printed = capsys.readouterr().out
    assert "matmul peak (cpu, float32" in printed and "kalm embed, steady state" in printed


def test_bench_refuses_unknown_parts(capsys):
    from pipelines.cli import main

    assert main(["bench", "--parts", "forward,gpu"]) == 2
    assert "--parts must name some of" in capsys.readouterr().err
