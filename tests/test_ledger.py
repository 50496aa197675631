"""The commit ledger's pure parts and the storage helpers, against hand-computed expectations (no Ray, no S3)."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow.fs as pafs
import pytest

from operators import ledger
from operators.storage import (
    S3Store,
    StorageConfig,
    describe,
    is_transient,
    redact,
    resolve,
    with_retries,
)
from pipelines.output import exactly_once_problems
from tests.conftest import TEST_SECRET


def test_to_ranges_compresses_any_order():
    assert ledger.to_ranges(np.array([5, 3, 4, 0, 9, 10])) == [[0, 1], [3, 6], [9, 11]]
    assert ledger.to_ranges(np.array([], dtype=np.int64)) == []
    assert ledger.to_ranges(np.array([7])) == [[7, 8]]


def test_merge_and_cover():
    merged = ledger.merge_ranges([[5, 8], [0, 2], [2, 5], [10, 12]])
    assert merged == [[0, 8], [10, 12]]
    assert not ledger.covers(merged, 12)  # 8 and 9 missing
    assert ledger.covers(ledger.merge_ranges(merged + [[8, 10]]), 12)
    assert ledger.covers([], 0) and not ledger.covers([], 1)


def test_in_ranges_marks_exactly_the_committed_positions():
    ranges = [[0, 2], [5, 7]]
    pos = np.arange(9)
    assert ledger.in_ranges(pos, ranges).tolist() == [1, 1, 0, 0, 0, 1, 1, 0, 0]
    assert not ledger.in_ranges(pos, []).any()


def test_exactly_once_problems_finds_missing_and_repeated_rows():
    state = ledger.LedgerState(
        commits={
            "part-0000-000000": {"sources": {"a": [[0, 5]], "b": [[0, 3]]}, "rows": 8},
            "part-0001-000000": {"sources": {"a": [[5, 10]], "b": [[2, 4]]}, "rows": 7},  # b row 2 twice
        },
        totals={"a": 10, "b": 4, "c": 3},
    )
    state.done = {"a": [[0, 10]], "b": [[0, 4]]}
    problems = exactly_once_problems(state, ["a", "b", "c", "d"])
    assert problems == [
        "b: 1 row(s) committed twice",
        "c: rows missing (committed None of 3)",
        "d: never read to its end",
    ]
    assert state.complete() == {"a", "b"} and state.partial() == {}


def test_s3_store_pickles_its_settings_not_credentials():
    fs = S3Store(StorageConfig(endpoint="http://127.0.0.1:9", region="eu-west-1", retries=7).resolved())
    blob = pickle.dumps(fs)
    assert TEST_SECRET.encode() not in blob
    back = pickle.loads(blob)
    assert isinstance(back, S3Store) and back.cfg.retries == 7 and back.region == "eu-west-1"


def test_resolve_paths(tmp_path, monkeypatch):
    fs, path = resolve(str(tmp_path / "x"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
    fs, path = resolve("s3://bucket/some/prefix/")
    assert isinstance(fs, S3Store) and path == "bucket/some/prefix" and fs.cfg.endpoint == "http://127.0.0.1:1234"
    with pytest.raises(ValueError, match="names no bucket"):
        resolve("s3:///prefix")
    with pytest.raises(ValueError, match="storage_endpoint must be an http"):
        StorageConfig(endpoint="127.0.0.1:9000")


def test_errors_are_classified_and_described_without_secrets():
    slow = OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate.")
    denied = OSError(f"AWS Error ACCESS_DENIED during HeadObject operation: key {TEST_SECRET} (Request ID: 12)")
    assert is_transient(slow) and is_transient(ConnectionResetError()) and not is_transient(denied)
    assert not is_transient(FileNotFoundError("x"))
    text = describe(denied, "s3://bkt/some/prefix")
    assert text.startswith("bucket 'bkt', prefix 'some/prefix': access denied (HTTP 403)")
    assert TEST_SECRET not in text and "Request ID" not in text
    assert redact(f"x {TEST_SECRET} y") == "x <AWS_SECRET_ACCESS_KEY> y"


def test_with_retries_retries_transient_only(monkeypatch):
    monkeypatch.setattr("operators.storage.time.sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SERVICE_UNAVAILABLE (HTTP status 503)")
        return "ok"

    assert with_retries(flaky, what="t") == "ok" and len(calls) == 3
    calls.clear()

    def denied():
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED")

    with pytest.raises(OSError):
        with_retries(denied, what="t")
    assert len(calls) == 1  # permanent: no retry
    calls.clear()

    def down():
        calls.append(1)
        raise OSError("AWS Error SLOW_DOWN")

    with pytest.raises(OSError):
        with_retries(down, what="t", attempts=4)
    assert len(calls) == 4  # bounded
