"""A real multi-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head with the dashboard and two
worker nodes declaring logical GPUs): ``kalm submit`` through the Jobs API runs ``kalm embed``, model replicas land
on the GPU nodes (read back from Ray's state API), the output is complete and equals the model run in-process, and
``kalm jobs logs`` shows the run's progress. The cluster is shut down in ``finally``, leaving no raylet behind."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from tests.reference import reference


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # The job's driver runs `python -m pipelines.cli` in the head's environment: this virtualenv's python first.
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    mp.delenv("RAY_ADDRESS", raising=False)
    dash = _free_port()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                      "dashboard_host": "127.0.0.1", "dashboard_port": dash,
                                                      # the shared test Ray's agent holds the default port
                                                      "dashboard_agent_listen_port": _free_port(),
                                                      "resources": {"head": 1}})  # fmt: skip
    try:
        gpu_nodes = [c.add_node(num_cpus=2, num_gpus=1, resources={"gpu_node": 1}) for _ in range(2)]
        c.wait_for_nodes()
        yield {"cluster": c, "dashboard": f"http://127.0.0.1:{dash}", "gpu_nodes": gpu_nodes}
    finally:
        pids = [i.process.pid for nd in c.list_all_nodes() for infos in nd.all_processes.values() for i in infos]
        c.shutdown()
        mp.undo()
    left = [p for p in pids if _running(p)]
    assert pids and not left, f"processes of the test cluster still running: {left}"  # no raylet or GCS left


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


@pytest.mark.slow
def test_a_worker_node_lost_mid_run_and_the_job_still_writes_every_row_once(cluster, tiny_bert, tmp_path):
    """The node holding the model replica is killed (no graceful shutdown) while the job runs: Ray restarts the
    replica on the other GPU node and retries the lost tasks; the output holds every row exactly once. One replica
    on two GPU nodes stands for a cluster with spare capacity (an autoscaler replacing the node): with every GPU
    busy, a lost replica has nowhere to restart (ray #41029)."""
    import time

    import pyarrow as pa
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    from cluster import submit

    n = 6000
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"the python list {i}" for i in range(n)]}),
                   tmp_path / "in.parquet", row_group_size=500)  # fmt: skip
    out = tmp_path / "out"
    addr = cluster["dashboard"]
    job_id, _ = submit.submit("embed", ["--input", str(tmp_path / "in.parquet"), "--output", str(out), "--model",
                                        tiny_bert, "--num-gpus", "1", "--replicas", "1", "--device", "cpu",
                                        "--max-rows", "4", "--batch-size", "32", "--rows-per-file", "300",
                                        "--block-mb", "0.05"], address=addr, wait=False)  # fmt: skip
    client = JobSubmissionClient(addr)
    victim = None
    deadline = time.time() + 240
    while victim is None and time.time() < deadline:
        alive = [a for a in list_actors(address=addr, detail=True, filters=[("state", "=", "ALIVE")])
                 if "Embedder" in a.class_name]  # fmt: skip
        committed = list((out / "_commits").glob("*.json")) if (out / "_commits").exists() else []
        if alive and committed:
            victim = next(nd for nd in cluster["gpu_nodes"] if nd.node_id == alive[0].node_id)
        else:
            time.sleep(0.5)
    assert victim is not None, client.get_job_logs(job_id)[-3000:]
    assert str(client.get_job_status(job_id)).endswith("RUNNING")
    done_before = len(list((out / "_commits").glob("*.json")))
    cluster["cluster"].remove_node(victim, allow_graceful=False)
    try:
        status = submit.follow(client, job_id, out=io.StringIO())
        assert status == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["counts"]["rows_in"] == manifest["counts"]["rows_out"] == n
        ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
        assert len(ids) == n and set(ids) == {f"r{i}" for i in range(n)}  # every row, once
        assert done_before < manifest["counts"]["rows_in"] // 300  # the node died before the work was done
    finally:
        cluster["gpu_nodes"].remove(victim)
        cluster["gpu_nodes"].append(cluster["cluster"].add_node(num_cpus=2, num_gpus=1, resources={"gpu_node": 1}))
