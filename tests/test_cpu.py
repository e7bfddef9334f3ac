"""CPU resources: threads from the affinity mask and the cgroup quota; short OpenMP spin-waits set before torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medtransfer import cpu


def test_cgroup_v2_and_v1_quotas(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert cpu.cgroup_cpu_limit(v2) == 2.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu.cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "v1") == 1.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu.cgroup_cpu_limit(tmp_path / "v1") is None
    assert cpu.cgroup_cpu_limit(tmp_path / "nothing") is None


def test_usable_cpus_is_the_smaller_of_affinity_and_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu.THREADS_ENV, raising=False)
    monkeypatch.setattr(cpu, "_affinity_count", lambda: 64)
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda root=None: 2.5)
    assert cpu.usable_cpus() == 3  # a container with --cpus 2.5 on a 64-core host: 3 threads, not 64
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda root=None: None)
    assert cpu.usable_cpus() == 64
    monkeypatch.setattr(cpu, "_affinity_count", lambda: 4)
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda root=None: 16.0)
    assert cpu.usable_cpus() == 4
    monkeypatch.setenv(cpu.THREADS_ENV, "7")
    assert cpu.usable_cpus() == 7
    monkeypatch.setenv(cpu.THREADS_ENV, "many")
    assert cpu.usable_cpus() == 4


def _env_after_import(env: dict[str, str]) -> dict[str, str]:
    code = ("import os, medtransfer, torch; from medtransfer.cpu import configure_torch; n = configure_torch(); "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_NUM_THREADS'), n)")
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME",
                                                              cpu.THREADS_ENV)}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    spin, omp, n = out.stdout.split()
    return {"spin": spin, "omp": omp, "threads": n}


def test_import_sets_short_spin_and_thread_count_but_never_overrides_the_user() -> None:
    usable = str(cpu.usable_cpus())
    assert _env_after_import({}) == {"spin": "1000", "omp": usable, "threads": usable}
    assert _env_after_import({"GOMP_SPINCOUNT": "50000", "OMP_NUM_THREADS": "1"}) == {
        "spin": "50000", "omp": "1", "threads": "1"}
    assert _env_after_import({cpu.THREADS_ENV: "1"})["threads"] == "1"


def _tuned(env: dict[str, str]) -> str:
    code = "import medtransfer.cpu as c; print(c.tune_malloc())"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != cpu.MALLOC_ENV}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parent.parent).stdout.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")
def test_malloc_keeps_large_blocks_unless_the_user_chose_an_allocator() -> None:
    assert _tuned({}) == "True"
    assert _tuned({cpu.MALLOC_ENV: "system"}) == "False"
    assert _tuned({"MALLOC_MMAP_THRESHOLD_": "1000000"}) == "False"  # the user's own glibc tuning wins


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")
def test_tuned_malloc_stops_page_faulting_every_batch() -> None:
    """The reason for the tuning, measured: a conv net's forward passes page-fault their activations in on
    every batch under glibc's default (mmap/munmap per large block), and hardly at all once tuned."""
    code = ("import resource, sys, medtransfer, torch\n"
            "net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),"
            " torch.nn.Conv2d(32, 32, 3, padding=1)).eval()\n"
            "x = torch.randn(16, 1, 128, 128)\n"
            "with torch.no_grad():\n"
            "    net(x)\n"
            "    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    for _ in range(10): net(x)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != cpu.MALLOC_ENV}

    def faults(env: dict[str, str]) -> int:
        return int(subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                                  check=True, cwd=Path(__file__).resolve().parent.parent).stdout.split()[-1])

    default, tuned = faults({cpu.MALLOC_ENV: "system"}), faults({})
    # 10 batches x two 8 MB activations: ~40,000 faults of 4 KB pages by default
    assert default > 10_000 and tuned < default / 10, (default, tuned)
