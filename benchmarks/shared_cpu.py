"""Sharing a CPU machine: two jobs at once should each take about 2x their solo time, not 4-16x (issue 15).

(1) training steps (EfficientNet-Lite0, 128 px, batch 32) in one process alone and in two processes at once,
    with torch's defaults (OpenMP spin-wait, glibc malloc) and with medtransfer's settings (``import medtransfer``
    before torch: threads from the usable CPUs, ``GOMP_SPINCOUNT=1000``, malloc keeping large blocks);
(2) ``medtransfer demo`` alone, then two demos at once (separate folders): wall time and the train and explain
    stages of each, with the ratios to the solo run (target: each <= 2x solo; solo <= 150 s on 2 cores).

Usage: python benchmarks/shared_cpu.py [--parts 1 2] [--fast]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEPS = r'''
import sys, time
if sys.argv[1] == "medtransfer":
    import medtransfer  # before torch: thread count and short spin-waits
import torch
from medtransfer.cpu import configure_torch
from medtransfer.models.classifier import build_model
if sys.argv[1] == "medtransfer":
    configure_torch()
model = build_model("efficientnet_lite0", ["a", "b"], task="binary", weights="imagenet").train()
x, y = torch.randn(160, 1, 128, 128), torch.randint(0, 2, (160,)).float()
opt = torch.optim.AdamW(model.parameters(), 1e-4)
def step(i):
    opt.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(model(x[i:i + 32]).squeeze(1), y[i:i + 32]).backward()
    opt.step()
step(0)
t0 = time.perf_counter()
for i in range(32, 160, 32):
    step(i)
print(128 / (time.perf_counter() - t0))
'''

SPIN_VARS = ("GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")


def _steps(mode: str, n: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in SPIN_VARS}
    if mode == "default":
        env["MEDTRANSFER_MALLOC"] = "system"  # torch's defaults throughout: glibc malloc untouched too
    procs = [subprocess.Popen([sys.executable, "-c", STEPS, mode], stdout=subprocess.PIPE, text=True, env=env,
                              cwd=ROOT) for _ in range(n)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def part1() -> None:
    for mode, label in (("default", "torch defaults"), ("medtransfer", "medtransfer settings")):
        solo = _steps(mode, 1)[0]
        pair = _steps(mode, 2)
        print(f"(1) {label:<21} training steps at 128 px: alone {solo:5.1f} img/s; two at once "
              f"{pair[0]:5.1f} and {pair[1]:5.1f} img/s -> {solo / min(pair):.1f}x slower each (ideal 2x)")


def _demo(out: Path, fast: bool) -> subprocess.Popen[str]:
    cmd = ["medtransfer", "--quiet", "demo", "--out", str(out), *(["--fast"] if fast else [])]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out.parent)


def _stages(text: str, wall: float) -> dict[str, float]:
    m = re.search(r"done in (\d+) s \(([^)]*)\)", text)
    stages = {"total": wall}
    if m:
        for part in m.group(2).split(","):
            name, sec = part.strip().rsplit(" ", 2)[0], part.strip().rsplit(" ", 2)[1]
            stages[name] = float(sec)
    return stages


def part2(fast: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        p = _demo(Path(tmp) / "solo", fast)
        out = p.communicate()[0]
        solo = _stages(out, time.perf_counter() - t0)
        if p.returncode:
            sys.exit(f"demo failed:\n{out}")
        t0 = time.perf_counter()
        procs = [_demo(Path(tmp) / f"pair{i}", fast) for i in range(2)]
        outs = [p.communicate()[0] for p in procs]
        wall = time.perf_counter() - t0
        pair = [_stages(o, wall) for o in outs]
    keys = [k for k in ("total", "train", "explain") if k in solo]
    print(f"(2) demo{' --fast' if fast else ''} alone: " + ", ".join(f"{k} {solo[k]:.0f} s" for k in keys)
          + " (target: total <= 150 s on 2 cores)")
    for i, st in enumerate(pair):
        print(f"    demo {i + 1} of two at once: " + ", ".join(
            f"{k} {st.get(k, float('nan')):.0f} s ({st.get(k, float('nan')) / solo[k]:.1f}x)" for k in keys)
            + " (target: <= 2x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["1", "2"])
    ap.add_argument("--fast", action="store_true", help="demo --fast in part 2")
    args = ap.parse_args()
    print(f"CPUs: {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))})")
    if "1" in args.parts:
        part1()
    if "2" in args.parts:
        part2(args.fast)


if __name__ == "__main__":
    main()
