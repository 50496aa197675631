"""Every Ray fault-tolerance setting kalm-pipeline relies on, in one place, with the reason for each.

What a run promises: a lost process or node costs time, never rows; and a run that cannot go on ends with an error
naming the stage, instead of hanging. The ledger (``operators/ledger.py``) makes retried work exactly-once; these
settings make Ray retry it, and bound what cannot be retried.

- **Model pools** (embedder, tokeniser, teacher, miner, selector: Ray Data actor pools): restarted without limit and
  their in-flight batches resubmitted (``POOL_ACTOR``). This is Ray Data's own default today; it is stated here so
  a change of default in Ray cannot quietly turn a preempted node into a failed day-long job. Ray 2.60 deprecates
  such extra ``map_batches`` keywords (removed in 2.64, hence ``ray<2.64`` in pyproject). Passing them also keeps
  validation apart from the Tokenizer actors, which Ray Data otherwise fuses: on 2 cores the fused layout measured
  0.77-0.90x of the raw forward in five runs against 0.86-0.94x in four apart, so it was not kept (issue 9 note).
  Every run's log has one error line from Ray for the first pool: "has constructor arguments in the object store
  and max_restarts > 0 ... the actor restart will fail" (ray #53727). It is not a failure. Ray Data passes each pool
  actor's setup (its DataContext and map function) as ``ray.put`` references, which the driver holds until the
  pool ends, so a restarted actor finds them. ``tests/reliability/test_node_loss.py`` checks this: it restarts the
  model replica on another node after its node is killed. A tokenizer actor SIGKILLed mid-call was also restarted
  and went on (issue 9 note).
- **Index shards** (``ShardSearcher``, plain actors holding a faiss shard): a searching shard is started from its
  saved files, so Ray can restart it anywhere and it reloads the same shard (``INDEX_ACTOR``); calls in flight are
  retried on the new one.
- **Blocks**: ``max_errored_blocks = 0``. Ray Data can drop a block whose task failed and go on; that loses rows
  silently, so it never does here. Bad rows are set aside by the validators, with a reason, not by dropping blocks.
- **Actor start**: an actor that dies while loading its model (OOM, a node lost) is replaced up to
  ``ACTOR_INIT_DEATHS`` times in a row, then the job fails with the actor's error. Pools start asynchronously
  (Ray Data's ``wait_for_min_actors_s`` stays off): a positive value starts them one pool after another, each
  waiting for its actors, which cost a small job several seconds per pool.
- **Stalls**: a stage in which no row finishes for ``KALM_STALL_S`` seconds (default 1800) is ended with a
  ``StallError``. This catches what the settings above cannot: a lost actor that has nowhere to restart (every GPU
  busy) leaves its tasks waiting forever (ray #41029, #62746), and a pool whose actors no node can hold (GPUs or
  memory asked that the cluster lacks) waits forever too. 30 minutes leaves an autoscaler time to add GPU nodes.
  Rows committed so far stay; a rerun resumes.
- **Tasks** (reads, writes): Ray's default of 3 retries for a lost worker; storage errors are retried inside the
  task with backoff (``operators.storage.with_retries``, ``--storage-retries``).
"""

from __future__ import annotations

import os

POOL_ACTOR = {"max_restarts": -1, "max_task_retries": -1}
INDEX_ACTOR = {"max_restarts": -1, "max_task_retries": -1}
ACTOR_INIT_DEATHS = 3
DEFAULT_STALL_S = 1800.0


class StallError(RuntimeError):
    """A stage made no progress for ``KALM_STALL_S`` seconds."""


def stall_s() -> float:
    """Seconds without a finished row before a stage is ended; 0 turns the check off."""
    return float(os.environ.get("KALM_STALL_S", DEFAULT_STALL_S))


def configure_data_context() -> None:
    """Apply the Ray Data settings above to this driver's DataContext (called for every Ray session)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.max_errored_blocks = 0
    ctx.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS
