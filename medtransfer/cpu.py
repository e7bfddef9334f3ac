"""The CPUs this process may use, and thread settings that stay fast when the machine is shared.

Two things go wrong on a shared CPU machine (a laptop running two jobs, a workstation, a container):

1. **Counting the machine, not the process.** torch sizes its thread pool from the CPUs it can see. In a
   container limited by a cgroup CPU quota (``docker --cpus 2`` on a 64-core host) that is the host's 64, and
   64 threads fight over 2 CPUs' worth of time. :func:`usable_cpus` takes the smaller of the affinity mask
   (``taskset``, SLURM's ``--cpus-per-task``) and the cgroup quota (v2 ``cpu.max``, v1 ``cfs_quota_us``).
2. **Busy-waiting threads.** torch's OpenMP runtime (GNU libgomp in the PyPI wheels) lets an idle worker
   thread spin for a while before it sleeps, betting that the next parallel region starts soon. Alone on the
   machine that bet pays; when another process needs the same cores, spinning threads burn the time the other
   process's threads are waiting for, and both collapse. Measured on 2 cores (EfficientNet-Lite0; figures in
   docs/decisions.md): two training processes at once ran at 3.4 images/s each against 57 alone (a 16x
   slowdown, not 2x). With a short spin (``GOMP_SPINCOUNT=1000``, Intel OpenMP: ``KMP_BLOCKTIME=1``) the pair
   ran at 30 images/s each (1.9x) and a job alone lost nothing measurable; a passive wait policy
   (``OMP_WAIT_POLICY=PASSIVE``) was as good when shared but 20% slower alone.

3. **Page faults.** glibc's malloc serves every allocation above 128 KB-32 MB with a fresh ``mmap`` and gives it
   back with ``munmap`` when freed, so each batch's activations are page-faulted in and zeroed again: on this
   2-core VM, EfficientNet-Lite0 inference at 224 px spent 7 s of system time per 3 s of computation (44
   images/s); with large blocks kept in the heap it ran at 154 images/s, and training at 25 instead of 13
   images/s, for ~10% more peak memory. :func:`tune_malloc` does that with ``mallopt`` (the in-process
   equivalent of the jemalloc/tcmalloc preload that PyTorch's CPU performance guide recommends):
   ``M_MMAP_MAX=0`` (no per-allocation mmap), ``M_TRIM_THRESHOLD=512 MB`` and ``M_TOP_PAD=64 MB``. It is
   skipped when you chose an allocator yourself (``LD_PRELOAD`` of jemalloc/tcmalloc/mimalloc, any
   ``MALLOC_*_`` variable) or set ``MEDTRANSFER_MALLOC=system``; off glibc (macOS, musl) it does nothing.

The OpenMP runtime reads its environment once, when torch is imported, so :func:`configure_environment` runs
at ``import medtransfer`` (before torch is imported) and sets these variables only where the user has not:
your own ``OMP_NUM_THREADS``, ``GOMP_SPINCOUNT`` or ``KMP_BLOCKTIME`` always win. If torch was imported
before medtransfer, the spin setting cannot take effect any more (:func:`configure_torch` says so in the
log at debug level); the thread count still can. ``MEDTRANSFER_NUM_THREADS`` sets the thread count.

This module imports no torch at import time (it must run before torch is imported).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

#: Environment variable that sets the number of compute threads (overrides :func:`usable_cpus`).
THREADS_ENV = "MEDTRANSFER_NUM_THREADS"
#: Set where unset, before torch is imported: short spin-waits (see the module docstring for the measurements).
SPIN_SETTINGS = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "1"}

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows: no affinity API
        return os.cpu_count() or 1


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 2.5), or None when there is no limit.

    cgroup v2: ``cpu.max`` = ``"<quota> <period>"`` or ``"max <period>"``; cgroup v1:
    ``cpu/cpu.cfs_quota_us`` (-1 = none) over ``cpu/cpu.cfs_period_us``. Only the cgroup mounted at ``root``
    is read (what a container sees as its own).
    """
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError, IndexError):
        pass
    for sub in ("cpu", "cpu,cpuacct"):
        try:
            quota = int((root / sub / "cpu.cfs_quota_us").read_text())
            period = int((root / sub / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            return quota / period
        return None
    return None


def usable_cpus() -> int:
    """CPUs this process may use: ``$MEDTRANSFER_NUM_THREADS``, else min(affinity mask, cgroup quota rounded up).

    Examples:
        >>> usable_cpus() >= 1
        True
    """
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        try:
            n = int(raw)
            if n >= 1:
                return n
        except ValueError:
            pass
        logger.warning("%s=%r is not a positive whole number; using the CPUs this process may use", THREADS_ENV, raw)
    n = _affinity_count()
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


#: Set to ``system`` to keep glibc malloc's default behaviour (see :func:`tune_malloc`).
MALLOC_ENV = "MEDTRANSFER_MALLOC"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_malloc_tuned: bool | None = None


def tune_malloc() -> bool:
    """Keep large freed blocks in glibc's heap instead of unmapping them (see the module docstring, point 3).

    Returns whether malloc was tuned (once per process; False off glibc or when the user chose otherwise).
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    preload = os.environ.get("LD_PRELOAD", "")
    if (os.environ.get(MALLOC_ENV, "").strip().lower() == "system" or sys.platform != "linux"
            or any(a in preload for a in ("jemalloc", "tcmalloc", "mimalloc"))
            or any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt tunables)
        ok = all(libc.mallopt(opt, val) == 1 for opt, val in (
            (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 512 << 20), (_M_TOP_PAD, 64 << 20)))
    except (OSError, AttributeError):
        return False
    _malloc_tuned = ok
    return ok


def configure_environment() -> dict[str, str]:
    """Set the OpenMP variables (thread count and short spin) that are not set yet; returns what was set.

    Call before torch is imported (``import medtransfer`` does). The user's own values are never changed.
    """
    global _late
    wanted = {"OMP_NUM_THREADS": str(usable_cpus()), **SPIN_SETTINGS}
    done = {}
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = value
            done[key] = value
    _late = "torch" in sys.modules and bool(done)
    tune_malloc()
    return done


_late = False  # torch was imported before configure_environment set anything: the spin setting came too late
_torch_configured = False


def configure_torch() -> int:
    """Size torch's intra-op thread pool to at most :func:`usable_cpus` (once per process); returns the count.

    Called where heavy work starts (training, inference). Lowers, never raises, the count torch already has
    (yours from ``torch.set_num_threads`` or ``OMP_NUM_THREADS`` is kept when smaller), except that
    ``MEDTRANSFER_NUM_THREADS`` sets it exactly.
    """
    global _torch_configured
    import torch

    if not _torch_configured:
        _torch_configured = True
        usable = usable_cpus()
        n = usable if os.environ.get(THREADS_ENV, "").strip() else min(usable, torch.get_num_threads())
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        if _late:
            logger.debug("torch was imported before medtransfer: its OpenMP threads keep their default spin-wait "
                         "(set GOMP_SPINCOUNT=1000 before starting Python to share a machine well)")
        logger.debug("compute threads: %d (CPUs usable by this process: %d)", n, usable)
    return torch.get_num_threads()
