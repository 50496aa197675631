"""Bad input, for every ``kalm`` command: a file or setting that cannot work is refused before any work, with exit
code 2 and a message naming the file, column or key, and nothing written at the output; bad rows among good ones
are set aside in ``_rejects/`` with a reason, and the counts add up (the row-level cases run end to end below)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import EXIT_BAD_CONFIG, main


def _files(d):
    (d / "empty.parquet").write_bytes(b"")
    (d / "empty.jsonl").write_text("")
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file " * 8)
    (d / "lines.jsonl").write_text("not json\nneither {\n")
    (d / "words.csv").write_text("")
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), d / "nocol.parquet")
    pq.write_table(pa.table({"id": ["a"], "text": [3]}), d / "inttext.parquet")
    pq.write_table(pa.table({"id": [1.5], "text": ["x"]}), d / "floatid.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["the list", "a file"]}), d / "corpus.parquet")
    pq.write_table(pa.table({"query_id": ["q"], "query": ["x"]}), d / "nopos.parquet")
    pq.write_table(pa.table({"query_id": ["q"], "query": ["x"], "positive_ids": [["a"]]}), d / "queries.parquet")
    (d / "typo.yaml").write_text("max_lenght: 5\n")
    (d / "notamap.yaml").write_text("- a\n- b\n")
    return d


D = "{d}"
CASES = [
    # (command, args, what the message must say)
    ("embed", ["--input", f"{D}/empty.parquet"], "empty.parquet' as parquet: Parquet file size is 0 bytes"),
    ("embed", ["--input", f"{D}/empty.jsonl"], "empty.jsonl' holds no JSON object lines"),
    ("embed", ["--input", f"{D}/lines.jsonl"], "lines.jsonl' holds no JSON object lines"),
    ("embed", ["--input", f"{D}/words.csv"], "words.csv' is empty"),
    ("embed", ["--input", f"{D}/corrupt.parquet"], "corrupt.parquet' as parquet: Parquet magic bytes not found"),
    ("embed", ["--input", f"{D}/missing.parquet"], "no input files found at"),
    ("embed", ["--input", f"{D}/nocol.parquet"], "nocol.parquet: missing column(s) ['text']; columns found"),
    ("embed", ["--input", f"{D}/inttext.parquet"], "column 'text' holds int64 values; expected strings"),
    ("embed", ["--input", f"{D}/floatid.parquet"], "column 'id' holds double values; expected strings or integers"),
    ("embed", ["--config", f"{D}/typo.yaml"], "unknown config key(s) ['max_lenght']"),
    ("embed", ["--config", f"{D}/notamap.yaml"], "must hold a mapping"),
    ("embed", ["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    ("embed", ["--max-tokens", "0"], "max_tokens must be >= 1, got 0"),
    ("embed", ["--num-gpus", "-1"], "num_gpus must be >= 0, got -1"),
    ("embed", ["--dims", "4096"], "dims must be in 1..384"),
    ("embed", ["--replicas", "0"], "replicas must be >= 1 or 'auto', got 0"),
    ("score", ["--input", f"{D}/empty.jsonl"], "empty.jsonl' holds no JSON object lines"),
    ("score", ["--input", f"{D}/corrupt.parquet"], "corrupt.parquet' as parquet"),
    ("score", ["--input", f"{D}/nocol.parquet"], "missing column(s) ['query', 'pos']"),
    ("score", ["--temperature", "-1"], "temperature"),
    ("score", ["--queries", f"{D}/queries.parquet"], "ID-keyed input needs both --queries and --corpus"),
    ("mine", ["--corpus", f"{D}/empty.parquet"], "empty.parquet' as parquet"),
    ("mine", ["--corpus", f"{D}/inttext.parquet"], "column 'text' holds int64 values"),
    ("mine", ["--queries", f"{D}/nopos.parquet"], "nopos.parquet: missing column(s) ['positive_ids']"),
    ("mine", ["--queries", f"{D}/corrupt.parquet"], "corrupt.parquet' as parquet"),
    ("mine", ["--num-negatives", "0"], "need num_negatives >= 1"),
    ("mine", ["--relative-margin", "-0.1"], "relative_margin must be >= 0, got -0.1"),
    ("mine", ["--range-min", "10", "--range-max", "12", "--num-negatives", "5"], "range [10, 12) leaves fewer"),
    ("mine", ["--search-batch", "0"], "search_batch must be >= 1"),
    ("mine", ["--index-type", "lsh"], "index_type"),
    ("select", ["--candidates", f"{D}/nowhere"], "is not a finished kalm mine output"),
    ("select", ["--candidates", f"{D}"], "is not a finished kalm mine output"),
    ("distill", ["--corpus", f"{D}/corrupt.parquet"], "corrupt.parquet' as parquet"),
    ("distill", ["--report-samples", "-1"], "report_samples must be >= 0"),
    ("distill", ["--teacher", f"{D}/no-model"], "no-model"),
]


@pytest.mark.parametrize(("command", "args", "message"), CASES, ids=[f"{c}:{' '.join(a)}" for c, a, _ in CASES])
def test_refused_before_any_work(tmp_path, capsys, monkeypatch, command, args, message):
    import logging

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # the CLI's log handler writes to this test's stderr
    d = _files(tmp_path)
    args = [a.replace(D, str(d)) for a in args]
    if command in ("mine", "distill"):  # the defaults of the others would be the bundled sample: make them small
        for flag, name in (("--queries", "queries.parquet"), ("--corpus", "corpus.parquet")):
            if flag not in args:
                args += [flag, str(d / name)]
    if command == "score" and "--input" not in args:
        args += ["--input", str(d / "corpus.parquet")] if "--queries" in args else []
    out = tmp_path / "out"
    rc = main([command, "--output", str(out), *args])
    # On a fresh machine the first run that needs the bundled teacher assembles it and logs one line saying so
    # (pipelines.defaults), whichever test comes first; that line is not part of the error.
    lines = capsys.readouterr().err.splitlines(keepends=True)
    err = "".join(line for line in lines if "assembling the default teacher" not in line)
    assert rc == EXIT_BAD_CONFIG, err
    assert message in err and err.startswith(f"kalm {command}: error: "), err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not out.exists()  # refused before anything was written


def test_bad_rows_are_set_aside_with_reasons_and_counted(ray_local, tiny_bert, tmp_path):
    """One JSONL file holding every kind of bad row next to good ones: each bad row is in _rejects with its reason
    and its line number, every good row is embedded once, and rows_in = rows_out + rows_rejected."""
    good = [{"id": f"g{i}", "text": f"the list of data {i}"} for i in range(6)]
    bad = [
        ({"id": "b-null", "text": None}, "text_null"),
        ({"id": "b-empty", "text": ""}, "text_empty"),
        ({"id": "b-space", "text": " \t\n "}, "text_empty"),
        ({"id": "b-number", "text": 12}, "text_wrong_type"),
        ({"id": "g0", "text": "a duplicate id"}, "id_duplicate"),
        ({"id": None, "text": "no id"}, "id_null"),
        ({"id": 7, "text": "an id of another type"}, "id_wrong_type"),
        ({"text": "no id key"}, "id_null"),
    ]
    lines = [json.dumps(r).encode() for r in good[:3]]
    lines += [json.dumps(r).encode() for r, _ in bad]
    lines.append(b'{"id": "b-utf8", "text": "\xff\xfe broken"}')  # invalid UTF-8: not JSON text
    lines.append(b"{not json")
    lines += [json.dumps(r).encode() for r in good[3:]]
    lines.append(json.dumps({"id": "huge", "text": "word " * 200_000}).encode())  # 1 MB: cut, counted as truncated
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    rc = main(["embed", "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--model", tiny_bert,
               "--max-length", "32"])  # fmt: skip
    assert rc == 0
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == sorted([r["id"] for r in good] + ["huge"])  # every good row once
    rejects = pq.read_table(out / "_rejects").to_pylist()
    got = sorted((r["_row"], r["reason"]) for r in rejects)
    want = [(3 + i, reason) for i, (_, reason) in enumerate(bad)] + [(3 + len(bad), "json_invalid"),
                                                                     (4 + len(bad), "json_invalid")]  # fmt: skip
    assert got == sorted(want)
    m = json.loads((out / "_manifest.json").read_text())
    c = m["counts"]
    assert c["rows_in"] == len(lines) == c["rows_out"] + c["rows_rejected"]
    assert c["rows_truncated"] >= 1


def test_a_model_needing_its_own_code_is_refused_without_trust_remote_code(tiny_bert, tmp_path, capsys):
    """A model folder whose config maps to its own Python (auto_map, a model type transformers lacks): refused
    before any work, naming the files, and that code is never imported; --trust-remote-code lets it through."""
    import shutil

    from operators.model import inspect_model

    model = tmp_path / "custom-model"
    shutil.copytree(tiny_bert, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="kalm-custom", auto_map={"AutoConfig": "custom.Config", "AutoModel": "custom.Model"})
    (model / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "custom-code-ran"
    (model / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    pq.write_table(pa.table({"id": ["a"], "text": ["the list"]}), tmp_path / "in.parquet")
    rc = main(["embed", "--model", str(model), "--input", str(tmp_path / "in.parquet"), "--output",
               str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_CONFIG and "needs its own Python code" in err and "--trust-remote-code" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert inspect_model(str(model), trust_remote_code=True).model_type == "kalm-custom"


def test_column_types_that_hold_text_and_ids_are_accepted(tmp_path):
    """The type check refuses only what cannot hold text or ids: dictionary-encoded strings (pandas categoricals),
    large strings and integer ids pass."""
    from operators.io import InputError, check_columns, resolve_input

    table = pa.table({"id": pa.array([1, 2], pa.int64()), "text": pa.array(["a", "b"]).dictionary_encode(),
                      "big": pa.array(["a", "b"], pa.large_string()), "n": [1.0, 2.0]})  # fmt: skip
    pq.write_table(table, tmp_path / "t.parquet")
    inp = resolve_input(str(tmp_path / "t.parquet"))
    check_columns(inp, id_column="id", text_column="text", keep_columns=(), add_ids=False)
    check_columns(inp, id_column="id", text_column="big", keep_columns=(), add_ids=False)
    with pytest.raises(InputError, match="column 'n' holds double values; expected strings"):
        check_columns(inp, id_column="id", text_column="n", keep_columns=(), add_ids=False)
    with pytest.raises(InputError, match="column 'n' holds double values; expected strings or integers"):
        check_columns(inp, id_column="n", text_column="text", keep_columns=(), add_ids=False)


def test_an_empty_part_in_a_folder_is_zero_rows_not_an_error(tmp_path):
    from operators.io import resolve_input

    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text('{"id": "x", "text": "the list"}\n')
    inp = resolve_input(str(tmp_path))
    assert len(inp.files) == 2 and inp.schema.names == ["id", "text"]  # the schema of the first non-empty part
