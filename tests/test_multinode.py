"""A real multi-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head with the dashboard and two
worker nodes declaring logical GPUs): ``kalm submit`` through the Jobs API runs ``kalm embed``, model replicas land
on the GPU nodes (read back from Ray's state API), the output is complete and equals the model run in-process, and
``kalm jobs logs`` shows the run's progress. The cluster is shut down in ``finally``, leaving no raylet behind."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from pipelines.cli import main
from tests.reference import reference


def test_submit_embed_to_a_multinode_cluster(cluster, tiny_bert, tmp_path, capsys):
    import pyarrow as pa
    from ray.util.state import list_actors, list_nodes

    base = ["the python list", "a dict of string", "import the module"]
    texts = {f"d{i}": f"{base[i % 3]} {i}" for i in range(120)}
    pq.write_table(pa.table({"id": list(texts), "text": list(texts.values())}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    addr = cluster["dashboard"]
    rc = main(["submit", "--address", addr, "--submission-id", "kalm-embed-multinode", "embed", "--input",
               str(tmp_path / "in.parquet"), "--output", str(out), "--model", tiny_bert, "--num-gpus", "1",
               "--device", "cpu", "--max-rows", "16", "--batch-size", "32"])  # fmt: skip
    logs = capsys.readouterr()
    assert rc == 0, logs.err[-3000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"]["rows_in"] == manifest["counts"]["rows_out"] == len(texts)
    got = pq.read_table(out).to_pydict()
    assert sorted(got["id"]) == sorted(texts)  # every row once
    want = reference(tiny_bert, [texts[i] for i in got["id"][:10]])
    assert np.allclose(np.stack(got["embedding"][:10]), want, atol=1e-4)

    # Placement, from Ray's state API: every model replica held a (logical) GPU on a GPU node; the tokenisers
    # held CPU only (Ray may place them on any node with CPUs, GPU nodes included, next to the models they feed).
    nodes = {n.node_id: n for n in list_nodes(address=addr, detail=True)}
    gpu_ids = {nid for nid, n in nodes.items() if n.resources_total.get("GPU", 0) > 0}
    assert len(gpu_ids) == 2
    actors = list_actors(address=addr, detail=True, limit=1000)
    embedders = [a for a in actors if "Embedder" in a.class_name]
    assert embedders and {a.node_id for a in embedders} <= gpu_ids
    assert all(a.required_resources.get("GPU") == 1 for a in embedders)
    tokenizers = [a for a in actors if "Tokenizer" in a.class_name]
    assert tokenizers and all("GPU" not in a.required_resources and a.required_resources["CPU"] > 0
                              for a in tokenizers)  # fmt: skip

    # kalm jobs: status and logs of the finished job, with its progress lines.
    assert main(["jobs", "status", "--address", addr, "kalm-embed-multinode"]) == 0
    assert capsys.readouterr().out.strip() == "SUCCEEDED"
    assert main(["jobs", "logs", "--address", addr, "kalm-embed-multinode"]) == 0
    log = capsys.readouterr().out
    assert f"embed (out): {len(texts)} / {len(texts)} rows (100.0%)" in log and "embedded 120 of 120 rows" in log


def test_jobs_stop_ends_a_running_job(cluster, tiny_bert, tmp_path, capsys):
    """`kalm submit --no-wait` returns at once; `kalm jobs stop` ends the running job, its status reads STOPPED and
    following its logs exits non-zero; the output has no manifest (the run did not finish, a rerun resumes)."""
    import time

    import pyarrow as pa
    from ray.job_submission import JobSubmissionClient

    n = 20000
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"the python list {i}" for i in range(n)]}),
                   tmp_path / "in.parquet", row_group_size=500)  # fmt: skip
    out = tmp_path / "out"
    addr = cluster["dashboard"]
    rc = main(["submit", "--address", addr, "--no-wait", "--submission-id", "kalm-stop", "embed", "--input",
               str(tmp_path / "in.parquet"), "--output", str(out), "--model", tiny_bert, "--num-gpus", "1",
               "--device", "cpu", "--max-rows", "2"])  # fmt: skip
    assert rc == 0 and "kalm jobs logs --follow kalm-stop" in capsys.readouterr().err
    client = JobSubmissionClient(addr)
    deadline = time.time() + 120
    while str(client.get_job_status("kalm-stop")).split(".")[-1] == "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    assert str(client.get_job_status("kalm-stop")).endswith("RUNNING")
    assert main(["jobs", "stop", "--address", addr, "kalm-stop"]) == 0
    assert capsys.readouterr().out.strip() == "stopped"
    while str(client.get_job_status("kalm-stop")).endswith("RUNNING") and time.time() < deadline:
        time.sleep(0.5)
    assert main(["jobs", "status", "--address", addr, "kalm-stop"]) == 0
    assert capsys.readouterr().out.strip() == "STOPPED"
    assert main(["jobs", "logs", "--address", addr, "--follow", "kalm-stop"]) == 1
    assert not (out / "_manifest.json").exists()
