"""`kalm embed` against a real S3 server on loopback (moto's server mode), set up the way a user would:
credentials in the AWS environment variables, the endpoint given with --storage-endpoint."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.storage import S3Store, StorageConfig
from pipelines.cli import EXIT_BAD_CONFIG, EXIT_STORAGE, main
from tests.conftest import TEST_SECRET, WORDS
from tests.s3proxy import FaultProxy


def _texts(n, seed=0):
    return [" ".join(WORDS[(seed + i * 7 + k * 3) % len(WORDS)] for k in range(3 + (seed + i) % 9)) for i in range(n)]


def _put_corpus(client, bucket, prefix, files, rows_per_file, *, extra=()):
    ids = []
    for f in range(files):
        chunk = [f"f{f}-{i}" for i in range(rows_per_file)]
        table = pa.table({"id": chunk, "text": _texts(rows_per_file, seed=f)})
        if f == 0 and extra:
            table = pa.concat_tables([table, pa.table({"id": [r[0] for r in extra], "text": [r[1] for r in extra]})])
        buf = io.BytesIO()
        pq.write_table(table, buf)
        client.put_object(Bucket=bucket, Key=f"{prefix}/part-{f:03d}.parquet", Body=buf.getvalue())
        ids += chunk
    return ids


def _fs(endpoint):
    return S3Store(StorageConfig(endpoint=endpoint).resolved())


def _output_ids(endpoint, bucket, prefix):
    """Read back with plain pyarrow (its dataset reader skips _-prefixed files, as Spark and datasets do)."""
    table = pq.read_table(f"{bucket}/{prefix}", filesystem=_fs(endpoint))
    return table.column("id").to_pylist(), table


def _manifest(client, bucket, prefix):
    return json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/_manifest.json")["Body"].read())


def _all_objects(client, bucket):
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def test_s3_in_s3_out_read_back_with_pyarrow_and_datasets(ray_local, tiny_bert, s3_bucket, capsys, monkeypatch):
    endpoint, bucket, client = s3_bucket
    ids = _put_corpus(client, bucket, "corpus", files=3, rows_per_file=40, extra=[("f0-1", "a duplicate id")])
    args = ["embed", "--input", f"s3://{bucket}/corpus", "--output", f"s3://{bucket}/out/emb", "--model", tiny_bert,
            "--max-length", "32", "--storage-endpoint", endpoint, "--rows-per-file", "50", "--batch-size", "20",
            "--keep-columns", "text"]  # fmt: skip
    assert main(args) == 0
    got, table = _output_ids(endpoint, bucket, "out/emb")
    assert sorted(got) == sorted(ids)  # every valid row once; the duplicate set aside
    assert table.schema.field("embedding").type.list_size == 32
    c = _manifest(client, bucket, "out/emb")["counts"]
    assert (c["rows_in"], c["rows_out"], c["rejected_by_reason"]) == (121, 120, {"id_duplicate": 1})
    keys = _all_objects(client, bucket)
    parts = sorted(k for k in keys if k.startswith("out/emb/part-"))
    assert len(parts) >= 2 and all(k.endswith(".parquet") for k in parts)  # rows_per_file=50: several parts

    # datasets, through fsspec/s3fs, with the same endpoint a user would give it
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # its offline flag also blocks s3:// (no hub here)
    ds = datasets.load_dataset(
        "parquet",
        data_files=[f"s3://{bucket}/{k}" for k in parts],
        split="train",
        storage_options={"client_kwargs": {"endpoint_url": endpoint}},
    )
    assert sorted(ds["id"]) == sorted(ids) and len(ds[0]["embedding"]) == 32

    # Nothing the run left behind, and nothing it printed, holds the secret.
    for key in keys:
        assert TEST_SECRET.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read(), key
    captured = capsys.readouterr()
    assert TEST_SECRET not in captured.out + captured.err
    logs = [p for p in Path(ray_local._private.worker._global_node.get_logs_dir_path()).rglob("*") if p.is_file()]
    assert logs and not [p for p in logs if TEST_SECRET.encode() in p.read_bytes()]  # Ray's logs of every worker

    # Same command again: the output is complete, so nothing is redone and nothing is added.
    assert main(args) == 0
    m = _manifest(client, bucket, "out/emb")
    assert m["attempt"]["number"] == 1 and m["attempt"]["rows_processed"] == 0
    assert m["attempt"]["input_files_skipped"] == 3 and m["counts"]["rows_in"] == 121
    assert sorted(_output_ids(endpoint, bucket, "out/emb")[0]) == sorted(ids)

    # Other settings on the same prefix are refused, naming what changed; --overwrite replaces.
    assert main([*args, "--max-length", "16"]) == EXIT_BAD_CONFIG
    assert "max_length: 32 -> 16" in capsys.readouterr().err
    assert main([*args, "--max-length", "16", "--overwrite"]) == 0
    assert _manifest(client, bucket, "out/emb")["attempt"]["number"] == 0


def test_missing_bucket_and_access_denied_fail_fast(ray_local, tiny_bert, s3_bucket, tmp_path, capsys):
    endpoint, bucket, client = s3_bucket
    _put_corpus(client, bucket, "corpus", files=1, rows_per_file=5)
    common = ["--model", tiny_bert, "--max-length", "32"]
    rc = main(["embed", "--input", f"s3://{bucket}/corpus", "--output", "s3://no-such-bucket-kalm/x/y",
               "--storage-endpoint", endpoint, *common])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == EXIT_STORAGE and "bucket 'no-such-bucket-kalm', prefix 'x/y': no such bucket" in err
    rc = main(["embed", "--input", "s3://no-such-bucket-kalm/in", "--output", str(tmp_path / "o"),
               "--storage-endpoint", endpoint, *common])  # fmt: skip
    assert rc == EXIT_STORAGE and "no such bucket" in capsys.readouterr().err
    with FaultProxy(endpoint, deny=True) as proxy:
        t0 = time.perf_counter()
        rc = main(["embed", "--input", f"s3://{bucket}/corpus", "--output", f"s3://{bucket}/out",
                   "--storage-endpoint", proxy.url, *common])  # fmt: skip
        elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == EXIT_STORAGE and f"bucket '{bucket}', prefix 'corpus': access denied (HTTP 403)" in err, err
    assert elapsed < 30 and TEST_SECRET not in err  # a 403 is not retried ten times with backoff


@pytest.mark.parametrize("bad", ["s3:///x", "gopher://x/y"])
def test_unusable_uris_are_config_errors(bad, capsys):
    assert main(["embed", "--input", bad]) == EXIT_BAD_CONFIG
    assert bad.split(":")[0] in capsys.readouterr().err


def test_model_from_object_storage(ray_local, tiny_bert, s3_bucket, tmp_path, monkeypatch):
    """--model s3://... is fetched once into the node cache (never a hub) and embeds like the local folder."""
    endpoint, bucket, client = s3_bucket
    for f in Path(tiny_bert).rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, f"models/tiny/{f.relative_to(tiny_bert)}")
    _put_corpus(client, bucket, "corpus", files=1, rows_per_file=20)
    monkeypatch.setenv("KALM_CACHE", str(tmp_path / "cache"))
    common = ["--input", f"s3://{bucket}/corpus", "--storage-endpoint", endpoint, "--max-length", "32"]
    assert main(["embed", *common, "--model", f"s3://{bucket}/models/tiny", "--output", str(tmp_path / "a")]) == 0
    assert main(["embed", *common, "--model", tiny_bert, "--output", str(tmp_path / "b")]) == 0
    fetched = list((tmp_path / "cache" / "models" / "remote").glob("*/model.safetensors"))
    assert len(fetched) == 1
    a = pq.read_table(tmp_path / "a").sort_by("id")
    b = pq.read_table(tmp_path / "b").sort_by("id")
    assert a.column("id").equals(b.column("id")) and a.column("embedding").equals(b.column("embedding"))
    m = json.loads((tmp_path / "a" / "_manifest.json").read_text())
    assert (
        m["model"]["weights_sha256"]
        == json.loads((tmp_path / "b" / "_manifest.json").read_text())["model"]["weights_sha256"]
    )
