"""Ray session for a pipeline run: connect to a cluster, or start a local Ray for the run.

The address comes from ``--address`` or ``RAY_ADDRESS`` (Ray's own convention); pipelines never hard-code one.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# Every process of the job, on every node: never reach a model hub at run time.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}


@contextmanager
def ray_session(address: str | None = None):
    """Yields the seconds Ray took to start. A session already initialised (tests, notebooks) is reused as is."""
    import ray

    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
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
        ray.init(runtime_env={"env_vars": WORKER_ENV}, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield time.perf_counter() - t0
    finally:
        ray.shutdown()


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))
