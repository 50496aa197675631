"""Per-stage progress of a running pipeline: rows done, rows/s and ETA, logged every few seconds by the driver.

Ray Data draws its own bars, but their totals are estimates that go wrong when a task emits several blocks (a
read task splitting a file, a model stage re-batching), so an ETA cannot be built on them. Here the rows are
counted as they leave the pipeline's last stage, just before the sink, and reported to a small counter actor: by
the stage's own task or actor (``Tally.counted``), else by a pass-through step after it (``Tracker.wrap``).
The total is exact where the input says it: the Parquet footers (every intermediate table of a run is Parquet).
Line-based inputs (JSONL, CSV) have no row count before they are read; their progress shows rows and rows/s
without an ETA.

``KALM_PROGRESS_S`` sets the seconds between lines (default 15; 0 turns the lines off). The same count ends a
stage that stops moving (``faults.stall_s``): the driver is interrupted and ``track`` raises ``StallError``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager

import numpy as np
import pyarrow as pa

from operators.io import ROW_COLUMN, SOURCE_COLUMN, InputFiles
from pipelines.faults import StallError, stall_s

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 15.0
RATE_WINDOW = 8  # samples the rate is averaged over: recent enough to follow a change of speed, not jumpy
TIMELINE_POINTS = 1024  # (time, rows) points kept per stage: a billion-row run's timeline stays a few tens of KB
STEADY_WINDOW = (0.1, 0.9)  # the part of a stage's rows its steady rate is taken over: no start-up, no drain
MIN_STEADY_POINTS = 5  # bunches of blocks in that window, at least, for a rate
# Blocks within this share of the stage's duration of a bunch's first are one bunch (``steady_rate``). The output
# blocks of one model call reached the counter up to 2.6 s apart on 2 busy cores (a 13 s run of three calls), which
# 1% did not join, and that run's rate read 209 rows/s, twice the model's. A long run still has ~30 bunches in its
# window (80% of the rows, 2.5% of the time each) for the slope.
BUNCH_SHARE = 0.025


class RowCounter:
    """Ray actor: rows that passed each stage's counting step, by stage key, and each stage's timeline of
    (seconds since the epoch, rows so far): a point every ``stride`` blocks, the stride doubling whenever the
    timeline passes 2 x TIMELINE_POINTS, so it stays bounded and evenly spread over the whole run, each point a true
    count. One per driver and Ray session (``_session_counter``), since an actor costs a worker process start and a
    run has many stages."""

    def __init__(self):
        self.rows: dict[str, int] = {}
        self.timelines: dict[str, list[tuple[float, int]]] = {}
        self.blocks: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        self.last: dict[str, tuple[float, int]] = {}

    def add(self, key: str, n: int) -> None:
        self.rows[key] = self.rows.get(key, 0) + n
        point = self.last[key] = (time.time(), self.rows[key])  # one clock (this actor's) for the whole stage
        self.blocks[key] = self.blocks.get(key, 0) + 1
        stride = self.strides.get(key, 1)
        if self.blocks[key] % stride == 0:
            line = self.timelines.setdefault(key, [])
            line.append(point)
            if len(line) > 2 * TIMELINE_POINTS:
                line[:] = line[1::2]  # the points at multiples of the doubled stride
                self.strides[key] = 2 * stride

    def get(self, key: str) -> int:
        return self.rows.get(key, 0)

    def timeline(self, key: str) -> list[tuple[float, int]]:
        """The kept points and the latest block's (the stage's total so far)."""
        line = self.timelines.get(key, [])
        last = self.last.get(key)
        return line + [last] if last is not None and (not line or line[-1] != last) else list(line)

    def forget(self, key: str) -> None:
        for d in (self.rows, self.timelines, self.blocks, self.strides, self.last):
            d.pop(key, None)


def bunched(points: list[tuple[float, int]], gap: float) -> list[tuple[float, int]]:
    """One point per bunch of blocks that passed within ``gap`` seconds of the bunch's first (the bunch's last
    point): a model task's output blocks, or replicas that finish together, reach the counter at once."""
    out: list[tuple[float, int]] = []
    start = None
    for t, n in points:
        if out and t - start < gap:
            out[-1] = (t, n)
        else:
            out.append((t, n))
            start = t
    return out


def steady_rate(points: list[tuple[float, int]], window: tuple[float, float] = STEADY_WINDOW) -> float | None:
    """Rows/s of a stage once running: the least-squares slope of rows over time through the points between
    ``window[0]`` and ``window[1]`` of its rows, one point per bunch of blocks (``bunched``, within 2.5% of the
    stage's duration). This leaves out the start (actors starting, models loading, the first batches filling the
    pipeline) and the drain (the last blocks, with replicas idle), which a rate over the whole run mixes in, and
    which do not grow with the input.

    Bunches, and a slope rather than (rows between the window's ends) / (time between them): replicas that started
    together deliver their blocks together, and a window that starts at the last block of a bunch and ends at the
    first of one is off by a bunch (8% on a 14k-row run of two replicas), while blocks seconds apart inside one
    bunch would make a slope of thousands of rows/s. None when the window holds fewer than ``MIN_STEADY_POINTS``
    bunches: a run of a few model tasks has no steady state to measure."""
    if len(points) < 2:
        return None
    total = points[-1][1]
    span = points[-1][0] - points[0][0]
    inside = [(t, n) for t, n in bunched(points, BUNCH_SHARE * span) if window[0] * total <= n <= window[1] * total]
    if len(inside) < MIN_STEADY_POINTS:
        return None
    t = np.array([p[0] for p in inside]) - inside[0][0]  # epoch seconds are too large to square in float64 safely
    n = np.array([p[1] for p in inside], dtype=np.float64)
    dt = t - t.mean()
    var = float(dt @ dt)
    if var <= 0:
        return None
    slope = float(dt @ (n - n.mean())) / var
    return slope if slope > 0 else None


_counters: dict[tuple[str, str], object] = {}  # (job id, node id) of the driver's Ray session -> its RowCounter


def _session_counter():
    """This driver's RowCounter in the current Ray session. The handle is kept here: an actor whose handles are all
    dropped is ended by Ray, and a new session (tests, notebooks) gets a new one."""
    import ray

    ctx = ray.get_runtime_context()
    key = (ctx.get_job_id(), ctx.get_node_id())
    if key not in _counters:
        _counters.clear()
        _counters[key] = ray.remote(num_cpus=0)(RowCounter).remote()
    return _counters[key]


def input_rows(batch: pa.Table) -> int:
    """Input rows in a batch: a stage that expands a row (one training row per positive) keeps its outputs
    together, so each run of equal (``_source``, ``_row``) is one input row."""
    if batch.num_rows == 0:
        return 0
    src = np.asarray(batch.column(SOURCE_COLUMN).to_numpy(zero_copy_only=False), dtype=object)
    row = np.asarray(batch.column(ROW_COLUMN).to_numpy(), dtype=np.int64)
    new = np.ones(len(row), dtype=bool)
    new[1:] = (src[1:] != src[:-1]) | (row[1:] != row[:-1])
    return int(new.sum())


def count_rows(batch: pa.Table, counter, key: str) -> pa.Table:
    import ray

    # Waited for (~1 ms a call): a call still in flight when its task ends could be lost to the final count.
    try:
        ray.get(counter.add.remote(key, input_rows(batch)))
    except ray.exceptions.RayActorError:  # progress is a convenience: the rows go on, the ledger counts them
        pass
    return batch


def counted_udf(udf, counter, key: str):
    """``udf``, a Ray Data map function or callable class that returns a table, with every call's output rows
    counted (``count_rows``) before they leave the task or actor. A class becomes a subclass of the same name, so
    that Ray shows the stage as before (``MapBatches(Embedder)``), its constructor and everything else its own; a
    function keeps its name too. Built here rather than in the operator: counting is the pipeline's concern, and
    operators import nothing from pipelines."""
    call = udf.__call__ if isinstance(udf, type) else udf
    if inspect.isgeneratorfunction(call):
        raise TypeError(f"{udf.__name__} yields batches; only a stage that returns one can count its rows")
    if isinstance(udf, type):

        def __call__(self, batch):
            return count_rows(udf.__call__(self, batch), counter, key)

        return type(udf.__name__, (udf,), {"__call__": __call__, "__doc__": udf.__doc__, "__module__": __name__})

    @functools.wraps(udf)
    def counted(batch, *args, **kwargs):  # map_batches' fn_args and fn_kwargs
        return count_rows(udf(batch, *args, **kwargs), counter, key)

    return counted


class Tally:
    """Where one stage's rows are counted: this driver's RowCounter in the session, under a key of the stage's own.

    A pipeline counts inside its last step before the sink (``counted``): each call's output is counted as the call
    returns. Where it does not, ``execute`` adds a counting step of its own (``Tracker.wrap``), which costs every
    output block one more task and one more copy through the object store (the step returns the block it was
    given, and Ray Data stores a task's output anew): for ``kalm embed`` that was every vector written, and on 2
    cores the counting tasks' worker took ~2.3% of a core (issue 9 note)."""

    def __init__(self):
        self.counter = _session_counter()
        self.key = uuid.uuid4().hex
        self.inside = False  # set once a stage counts in its own actor or task: no counting step is then added

    def counted(self, udf):
        """``udf`` (a map function or callable class) counting its output rows under this tally (``counted_udf``);
        for the last step before the sink only."""
        self.inside = True
        return counted_udf(udf, self.counter, self.key)


def eta_s(done: int, total: int | None, rate: float) -> float | None:
    """Seconds left at ``rate`` rows/s; None when the total is unknown or nothing has been measured yet."""
    if total is None or rate <= 0:
        return None
    return max(total - done, 0) / rate


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def progress_line(stage: str, done: int, total: int | None, rate: float, elapsed: float) -> str:
    if total is None:
        return f"{stage}: {done:,} rows, {rate:,.1f} rows/s, {_duration(elapsed)} elapsed (total unknown: line input)"
    pct = 100.0 * done / total if total else 100.0
    return (f"{stage}: {done:,} / {total:,} rows ({pct:.1f}%), {rate:,.1f} rows/s, {_duration(elapsed)} elapsed, "
            f"ETA {_duration(eta_s(done, total, rate))}")  # fmt: skip


def parquet_rows(inp: InputFiles, files: list[str]) -> int | None:
    """Rows in ``files`` from their footers, or None for formats that do not say (JSONL, CSV)."""
    import pyarrow.parquet as pq

    if inp.format != "parquet":
        return None
    total = 0
    for f in files:
        with inp.fs.open_input_file(f) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total


def _interrupt_driver() -> None:
    """Raise KeyboardInterrupt in the main thread, which waits inside Ray Data: a real SIGINT to that thread, since
    a flag alone (``_thread.interrupt_main``) is seen at the next bytecode, and a thread blocked on a lock runs none
    until a signal wakes it. Sent whatever Python handler is installed (Python's own, or one an application or Ray
    set), never where SIGINT is ignored or left to the OS, which would end the process."""
    if callable(signal.getsignal(signal.SIGINT)):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


COUNT_TASK_MEMORY = 256 * 2**20  # bytes a counting task's worker is declared to hold (Tracker.wrap)


def count_tasks(cpus: float) -> int:
    """Counting tasks at once for a cluster of ``cpus`` CPUs: one per CPU, at least two."""
    return max(2, int(cpus))


REINTERRUPT_S = 10.0  # a stalled stage's driver is interrupted again this often until the stage has ended


class Tracker:
    """Counts one stage's rows (``wrap`` adds the counting step) and logs progress lines from a thread; notices a
    stage in which no row has finished for ``stall_s`` seconds (0: never)."""

    def __init__(self, stage: str, tally: Tally, interval_s: float, stall_after_s: float = 0.0):
        self.stage, self.interval_s, self.stall_after_s = stage, interval_s, stall_after_s
        self.counter, self.key = tally.counter, tally.key
        self.stalled = False
        self.last_change = time.perf_counter()  # when the row count last moved
        self.lock = threading.Lock()  # interrupting the driver and ending the stage exclude each other
        self.total: int | None = None
        self.samples: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)
        self.t0 = time.perf_counter()
        self.lines: list[str] = []
        self.steady_rows_per_s: float | None = None  # set when the stage ends (``steady_rate``)
        self._stop = threading.Event()

    def wrap(self, ds, tasks: int | None = None):
        """``ds`` with the counting step after it: its own tasks, not fused into the sink's write, which Ray Data
        bundles up to a file of rows (the count would then move once per file). ``memory``: what the worker of such
        a task holds (~160-180 MB measured, a reused Python worker with pyarrow loaded); Ray Data's memory check
        otherwise compares that with its default for a 0.05-CPU task (~120 MB) and warns at every run.

        ``tasks``: at most this many counting tasks at once (``count_tasks``). At 0.05 CPU each, Ray would otherwise
        run a burst of them when a stage drains and its blocks arrive together: at the end of a 1M-row run on 2
        cores, five fresh Python workers started within 2 s (~120 MB each, kept idle a minute), the run's peak.
        A count takes a millisecond, so a few at a time keep up with any stage."""
        from ray.data import TaskPoolStrategy

        return ds.map_batches(count_rows, fn_kwargs={"counter": self.counter, "key": self.key}, batch_format="pyarrow",
                              batch_size=None, zero_copy_batch=True, num_cpus=0.05, memory=COUNT_TASK_MEMORY,
                              compute=TaskPoolStrategy(size=tasks), udf_modifying_row_count=False)  # fmt: skip

    def rate(self) -> float:
        """Rows/s over the last samples; over the whole stage while fewer than two samples have rows."""
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        if n0 == n1 or t1 <= t0:
            return n1 / (t1 - self.t0) if t1 > self.t0 else 0.0
        return (n1 - n0) / (t1 - t0)

    def poll(self, log: bool = True) -> int:
        import ray

        done = ray.get(self.counter.get.remote(self.key))
        now = time.perf_counter()
        if not self.samples or done != self.samples[-1][1]:
            self.last_change = now
        self.samples.append((now, done))
        if log:
            line = progress_line(self.stage, done, self.total, self.rate(), now - self.t0)
            self.lines.append(line)
            logger.info("%s", line)
        return done

    def finish(self) -> None:
        """The stage's steady rate from its timeline (None if the counter cannot be asked: progress is a
        convenience, and a finished job must not fail for it)."""
        import ray

        try:
            self.steady_rows_per_s = steady_rate(ray.get(self.counter.timeline.remote(self.key)))
        except Exception as e:  # noqa: BLE001 - the stage has finished; only its steady rate is missing
            logger.debug("no timeline for %s: %s", self.stage, e)

    def stall_message(self) -> str:
        done = self.samples[-1][1] if self.samples else 0
        return (f"{self.stage}: no row finished for {self.stall_after_s:.0f} s ({done:,} done); a lost actor with no "
                "free node to restart on (every GPU busy) leaves its work waiting forever (ray #41029). The rows "
                "committed so far are kept: rerun the same command to resume, after freeing or adding resources "
                "(KALM_STALL_S sets this limit)")  # fmt: skip

    def _loop(self, count_total) -> None:
        try:
            self.total = count_total()
        except OSError as e:  # progress is a convenience: a failed footer read must not fail the job
            logger.debug("no row total for %s: %s", self.stage, e)
        self.last_change = time.perf_counter()
        tick = min(x for x in (self.interval_s, self.stall_after_s / 4, 15.0) if x > 0)
        last_line = time.perf_counter()
        while not self._stop.wait(tick):
            now = time.perf_counter()
            log = self.interval_s > 0 and now - last_line >= self.interval_s * 0.999
            try:
                self.poll(log=log)
            except Exception as e:  # noqa: BLE001 - the job's own errors surface in the driver, not here
                logger.debug("progress poll failed: %s", e)
                continue  # no count, so no stall can be told either: try again next tick
            last_line = now if log else last_line
            if self.stall_after_s > 0 and time.perf_counter() - self.last_change > self.stall_after_s:
                with self.lock:
                    if self._stop.is_set():
                        return
                    self.stalled = True
                    logger.error("%s", self.stall_message())
                    _interrupt_driver()
                # Again until the stage has ended: a handler may defer or drop the first (Ray defers SIGINT in
                # some of its calls). ``track`` sets _stop under the lock as soon as it has the interrupt.
                while not self._stop.wait(REINTERRUPT_S):
                    with self.lock:
                        if self._stop.is_set():
                            return
                        _interrupt_driver()
                return


@contextmanager
def track(stage: str, count_total, tally: Tally | None = None):
    """A ``Tracker`` for the duration of one stage's run; ``count_total()`` gives its rows (or None), computed in
    the thread so footer reads never delay the start. ``tally``: where the stage counts its rows, when its dataset
    was built to count in its last step (``Tally.counted``); else a new one. Logs a last line at the end."""

    interval = float(os.environ.get("KALM_PROGRESS_S", DEFAULT_INTERVAL_S))
    tracker = Tracker(stage, tally or Tally(), interval, stall_s())
    thread = None
    if interval > 0 or tracker.stall_after_s > 0:
        thread = threading.Thread(target=tracker._loop, args=(count_total,), daemon=True, name=f"progress-{stage}")
        thread.start()
    try:
        yield tracker
        with tracker.lock:
            tracker._stop.set()
        if thread is not None:
            thread.join()
            if interval > 0:
                try:
                    tracker.poll()
                except Exception as e:  # noqa: BLE001 - the stage finished; only its last progress line is missing
                    logger.debug("progress poll failed: %s", e)
        tracker.finish()
    except KeyboardInterrupt:
        with tracker.lock:
            tracker._stop.set()  # no further interrupt from the watchdog
        if tracker.stalled:  # the interrupt came from the watchdog, not from the user
            raise StallError(tracker.stall_message()) from None
        raise
    finally:
        tracker._stop.set()
        tracker.counter.forget.remote(tracker.key)
