"""A worker node lost mid-run, on a real multi-node Ray cluster on 127.0.0.1 (the ``cluster`` fixture): the job
completes and writes every row exactly once."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq


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

    n = 3000
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"the python list {i}" for i in range(n)]}),
                   tmp_path / "in.parquet", row_group_size=500)  # fmt: skip
    out = tmp_path / "out"
    addr = cluster["dashboard"]
    job_id, _ = submit.submit("embed", ["--input", str(tmp_path / "in.parquet"), "--output", str(out), "--model",
                                        tiny_bert, "--num-gpus", "1", "--replicas", "1", "--device", "cpu",
                                        "--max-rows", "4", "--batch-size", "32", "--rows-per-file", "150",
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
        assert done_before < manifest["counts"]["rows_in"] // 150  # the node died before the work was done
    finally:
        cluster["gpu_nodes"].remove(victim)
        cluster["gpu_nodes"].append(cluster["cluster"].add_node(num_cpus=2, num_gpus=1, resources={"gpu_node": 1}))
