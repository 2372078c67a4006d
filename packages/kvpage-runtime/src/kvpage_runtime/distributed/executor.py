"""Starting the tensor-parallel workers, and driving them from the engine's process (rank 0).

An executor only starts the workers, tells whether they are alive, and stops them: ``mp``
starts one process per rank on this machine, ``ray`` one Ray actor per rank on an existing
Ray cluster (``ray.init(address=...)`` done by the caller, or ``RAY_ADDRESS``) or on a local
one it starts. The ranks' code is the same under both (``worker.run_worker``), and so is the
driver's side (``TensorParallelDriver``): it sends every step to the workers, runs its own
shard, and turns any failure of a rank into ``EngineDeadError`` naming it, within the
collectives' timeout (``KVPAGE_DISTRIBUTED_TIMEOUT``, 120 s by default).
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.distributed.worker import (
    TIMEOUT_ENV,
    Channel,
    WorkerArgs,
    collective_timeout_s,
    connect,
    run_worker,
)
from kvpage_runtime.errors import EngineDeadError, ModelLoadError
from kvpage_runtime.forward_batch import StepInputs
from kvpage_runtime.model_runner import ModelRunner, ScheduledLike

logger = logging.getLogger(__name__)

EXECUTOR_BACKENDS = ("mp", "ray")
_STOP_GRACE_S = 5.0
_POLL_S = 0.2


class Workers(Protocol):
    """What an executor does with the ranks it started (1 to world_size - 1)."""

    def dead(self) -> list[str]:
        """One line per worker that has ended ("rank 2 (pid 1234) exited with code -9")."""

    def stop(self, grace_s: float) -> None:
        """Ends every worker, giving each ``grace_s`` to end on its own first (after the
        driver's stop message)."""


class ProcessWorkers:
    """``mp``: one fresh Python process per rank (``python -m kvpage_runtime.distributed.worker``,
    its arguments pickled on its stdin: nothing of the caller's ``__main__`` is re-imported,
    and nothing is forked from a process that runs threads), which dies with the engine's
    thread or process."""

    def __init__(self, args: Sequence[WorkerArgs]) -> None:
        self.processes = []
        for arg in args:
            process = subprocess.Popen([sys.executable, "-m", "kvpage_runtime.distributed.worker"],
                                       stdin=subprocess.PIPE)
            process.stdin.write(pickle.dumps(arg))
            process.stdin.close()
            self.processes.append(process)

    def dead(self) -> list[str]:
        return [f"rank {rank} (pid {p.pid}) exited with code {p.returncode}"
                for rank, p in enumerate(self.processes, start=1) if p.poll() is not None]

    def stop(self, grace_s: float) -> None:
        for process in self.processes:
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class _RayWorker:
    """The Ray actor of one rank."""

    def run(self, args: WorkerArgs) -> None:
        run_worker(args)


class RayWorkers:
    """``ray``: one actor per rank (a GPU each on CUDA). Uses the Ray cluster the process is
    connected to, else ``RAY_ADDRESS``'s, else starts a local one (no dashboard, no usage
    statistics) that it stops again."""

    def __init__(self, args: Sequence[WorkerArgs], cuda: bool) -> None:
        import ray

        self.ray = ray
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                     log_to_driver=True)
        actor = ray.remote(num_cpus=0, num_gpus=1 if cuda else 0)(_RayWorker)
        self.actors = [actor.remote() for _ in args]
        self.runs = [a.run.remote(arg) for a, arg in zip(self.actors, args, strict=True)]

    def dead(self) -> list[str]:
        done, _ = self.ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        lines = []
        for rank, run in enumerate(self.runs, start=1):
            if run in done:
                try:
                    self.ray.get(run)
                    lines.append(f"rank {rank} (Ray actor) returned")
                except Exception as exc:
                    lines.append(f"rank {rank} (Ray actor) died: {exc}")
        return lines

    def stop(self, grace_s: float) -> None:
        self.ray.wait(self.runs, num_returns=len(self.runs), timeout=grace_s)
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started_ray:
            self.ray.shutdown()


class TensorParallelDriver:
    """The engine's handle on its ranks: ``start`` the workers (they load their shards while
    the engine loads rank 0's with ``tp``), ``connect`` once it has, then ``attach`` the
    engine's model runner: the result runs every step on all ranks."""

    def __init__(self, tp: TensorParallel, workers: Workers, init_method: str,
                 device: torch.device, timeout_s: float, threads_before: int) -> None:
        self.tp = tp
        self.threads_before = threads_before  # torch threads of the process, given back at the end
        self.workers = workers
        self.init_method = init_method
        self.device = device
        self.timeout_s = timeout_s
        self.channel: Channel | None = None
        self._stopped = False
        atexit.register(self.shutdown)

    @classmethod
    def start(cls, size: int, backend: str, *, model: str | None, dtype: str, device: str,
              quantization: str | None, int8_activations: bool = False) -> TensorParallelDriver:
        """Starts ranks 1..size-1, which load ``model`` in ``dtype`` (resolved by the driver,
        so that every rank computes in the same one) on ``device``. ``backend`` is one of
        ``EXECUTOR_BACKENDS`` (``EngineConfig`` checks it)."""
        cuda = torch.device(device).type == "cuda"
        threads_before = torch.get_num_threads()
        threads = None if cuda else max(1, threads_before // size)
        if threads is not None:
            torch.set_num_threads(threads)
            logger.info("tensor parallel over %d CPU ranks, %d torch thread(s) each", size,
                        threads)
        host = _driver_address(backend)
        init_method = f"tcp://{host}:{_free_port(host)}"
        timeout_s = collective_timeout_s()
        args = [WorkerArgs(rank, size, init_method, model, dtype,
                           _rank_device(device, rank, backend), quantization, threads, timeout_s,
                           int8_activations)
                for rank in range(1, size)]
        workers = ProcessWorkers(args) if backend == "mp" else RayWorkers(args, cuda)
        tp = TensorParallel(0, size)
        return cls(tp, workers, init_method, torch.device(_rank_device(device, 0, backend)),
                   timeout_s, threads_before)

    def connect(self) -> None:
        """Meets the workers (watching that none dies meanwhile) and raises the first load
        error any of them reports."""
        joined: dict[str, Any] = {}

        def join() -> None:
            try:
                joined["channel"] = connect(self.tp, self.init_method, self.device,
                                            self.timeout_s)
            except BaseException as exc:
                joined["error"] = exc

        thread = threading.Thread(target=join, name="kvpage-tp-connect", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(_POLL_S)
            if thread.is_alive() and (dead := self.workers.dead()):
                self._fail(f"a worker ended before the ranks met: {'; '.join(dead)}")
        if "error" in joined:
            self._fail(f"the ranks could not meet at {self.init_method}: {joined['error']}")
        self.channel = joined["channel"]
        if self.tp.shm_all_reduce is not None:
            self.tp.shm_all_reduce.peers_alive = lambda: not self.workers.dead()
        errors = [(rank, e) for rank, e in enumerate(self.channel.gather_status(None)) if e]
        if errors:
            self.shutdown()
            raise ModelLoadError("; ".join(f"tensor-parallel rank {rank}: {e}"
                                           for rank, e in errors))

    def attach(self, runner: ModelRunner, num_blocks: int, block_size: int
               ) -> TensorParallelRunner:
        self.send(("cache", num_blocks, block_size))
        return TensorParallelRunner(self, runner)

    def send(self, message: tuple) -> None:
        """``message`` to every worker (see ``worker``), timed in ``tp.stats``."""
        stats = self.tp.stats
        started = _now()
        self.channel.send(message)
        stats.message_seconds += _now() - started

    def guarded(self, call):
        """``call()``, any failure of which ends the ranks: a step that failed midway cannot
        be resumed by the others, which wait in its collectives."""
        if self._stopped:
            raise EngineDeadError("the tensor-parallel workers are stopped")
        try:
            return call()
        except Exception as exc:
            dead = self.workers.dead()
            what = "; ".join(dead) if dead else f"{type(exc).__name__}: {exc}"
            self._fail(f"a tensor-parallel step failed: {what} (ranks wait for each other "
                       f"{self.timeout_s:g} s at most, {TIMEOUT_ENV})", exc)

    def _fail(self, reason: str, cause: BaseException | None = None):
        self.shutdown(graceful=False)
        raise EngineDeadError(reason) from cause

    def shutdown(self, graceful: bool = True) -> None:
        """Stops the workers (idempotent): told to stop where they can hear it, then ended."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.shutdown)
        if graceful and self.channel is not None and not self.workers.dead():
            try:
                self.channel.send(("stop",))
            except Exception as exc:
                logger.warning("could not tell the tensor-parallel workers to stop: %s", exc)
        self.workers.stop(_STOP_GRACE_S if graceful else 0.0)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        torch.set_num_threads(self.threads_before)


class TensorParallelRunner:
    """The model runner of a tensor-parallel engine: the driver's ``ModelRunner`` interface,
    each call sent to every worker before the driver runs its own shard."""

    def __init__(self, driver: TensorParallelDriver, runner: ModelRunner) -> None:
        self.driver = driver
        self.runner = runner

    def prepare(self, scheduled: Sequence[ScheduledLike],
                drafts: Mapping[str, Sequence[int]] | None = None) -> StepInputs:
        return self.runner.prepare(scheduled, drafts)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        if pairs:
            self.driver.guarded(lambda: self._copy_blocks(list(pairs)))

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.driver.send(("copy", pairs))
        self.runner.copy_blocks(pairs)

    def execute(self, inputs: StepInputs, logits_indices: Sequence[int]) -> torch.Tensor:
        return self.driver.guarded(lambda: self._execute(inputs, list(logits_indices)))

    def _execute(self, inputs: StepInputs, logits_indices: list[int]) -> torch.Tensor:
        self.driver.send(("step", inputs, logits_indices))
        return self.runner.execute(inputs, logits_indices)


def _rank_device(device: str, rank: int, backend: str) -> str:
    """CUDA: rank r uses device r of this machine under ``mp``; a Ray actor its one GPU."""
    if torch.device(device).type != "cuda":
        return device
    return "cuda:0" if backend == "ray" and rank > 0 else f"cuda:{rank}"


def _driver_address(backend: str) -> str:
    if backend == "ray":
        import ray.util

        return ray.util.get_node_ip_address()
    return "127.0.0.1"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _now() -> float:
    return time.perf_counter()
