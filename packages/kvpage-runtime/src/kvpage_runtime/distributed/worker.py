"""A tensor-parallel rank: its shard of the model, its KV caches, and the messages it obeys.

Every rank other than the driver (rank 0, the engine's own process) runs ``run_worker``, under
either executor: it loads its shard, meets the other ranks (``connect``), reports whether the
load succeeded, then obeys the driver's messages until told to stop. The driver sends each
message to all workers at once, over a gloo group of its own (two broadcasts: the length,
then the pickled message; a step's inputs are a few NumPy arrays, pickled compactly). A worker
waits for the next message as long as the engine is idle; the driver waits for the workers to
take one, and ranks wait in the activations' collectives (the device group: gloo on the CPU,
NCCL on CUDA) for at most the timeout, which so bounds how long a dead or hung peer goes
unnoticed.

Messages: ``("cache", num_blocks, block_size)`` allocates the KV caches, ``("copy", pairs)``
copies blocks, ``("step", inputs, logits_indices)`` runs a forward pass, ``("stop",)`` ends.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.distributed.shm_all_reduce import SharedMemoryAllReduce, same_machine

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "KVPAGE_DISTRIBUTED_TIMEOUT"
SHM_ENV = "KVPAGE_SHM_ALL_REDUCE"  # "0": CPU ranks on one machine all-reduce over gloo too
DEFAULT_TIMEOUT_S = 120.0
_IDLE_FOREVER = timedelta(days=3650)  # a worker waits for the driver's next message this long
# how long the ranks may take to start and load their shards before they meet (each watched
# by the driver meanwhile, so a rank that dies is reported at once)
_STARTUP = timedelta(minutes=30)


def collective_timeout_s() -> float:
    """Seconds a rank waits in one collective for a peer (``KVPAGE_DISTRIBUTED_TIMEOUT``)."""
    return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker needs to load its shard and meet the others (picklable)."""

    rank: int
    world_size: int
    init_method: str  # the rendezvous: tcp://host:port
    model: str | None
    dtype: str
    device: str  # "cpu", or the CUDA device this rank uses
    quantization: str | None
    num_threads: int | None  # torch threads of this rank (CPU)
    timeout_s: float
    int8_activations: bool = False


@dataclass
class Channel:
    """The groups a rank talks over once connected."""

    tp: TensorParallel
    messages: Any  # the gloo group the driver's messages go over
    timeout: timedelta  # how long the driver waits for the workers to take a message

    def send(self, message: tuple) -> None:
        """Driver: ``message`` to every worker."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for tensor in (torch.tensor([len(data)], dtype=torch.int64),
                       torch.frombuffer(bytearray(data), dtype=torch.uint8)):
            dist.broadcast(tensor, src=0, group=self.messages, async_op=True).wait(self.timeout)

    def receive(self) -> tuple:
        """Worker: the driver's next message (waits as long as the engine is idle)."""
        length = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(length, src=0, group=self.messages)
        data = torch.empty(int(length), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.messages)
        return pickle.loads(data.numpy().tobytes())

    def gather_status(self, error: str | None) -> list[str | None]:
        """Every rank's load error (None: loaded), on the driver; [] on the workers."""
        statuses: list[Any] | None = [None] * self.tp.size if self.tp.rank == 0 else None
        dist.gather_object(error, statuses, dst=0, group=self.messages)
        return statuses or []


def connect(tp: TensorParallel, init_method: str, device: torch.device,
            timeout_s: float) -> Channel:
    """Joins the ranks' rendezvous; sets ``tp.group`` to the activations' group, whose waits
    last ``timeout_s`` at most (and, for CPU ranks on one machine, ``tp.shm_all_reduce``,
    unless ``KVPAGE_SHM_ALL_REDUCE=0``)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=tp.rank,
                            world_size=tp.size, timeout=_STARTUP)
    tp.group = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    messages = dist.new_group(backend="gloo", timeout=_IDLE_FOREVER)
    if device.type == "cpu" and os.environ.get(SHM_ENV) != "0" and same_machine(messages):
        tp.shm_all_reduce = SharedMemoryAllReduce(tp.rank, tp.size, messages, timeout_s)
    return Channel(tp, messages, timedelta(seconds=timeout_s))


def run_worker(args: WorkerArgs) -> None:
    """Rank ``args.rank``'s whole life; returns when the driver says stop (or is gone)."""
    from kvpage_runtime.loaders import load_model
    from kvpage_runtime.model_runner import ModelRunner

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = TensorParallel(args.rank, args.world_size)
    loaded, error = None, None
    try:
        loaded = load_model(args.model, dtype=args.dtype, device=device,
                            quantization=args.quantization, tp=tp,
                            int8_activations=args.int8_activations)
    except Exception as exc:  # reported to the driver, which raises it
        error = f"{type(exc).__name__}: {exc}"
    channel = connect(tp, args.init_method, device, args.timeout_s)
    channel.gather_status(error)
    if loaded is None:
        return
    runner = None
    try:
        while True:
            message = channel.receive()
            kind = message[0]
            if kind == "stop":
                return
            if kind == "cache":
                runner = ModelRunner(loaded.model, loaded.config, message[1], message[2], device,
                                     loaded.config.dtype, tensor_parallel_size=tp.size)
            elif kind == "copy":
                runner.copy_blocks(message[1])
            else:
                runner.execute(message[1], message[2])
    except (RuntimeError, dist.DistBackendError) as exc:  # the driver is gone, or a peer
        logger.error("tensor-parallel rank %d stops: %s", args.rank, exc)
    finally:
        dist.destroy_process_group()


def main() -> None:
    """A worker process's entry point (the ``mp`` executor), its ``WorkerArgs`` pickled on
    stdin: it dies with its parent, and a SIGTERM ends it at once."""
    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    args: WorkerArgs = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank {args.rank} "
                        "%(levelname)s %(name)s: %(message)s")
    try:
        run_worker(args)
    except BaseException:
        logger.exception("tensor-parallel rank %d failed", args.rank)
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)  # skips joining the threads gloo and torch leave behind


def _die_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when the thread that started it ends, or its
    process dies however it dies (SIGKILL included), so no worker outlives its driver. (The
    engine starts its workers from the thread that runs it.)"""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


if __name__ == "__main__":
    main()
