"""Running as one of several processes under ``torchrun`` (DDP): who am I, who writes, and how to share results.

torchrun (PyTorch's elastic agent) starts N processes and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT`` (and ``TORCHELASTIC_RESTART_COUNT``) in each. medtransfer reads those and nothing
else: no launcher or rendezvous of its own. The rules every distributed code path follows:

- **Rank 0 decides and writes.** Indexing, splitting, the run directory (config, manifest, checkpoints, history,
  card, evaluation files) and the feature cache are written by rank 0 alone; the others wait at a barrier and
  read what it wrote, or receive it with :func:`broadcast`. No two ranks ever write one file.
- **Work is sharded without duplicates.** Inference takes a contiguous block of cases per rank
  (:func:`shard_bounds`: sizes differ by at most one, no padding) and :func:`gather_rows` puts the blocks back
  in order on every rank, so metrics equal those of one process.
- **Backends:** NCCL when CUDA is used, gloo on the CPU (``MEDTRANSFER_DDP_BACKEND`` overrides).

Outside torchrun (``WORLD_SIZE`` unset or 1) every function here is a cheap no-op: rank 0 of a world of 1.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a rank waits at a collective before failing (rank 0 indexing 100k files can take minutes).
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("MEDTRANSFER_DDP_TIMEOUT_MIN", "60")))


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    """``RANK`` as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    """``LOCAL_RANK``: this process's index on its node (its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (the process group's, else torchrun's environment, else 0)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else env_rank()


def world_size() -> int:
    """Number of processes (the process group's, else torchrun's environment, else 1)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else env_world_size()


def is_main() -> bool:
    """True on rank 0, the process that writes files and prints results."""
    return rank() == 0


def restart_count() -> int:
    """How many times torchrun's agent has restarted the group (``TORCHELASTIC_RESTART_COUNT``; 0 first time)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA, ``gloo`` otherwise; ``MEDTRANSFER_DDP_BACKEND`` wins when set."""
    chosen = os.environ.get("MEDTRANSFER_DDP_BACKEND")
    if chosen:
        return chosen
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: torch.device | str = "cpu") -> Iterator[bool]:
    """Join torchrun's process group for the block when ``WORLD_SIZE`` > 1; yields whether one is active.

    A group that already exists (the caller made it) is used and left alone; one made here is destroyed on
    exit. On CUDA each process takes the GPU of its ``LOCAL_RANK``.
    """
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        yield active()
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank())
    backend = backend_for(dev)
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    logger.info("rank %d of %d joined the process group (%s)", dist.get_rank(), dist.get_world_size(), backend)
    try:
        yield True
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if active():
        dist.barrier()


def broadcast(obj: T | None) -> T:
    """Rank 0's ``obj`` on every rank (pickled in memory between our own processes; no-op in one process)."""
    if not active():
        return obj  # type: ignore[return-value]
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give its result to every rank; an error on rank 0 is raised on every rank.

    The other ranks would otherwise wait at the next collective until the timeout (an hour) when rank 0 fails.
    """
    if not active():
        return fn()
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # sent to the others, then raised here too
            error = exc
    outcome = broadcast(("error", _portable(error)) if error is not None else ("ok", result))
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]  # type: ignore[no-any-return]


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles, else a RuntimeError with its message (for :func:`main_first`)."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own object, round-tripped in memory
        return exc
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}")


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The contiguous block [start, stop) of ``n`` cases that ``rank_`` handles: sizes differ by at most one.

    No case is repeated (DistributedSampler pads with duplicates, which would count some cases twice in a
    metric); blocks concatenated in rank order are the cases in their original order.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return n * r // w, n * (r + 1) // w


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``t`` (shard sizes may differ), concatenated in rank order, on every rank (CPU).

    Rows must have the same trailing shape and dtype on every rank; a rank with no rows may pass any empty
    tensor (it takes the others' row shape and dtype). In one process returns ``t``.
    """
    if not active():
        return t
    metas = gather_objects((tuple(t.shape), str(t.dtype)) if t.numel() else None)
    known = next((m for m in metas if m is not None), None)
    if known is None:
        return t.cpu()
    row, dtype = known[0][1:], getattr(torch, known[1].removeprefix("torch."))
    counts = [m[0][0] if m is not None else 0 for m in metas]
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.detach().to(comm, dtype).reshape(-1, *row) if t.numel() else torch.zeros((0, *row), dtype=dtype, device=comm)
    padded = torch.zeros((max(counts), *row), dtype=dtype, device=comm)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).cpu()


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank (identical weights everywhere)."""
    if not active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if dist.get_backend() == "nccl" and t.device.type != "cuda":
                moved = t.data.cuda()
                dist.broadcast(moved, src=0)
                t.data.copy_(moved)
            else:
                dist.broadcast(t.data, src=0)


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, in place."""
    if not active():
        return
    with torch.no_grad():
        for b in module.buffers():
            if b.is_floating_point():
                dist.all_reduce(b, op=dist.ReduceOp.SUM)
                b.div_(dist.get_world_size())


def launch(args: list[str], *, nproc: int, max_restarts: int = 0) -> None:
    """Run ``python -m medtransfer ARGS`` in ``nproc`` processes under torchrun's elastic agent, on this node.

    What ``torchrun --standalone --nproc-per-node NPROC --max-restarts K -m medtransfer ARGS`` does, through
    its Python API (:func:`torch.distributed.launcher.api.elastic_launch`): a c10d rendezvous on a free local
    port, the environment torchrun sets, and, when a process dies, up to ``max_restarts`` restarts of the
    whole group (each resumes the run from its last checkpoint). Each process gets
    ``OMP_NUM_THREADS = cores / nproc`` unless it is set. For several nodes, call torchrun yourself
    (docs/guide-scale.md).

    Raises:
        RuntimeError: a process failed (after the restarts); the message names the rank and the exit code.
    """
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1 or max_restarts < 0:
        raise ValueError(f"nproc must be >= 1 and max_restarts >= 0, got {nproc} and {max_restarts}")
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    # With the rendezvous TCP store shared with the workers (torch's default), a restarted group can read the
    # previous attempt's addresses and fail to connect (pytorch/pytorch#135712; seen here with gloo): the
    # workers get a store of their own instead, as the fix advises.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                          monitor_interval=0.5, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "medtransfer", *args)
    except ChildFailedError as exc:
        failures = "; ".join(f"rank {r} exited with code {f.exitcode}" for r, f in sorted(exc.failures.items()))
        raise RuntimeError(f"{failures} (after {max_restarts} restart(s)); its error is printed above") from None
