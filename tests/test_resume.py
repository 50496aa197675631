"""Resume on a local output: the reader's skipping, and a run whose last commit was lost (a crash between the part
and its record) redone exactly once."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from operators import ledger
from operators.io import ROW_COLUMN, SOURCE_COLUMN, read_file, resolve_input
from pipelines.cli import main


def test_read_file_skips_committed_rows_and_records_the_count(tmp_path):
    pq.write_table(pa.table({"id": list(range(10)), "text": [f"t{i}" for i in range(10)]}), tmp_path / "a.parquet")
    inp = resolve_input(str(tmp_path / "a.parquet"))
    out = tmp_path / "out"
    tables = list(
        read_file(
            inp,
            inp.files[0],
            columns=["id", "text"],
            id_column=None,
            skip=[[2, 5], [9, 10]],
            ledger_fs=pafs.LocalFileSystem(),
            ledger_root=str(out),
        )
    )
    t = pa.concat_tables(tables)
    assert t.column(ROW_COLUMN).to_pylist() == [0, 1, 5, 6, 7, 8] and t.column("id").to_pylist() == [0, 1, 5, 6, 7, 8]
    assert set(t.column(SOURCE_COLUMN).to_pylist()) == {"a.parquet"}
    state = ledger.load(pafs.LocalFileSystem(), str(out))
    assert state.totals == {"a.parquet": 10}  # the count covers skipped rows too


def test_lost_commit_is_redone_exactly_once(ray_local, tiny_bert, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    ids = []
    for f in range(2):
        chunk = [f"{f}-{i}" for i in range(60)]
        pq.write_table(pa.table({"id": chunk, "text": ["the python list of data"] * 60}), src / f"{f}.parquet")
        ids += chunk
    out = tmp_path / "out"
    args = ["embed", "--input", str(src), "--output", str(out), "--model", tiny_bert, "--max-length", "16",
            "--batch-size", "20", "--rows-per-file", "20", "--block-mb", "0.004"]  # fmt: skip
    assert main(args) == 0
    records = sorted((out / ledger.COMMITS_DIR).glob("*.json"))
    assert len(records) >= 4
    # A crash after a part was written but before its record: the part is an orphan, its rows are not done.
    lost = max(records, key=lambda p: len(json.loads(p.read_text())["sources"]))
    lost_rec = json.loads(lost.read_text())
    lost.unlink()
    (out / ledger.MANIFEST).unlink()
    assert ledger.load(pafs.LocalFileSystem(), str(out)).partial()  # a file is now partly done: rows are skipped

    assert main(args) == 0
    m = json.loads((out / ledger.MANIFEST).read_text())
    assert m["attempt"]["orphans_removed"] == [lost_rec["file"]]
    assert m["attempt"]["rows_processed"] == lost_rec["rows"]  # only the lost rows were read and embedded again
    assert m["attempt"]["rows_already_committed"] == 120 - lost_rec["rows"]
    got = pq.read_table(out).column("id").to_pylist()
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    assert m["counts"]["rows_in"] == 120 and m["counts"]["rows_out"] == 120
