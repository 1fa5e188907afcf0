"""Where an experiment's work runs: in this process (`LocalExecutor`, the default) or as Ray tasks
(`RayExecutor`), one for every training run and every attack, robust evaluation and transfer crafting.

The runner (`runner.py`) hands each piece of work to `Executor.submit` as a module-level function and
its arguments; an argument may be the `Handle` of an earlier piece (an attack takes the handle of the
training run it attacks). The local executor calls the function at once, so the work runs in the
order it is submitted and an error stops the experiment, as it always has. The Ray executor submits a
task with its resources declared (`num_cpus`, and `num_gpus=1` for training on CUDA) and passes an
earlier task's result as a task argument, so Ray starts an attack when its run is trained; `wait`
gathers every result, and reports each task that failed, with its variant and seed, once all the
others have finished. What tasks write goes into the run directories under `--out` (a path every node
sees), so a re-run reuses every finished run and cached result whichever executor wrote them.

Ray is imported here only, and only when a `RayExecutor` is made: `pip install -e '.[ray]'`.
Workers load MNIST from their own install (`data_dir`, else `$ADVMNIST_DATA` there, else the copy
shipped with advmnist) and check that it is the data the driver holds.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..data import MNIST, load_mnist
from ..errors import AdvmnistError

EXECUTORS = ("local", "ray")
RAY_MISSING = "the Ray executor needs Ray: install with pip install -e '.[ray]'"

_UNSET = object()


class Handle:
    """A submitted piece of work: its value once done, or the error it failed with."""

    __slots__ = ("what", "value", "error", "ref", "parents", "started")

    def __init__(self, what: str = "", value: Any = _UNSET, ref: Any = None, parents: tuple = ()):
        self.what, self.value, self.error, self.ref, self.parents = what, value, None, ref, parents
        self.started = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.value is not _UNSET

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        if self.value is _UNSET:
            raise RuntimeError(f"{self.what}: not finished (call the executor's wait first)")
        return self.value


def known(value: Any) -> Handle:
    """A handle for a value already at hand (a run found finished, a result read from its cache)."""
    return Handle(value=value)


class TasksFailed(AdvmnistError):
    """Some tasks failed; the others finished and their results are kept for a re-run."""


def _quiet(message: str) -> None:
    """The log of work that runs in a Ray worker: the driver logs each task instead."""


class LocalExecutor:
    """Run each piece of work in this process when it is submitted: today's order, today's errors."""

    name = "local"

    def submit(self, fn: Callable, *args, what: str = "", gpu: bool = False) -> Handle:
        return Handle(what, fn(*(a.result() if isinstance(a, Handle) else a for a in args)))

    def task_log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        return log

    def wait(self) -> None:
        pass

    def note(self) -> str:
        """What the page says about the executor, beside the wall time (nothing: the default)."""
        return ""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class DataSlice:
    """What a worker needs to load, from its own install, the data the driver holds: the first
    n_train / n_test images of MNIST, checked against the driver's checksum and labels."""

    data_dir: str | None
    n_train: int
    n_test: int
    checksum: str
    labels: str  # SHA-256 of the slice's training and test labels


def _labels(data: MNIST) -> str:
    h = hashlib.sha256(data.train_y.cpu().numpy().tobytes())
    h.update(data.test_y.cpu().numpy().tobytes())
    return h.hexdigest()


_LOADED: dict[str | None, MNIST] = {}  # per worker process: MNIST loaded once, sliced per task


def load_slice(s: DataSlice) -> MNIST:
    """The driver's data, loaded in a worker; an AdvmnistError naming the node if it is not the same."""
    if s.data_dir not in _LOADED:
        _LOADED[s.data_dir] = load_mnist(s.data_dir, download=False)
    data = _LOADED[s.data_dir].subset(s.n_train, s.n_test)
    if (data.checksum, len(data.train_x), len(data.test_x), _labels(data)) != (s.checksum, s.n_train, s.n_test,
                                                                               s.labels):
        raise AdvmnistError(f"{socket.gethostname()}: the MNIST data at {data.source} is not the data the driver "
                            f"holds (first {s.n_train} training and {s.n_test} test images); point --data-dir or "
                            f"$ADVMNIST_DATA at the same files on every node")
    return data


def _run_task(fn: Callable, threads: int, *args):
    """The body of every Ray task: torch threads set to the task's CPUs, data loaded, `fn` called."""
    import torch

    torch.set_num_threads(threads)
    return fn(*(load_slice(a) if isinstance(a, DataSlice) else a for a in args))


def _reason(exc: BaseException) -> str:
    """One line: the original exception of a Ray task error, else the error's first line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if isinstance(exc, AdvmnistError) else f"{exc.__class__.__name__}: {line}".rstrip(": ")


class RayExecutor:
    """Every submitted piece of work is a Ray task; `wait` gathers them.

    address: the cluster's (None: $RAY_ADDRESS, else the cluster `ray start --head` started on this
    machine, else a Ray instance started here and shut down by `close`). cpus_per_task: each task's
    `num_cpus`, and its torch threads. data_dir: where workers read MNIST (None: their own default).
    Ray is connected on the first submit; a Ray already initialised in this process is used as it is.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, cpus_per_task: int = 1, data_dir: str | None = None,
                 log: Callable[[str], None] = lambda s: None):
        try:
            import ray
        except ImportError:
            raise AdvmnistError(RAY_MISSING) from None
        self._ray, self.address, self.cpus, self.log = ray, address, cpus_per_task, log
        self.data_dir = None if data_dir is None else str(Path(data_dir).absolute())  # the same path on every node
        self._remote = None
        self._largest: dict[str, float] = {}
        self._owned = False  # whether this executor started Ray (and so shuts it down)
        self._slices: dict[int, tuple[MNIST, DataSlice]] = {}
        self._tasks: list[Handle] = []

    def _start(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level=logging.WARNING)
            self._owned = True
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        self._largest = {k: max((r.get(k, 0) for r in nodes), default=0) for k in ("CPU", "GPU")}
        if self.cpus > self._largest["CPU"]:  # Ray would wait for such a node for ever
            raise AdvmnistError(f"--cpus-per-task {self.cpus}: no node of the Ray cluster has that many CPUs "
                                f"(the largest has {self._largest['CPU']:g})")
        self._remote = ray.remote(_run_task)
        cpus = sum(r.get("CPU", 0) for r in nodes)
        self.log(f"ray: {cpus:g} CPUs on {len(nodes)} node(s), {self.cpus} per task")

    def _slice(self, data: MNIST) -> DataSlice:
        held = self._slices.get(id(data))
        if held is None or held[0] is not data:
            held = (data, DataSlice(self.data_dir, len(data.train_x), len(data.test_x), data.checksum, _labels(data)))
            self._slices[id(data)] = held
        return held[1]

    def _arg(self, a):
        if isinstance(a, Handle):
            return self._arg(a.value) if a.done else a.ref
        if isinstance(a, MNIST):
            return self._slice(a)
        if isinstance(a, Path):
            return a.absolute()  # workers do not share the driver's working directory
        return a

    def submit(self, fn: Callable, *args, what: str = "", gpu: bool = False) -> Handle:
        if self._remote is None:
            self._start()
        if gpu and self._largest["GPU"] < 1:
            raise AdvmnistError("--device cuda: no node of the Ray cluster has a GPU")
        parents = tuple(a for a in args if isinstance(a, Handle) and not a.done)
        ref = self._remote.options(num_cpus=self.cpus, num_gpus=1 if gpu else 0, name=what[:100] or fn.__name__
                                   ).remote(fn, self.cpus, *(self._arg(a) for a in args))
        handle = Handle(what, ref=ref, parents=parents)
        self._tasks.append(handle)
        return handle

    def task_log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        return _quiet

    def wait(self) -> None:
        """Gather every task's result as it finishes; once all have, raise TasksFailed listing each that
        failed (a task whose run failed is listed as not run)."""
        ray = self._ray
        batch, self._tasks = self._tasks, []  # the tasks submitted since the last wait
        waiting = {h.ref: h for h in batch}
        if not waiting:
            return
        self.log(f"ray: waiting for {len(waiting)} task(s)")
        remaining = list(waiting)
        try:
            while remaining:
                ready, remaining = ray.wait(remaining, num_returns=1)
                for ref in ready:
                    h = waiting[ref]
                    try:
                        h.value = ray.get(ref)
                        self.log(f"done: {h.what} ({time.perf_counter() - h.started:.0f} s after it was queued)")
                    except Exception as exc:  # a task's error, of any type, is reported, not raised here
                        h.error = exc
                        if all(p.done for p in h.parents):  # else the task never ran: see _report
                            self.log(f"failed: {h.what}: {_reason(exc)}")
        except KeyboardInterrupt:
            for ref in remaining:
                ray.cancel(ref, force=True)
            raise
        self._report(batch)

    @staticmethod
    def _report(batch: list[Handle]) -> None:
        failed = [h for h in batch if h.error is not None]
        if not failed:
            return
        lines = []
        for h in failed:
            upstream = next((p for p in h.parents if p.error is not None), None)
            lines.append(f"  {h.what}: not run ({upstream.what} failed)" if upstream is not None
                         else f"  {h.what}: {_reason(h.error)}")
        kept = len(batch) - len(failed)
        raise TasksFailed(f"{len(failed)} of {len(batch)} task(s) failed; the other {kept} finished and are "
                          f"kept, and a re-run reuses them:\n" + "\n".join(lines))

    def note(self) -> str:
        return f"; Ray executor, {self.cpus} CPU(s) per task"

    def close(self) -> None:
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
        self._owned = False
        self._remote = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Executor = LocalExecutor | RayExecutor


def make_executor(name: str = "local", *, address: str | None = None, cpus_per_task: int | None = None,
                  data_dir: str | None = None, log: Callable[[str], None] = lambda s: None) -> Executor:
    """The executor called `name` (local or ray). address and cpus_per_task go with ray only."""
    if name == "local":
        if address is not None or cpus_per_task is not None:
            raise AdvmnistError("--address and --cpus-per-task go with --executor ray")
        return LocalExecutor()
    if name == "ray":
        if cpus_per_task is not None and cpus_per_task < 1:
            raise AdvmnistError(f"--cpus-per-task must be at least 1, got {cpus_per_task}")
        return RayExecutor(address, cpus_per_task=cpus_per_task or 1, data_dir=data_dir, log=log)
    raise AdvmnistError(f"unknown executor {name!r}; use {' or '.join(EXECUTORS)}")
