"""Ray session for a pipeline run: connect to a cluster, or start a local Ray for the run.

The address comes from ``--address`` or ``RAY_ADDRESS`` (Ray's own convention); pipelines never hard-code one.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# Every process of the job, on every node: never reach a model hub at run time.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
# The raylet settings of a local Ray this module starts (a cluster keeps its own: ``RAY_<name>`` in its nodes'
# environment sets the same). Ray kills a task worker idle for 1 s when a node's idle workers outnumber its free CPUs,
# and on a CPU node the model replicas hold the CPUs: every read and write task then starts a fresh Python worker,
# about a second of CPU each. On 2 cores that churn took ~4% of the machine from the model replicas (a new worker
# every ~8 s; the replicas' share rose from 85.7% to 89.8% without it, issue 9 note). Kept a minute, idle workers are
# reused by the next task.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


# The environment of a local Ray's own processes, which inherit the driver's (a cluster's nodes keep theirs). Ray's
# log monitor lists the session's log folder again every 0.1 s until it holds 1,000 files, and every 0.5 s
# (LOG_NAME_UPDATE_INTERVAL_S) past that; at 0 it takes the 0.5 s pace from the start. On 2 cores the listing was
# the monitor's main cost: 6.5 ms of CPU a second in an idle session, 2.5 ms at 0 (issue 9 note), and it grows with
# the files. A new worker's log lines then reach the driver up to 0.5 s later.
LOCAL_ENV = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0"}


def init_local_ray(**kwargs) -> None:
    """Start a local Ray (a pipeline's, the test session's) with ``LOCAL_SYSTEM_CONFIG``, ``WORKER_ENV`` and
    ``LOCAL_ENV`` (where the environment does not set those variables already); ``kwargs`` go to ``ray.init``.
    Fresh dicts each call: Ray writes the session's spill directory into the system config it is given."""
    import ray

    for k, v in LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(runtime_env={"env_vars": dict(WORKER_ENV)}, include_dashboard=False,
             _system_config=dict(LOCAL_SYSTEM_CONFIG), **kwargs)  # fmt: skip


@contextmanager
def ray_session(address: str | None = None):
    """Yields the seconds Ray took to start. A session already initialised (tests, notebooks) is reused as is."""
    import ray

    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    from pipelines.faults import configure_data_context

    configure_data_context()  # this driver's Ray Data settings, whether the session is new or reused
    if ray.is_initialized():
        yield 0.0
        return
    t0 = time.perf_counter()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster (or a Ray job's driver) keeps the runtime_env it was given; the operators load with
        # local_files_only, so no hub is reached whatever the workers' environment says.
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        init_local_ray(logging_level=logging.WARNING)
    try:
        yield time.perf_counter() - t0
    finally:
        ray.shutdown()


@functools.lru_cache(maxsize=1)
def suggest_cpu_bf16(compute_dtype: str, num_gpus: float) -> bool:
    """Log that ``--compute-dtype bfloat16`` would be ~3x faster, where a model stage runs on CPU in float32
    (``auto``) and the driver's CPU has AMX (``operators.model.cpu_has_amx_bf16``; on a cluster of one instance type,
    the workers' too). Once per driver while the settings stay the same (a distill run's stages share them). Not
    switched on by itself: ``auto`` keeps float32 on CPU (``resolve_compute_dtype`` says why). Returns whether it
    logged."""
    from operators.model import cpu_has_amx_bf16

    if compute_dtype != "auto" or num_gpus > 0 or not cpu_has_amx_bf16():
        return False
    logger.info("this machine's CPU has AMX: --compute-dtype bfloat16 runs the model ~3x faster than the float32 "
                "that auto uses on CPU (vectors within cosine 0.999 of float32)")  # fmt: skip
    return True


AUTO = "auto"


# CPU model replicas per node, at most: one replica per core up to this, torch threads splitting the rest.
# A replica whose threads share a parallel region loses more than its share when any other process (a tokenizer, a
# read task, Ray's own) takes a core for a moment: every thread waits at the region's barrier for the preempted one.
# Measured on 2 cores with 8% of the machine taken by another process: one 2-thread replica lost 13.5%, two
# 1-thread replicas 6.6%. Capped so that a large CPU node does not hold dozens of model copies.
MAX_CPU_REPLICAS = 4
# Input bytes per automatic CPU replica: a replica only helps with a call's worth of rows to take, about two
# 1,024-row calls of short texts (the bundled corpus is 135 bytes a row as Parquet), so a small input (a query set,
# a test) starts one model actor: the bundled queries (12 KB) one, the bundled corpus (398 KB) one per core.
CPU_BYTES_PER_REPLICA = 128 * 2**10


def replicas_for(requested: int | str | None, num_gpus: float, gpus_in_cluster: float | None, flag: str,
                 cpu_nodes: tuple[float, ...] | None = None, input_bytes: int | None = None) -> int:  # fmt: skip
    """A model stage's pool size. ``auto`` (or unset) follows the cluster: every GPU it has, ``num_gpus`` each
    (0.25 -> four replicas per GPU); on CPU, on each node of ``cpu_nodes`` (the CPUs of each node) one replica per
    CPU up to ``MAX_CPU_REPLICAS`` (one in all when the nodes are not known yet), and at most one per
    ``CPU_BYTES_PER_REPLICA`` of ``input_bytes`` (where known).
    A number is taken as is: on an autoscaling cluster with no GPU node up yet, Ray then waits for the nodes
    the pool needs instead of sizing the pool from an empty cluster.
    """
    if requested not in (None, AUTO):
        if int(requested) < 1:
            raise ValueError(f"{flag.lstrip('-').replace('-', '_')} must be >= 1 or 'auto', got {requested}")
        return int(requested)
    if num_gpus <= 0:
        by_nodes = sum(max(1, min(MAX_CPU_REPLICAS, int(c))) for c in cpu_nodes) if cpu_nodes else 1
        by_input = by_nodes if input_bytes is None else input_bytes // CPU_BYTES_PER_REPLICA
        return max(1, min(by_nodes, by_input))
    if gpus_in_cluster == 0:
        # Ray would wait forever for a GPU actor that no node can hold.
        raise ValueError(
            f"num_gpus={num_gpus} per replica, but the Ray cluster has no GPUs; use --num-gpus 0 to run on CPU, "
            f"or set {flag} N if GPU nodes will be added by the autoscaler"
        )
    return max(1, int((gpus_in_cluster or 0) // num_gpus))


def replicas_per_node(replicas: int, cpu_nodes: tuple[float, ...] | None) -> int:
    """Replicas that share one node's cores (their torch threads split them): Ray Data spreads a pool's actors
    over the nodes (its SPREAD default), so ``replicas`` over the nodes, rounded up; all of them where the nodes
    are not known."""
    return -(-replicas // len(cpu_nodes)) if cpu_nodes else replicas


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def cluster_cpu_nodes() -> tuple[float, ...]:
    """The CPUs of each alive node that has any."""
    import ray

    return tuple(float(n["Resources"]["CPU"]) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU"))
