"""One process against two under DDP, on real chest X-rays: same global batch, same seed, same epochs.

Real data: ``../shared/data/kermany-cxr-600`` (600 paediatric chest X-rays, CC BY 4.0). Both arms run the CLI
exactly as a user would: ``medtransfer train DATA --out RUN`` and the same with ``--nproc 2`` (torchrun's agent,
gloo on the CPU, or NCCL on GPUs), ``fine-tune`` at 64 px for a few epochs; then the test split is evaluated
once in one process and once under ``torchrun --nproc-per-node 2`` on the one-process run.

Printed: per arm wall seconds, epochs run, best validation AUROC and test AUROC (CI); the difference between the
arms' test AUROCs (the issue's tolerance: 0.02); whether the sharded evaluation's predictions equal the
single-process ones (max |difference| of the probabilities) and its metrics are identical. On a 2-core CPU two
processes are not faster (each gets one core); the point is that scaling out does not change the result.

Usage: python benchmarks/ddp.py [--data ../shared/data/kermany-cxr-600] [--epochs 4] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "kermany-cxr-600")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    if not (args.data / "labels.csv").is_file():
        sys.exit(f"{args.data}/labels.csv not found: pass --data (the Kermany CXR-600 folder)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = {**os.environ, "MEDTRANSFER_SALT": "benchmark"}
    sets = [f"train.epochs={args.epochs}", "train.strategy=fine-tune", f"input.size=[{args.size},{args.size}]",
            f"train.batch_size={args.batch_size}", "train.patience=100", "train.augment.enabled=false"]
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        out = Path(tmp)
        figures = {}
        for arm, extra, threads in (("1 process", [], cores), ("2 processes", ["--nproc", "2"], max(1, cores // 2))):
            run = out / arm.replace(" ", "-")
            cmd = [sys.executable, "-m", "medtransfer", "--quiet", "train", str(args.data), "--labels",
                   str(args.data / "labels.csv"), "--out", str(run), *extra]
            for s in sets:
                cmd += ["--set", s]
            wall = _run(cmd, {**env, "OMP_NUM_THREADS": str(threads)})
            ev = out / f"eval-{run.name}"
            _run([sys.executable, "-m", "medtransfer", "--quiet", "evaluate", str(run), "--out", str(ev)],
                 {**env, "OMP_NUM_THREADS": "1"})
            history = pd.read_csv(run / "history.csv")
            row = pd.DataFrame(json.loads((ev / "evaluation.json").read_text())["overall"]["records"]).iloc[0]
            figures[arm] = {"wall": wall, "epochs": len(history), "val": float(history["val_auroc"].max()),
                            "test": float(row["auroc"]), "lo": float(row["auroc_lo"]), "hi": float(row["auroc_hi"])}
            f = figures[arm]
            print(f"{arm:12s} wall {f['wall']:6.1f} s  epochs {f['epochs']}  best val AUROC {f['val']:.3f}  "
                  f"test AUROC {f['test']:.3f} ({f['lo']:.3f}-{f['hi']:.3f})", flush=True)
        a, b = figures["1 process"], figures["2 processes"]
        print(f"test AUROC difference (2 - 1 processes): {b['test'] - a['test']:+.3f} (tolerance 0.02); "
              f"wall ratio {b['wall'] / a['wall']:.2f}x on {cores} core(s)")
        # sharded evaluation of the same run: one process vs torchrun with 2
        run = out / "1-process"
        solo, shared = out / "solo", out / "shared"
        single_env = {**env, "OMP_NUM_THREADS": "1"}
        t1 = _run([sys.executable, "-m", "medtransfer", "--quiet", "evaluate", str(run), "--out", str(solo)],
                  single_env)
        t2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                   "medtransfer", "--quiet", "evaluate", str(run), "--out", str(shared)], single_env)
        p1, p2 = pd.read_csv(solo / "predictions.csv"), pd.read_csv(shared / "predictions.csv")
        cols = [c for c in p1.columns if c.startswith("p_")]
        diff = float(np.nanmax(np.abs(p1[cols].to_numpy(float) - p2[cols].to_numpy(float))))
        e1 = json.loads((solo / "evaluation.json").read_text())
        e2 = json.loads((shared / "evaluation.json").read_text())
        same = all(e1[k] == e2[k] for k in e1 if k != "meta")
        print(f"sharded evaluation ({len(p1)} test cases): {t1:.1f} s in 1 process, {t2:.1f} s in 2; "
              f"max |p difference| {diff:.2e}; metrics identical: {same}")


if __name__ == "__main__":
    main()
