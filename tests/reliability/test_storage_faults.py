"""Object storage that fails a share of requests, and a driver SIGKILLed mid-run then rerun: nothing lost, nothing
written twice. Both against a real S3 server on loopback (moto's server mode); faults from ``tests.s3proxy``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pipelines.cli import main
from tests.conftest import ROOT
from tests.s3proxy import FaultProxy
from tests.test_s3 import _all_objects, _manifest, _output_ids, _put_corpus


def test_transient_storage_faults_lose_nothing(ray_local, tiny_bert, s3_bucket):
    """A fifth of the requests fail the ways S3 fails (503 SlowDown, 500 InternalError, a reset connection, an
    answer 2 s late): every row is written once."""
    endpoint, bucket, client = s3_bucket
    ids = _put_corpus(client, bucket, "corpus", files=4, rows_per_file=30)
    with FaultProxy(endpoint, slowdown=0.1, internal=0.05, drop=0.05, slow=0.05, slow_s=2, seed=1) as proxy:
        rc = main(["embed", "--input", f"s3://{bucket}/corpus", "--output", f"s3://{bucket}/out", "--model", tiny_bert,
                   "--max-length", "32", "--storage-endpoint", proxy.url, "--rows-per-file", "40"])  # fmt: skip
        counts = dict(proxy.counts)
    assert rc == 0
    assert min(counts[k] for k in ("slowdown", "internal", "drop", "slow")) >= 1, counts  # all were injected
    got, _ = _output_ids(endpoint, bucket, "out")
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))
    assert _manifest(client, bucket, "out")["counts"]["rows_in"] == len(ids)


def _commits(client, bucket, prefix):
    return [k for k in _all_objects(client, bucket) if k.startswith(f"{prefix}/_commits/") and k.endswith(".json")]


def test_sigkill_mid_run_then_resume(ray_local, default_model, s3_bucket):
    """The driver is SIGKILLed once some parts are committed; the same command resumes. The final output holds
    every valid input row exactly once, and the rerun embeds only the rows that were not committed."""
    endpoint, bucket, client = s3_bucket
    ids = _put_corpus(client, bucket, "corpus", files=6, rows_per_file=300, extra=[("f0-3", "dup"), ("n", "  ")])
    cmd = [sys.executable, "-m", "pipelines.embed", "--input", f"s3://{bucket}/corpus",
           "--output", f"s3://{bucket}/out", "--model", default_model, "--storage-endpoint", endpoint,
           "--rows-per-file", "100", "--batch-size", "50",
           "--address", ray_local.get_runtime_context().gcs_address]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while len(_commits(client, bucket, "out")) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    committed = len(_commits(client, bucket, "out"))
    assert 2 <= committed < 15, committed  # killed mid-run: some parts of ~100 rows done, most not

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    m = _manifest(client, bucket, "out")
    a = m["attempt"]
    print("resume:", a)  # shown with -s: how much work the rerun saved
    total = len(ids) + 2
    assert a["number"] == 1 and 200 <= a["rows_already_committed"] < total
    # The rerun embedded exactly the rows that were not committed: at least 200 of 1802 fewer than a full run.
    assert a["rows_processed"] == total - a["rows_already_committed"]
    got, _ = _output_ids(endpoint, bucket, "out")
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))  # exactly once
    c = m["counts"]
    assert (c["rows_in"], c["rows_out"]) == (total, len(ids))
    assert c["rejected_by_reason"] == {"id_duplicate": 1, "text_empty": 1}
