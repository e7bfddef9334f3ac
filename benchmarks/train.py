"""Training benchmarks, each against a plain PyTorch baseline in the same run.

(a) linear probe with the frozen-feature cache vs a naive frozen-backbone loop that recomputes the backbone
    every epoch (10 epochs each; target: >= 5x faster);
(b) fine-tune images/s through medtransfer's loop (ScanDataset with its decode cache + augmentation off,
    Stepper) vs a bare PyTorch loop over pre-loaded tensors, same model and batch size (target: >= 0.9x).

Usage: python benchmarks/train.py [--n 96] [--size 224] [--backbone efficientnet_lite0] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medtransfer.config import RunConfig, apply_overrides  # noqa: E402
from medtransfer.data.dataset import ScanDataset, make_loader  # noqa: E402
from medtransfer.data.discovery import index_scans  # noqa: E402
from medtransfer.models.classifier import build_model  # noqa: E402
from medtransfer.training.fine_tune import fine_tune  # noqa: E402
from medtransfer.training.loop import Stepper, train_epoch  # noqa: E402
from medtransfer.training.losses import build_loss  # noqa: E402
from medtransfer.training.optim import build_optimizer  # noqa: E402
from tests.training.conftest import make_tiny_dataset  # noqa: E402


def linear_probe(manifest, cfg: RunConfig, backbone: str, cache_dir: Path, epochs: int) -> tuple[float, float]:
    """Seconds for medtransfer's cached linear probe vs a naive loop recomputing the frozen backbone."""
    lp = apply_overrides(cfg, ["train.strategy=linear-probe", f"train.epochs={epochs}", f"train.patience={epochs}",
                               f"data.cache_dir={cache_dir}"])
    model = build_model(backbone, manifest.classes, task=manifest.task, weights="imagenet")
    t0 = time.perf_counter()
    fine_tune(model, manifest, lp)
    cached = time.perf_counter() - t0

    model = build_model(backbone, manifest.classes, task=manifest.task, weights="imagenet")
    model.freeze_backbone()
    train_m, val_m = manifest.split("train"), manifest.split("val")
    loss_fn = build_loss(manifest.task, train_m.targets(), len(manifest.classes))
    opt = build_optimizer([{"params": list(model.head.parameters()), "lr": lp.train.lr}], lp.train)
    tr = make_loader(ScanDataset(train_m, lp.input, cache_dir=cache_dir), batch_size=lp.train.batch_size, shuffle=True)
    va = make_loader(ScanDataset(val_m, lp.input, cache_dir=cache_dir), batch_size=lp.train.batch_size, shuffle=False)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for b in tr:
            opt.zero_grad()
            loss_fn(model(b["image"]), b["label"]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for b in va:
                model(b["image"])
    naive = time.perf_counter() - t0
    return cached, naive


def fine_tune_throughput(manifest, cfg: RunConfig, backbone: str, cache_dir: Path, epochs: int) -> tuple[float, float]:
    """Images/s of medtransfer's training loop vs a bare loop over pre-loaded tensors."""
    train_m = manifest.split("train")
    ds = ScanDataset(train_m, cfg.input, train=True, augment=cfg.train.augment, cache_dir=cache_dir)
    loader = make_loader(ds, batch_size=cfg.train.batch_size, shuffle=True)
    for _ in loader:  # warm the decode cache: both sides then start from decoded images
        pass
    loss_fn = build_loss(manifest.task, train_m.targets(), len(manifest.classes))

    torch.manual_seed(0)
    model = build_model(backbone, manifest.classes, task=manifest.task, weights="imagenet")
    opt = build_optimizer(model.param_groups(cfg.train.lr, 1.0), cfg.train)
    stepper = Stepper(model, opt, None, "epoch", loss_fn, torch.device("cpu"), None,
                      torch.amp.GradScaler("cpu", enabled=False), cfg.train.grad_clip)
    first = next(iter(loader))
    stepper.step(first["image"], first["label"])  # warm-up (kernel selection, allocator), as for the bare loop
    t0 = time.perf_counter()
    for _ in range(epochs):
        train_epoch(stepper, loader)
    ours = epochs * len(ds) / (time.perf_counter() - t0)

    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    y = torch.as_tensor(train_m.targets())
    torch.manual_seed(0)
    model = build_model(backbone, manifest.classes, task=manifest.task, weights="imagenet")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    bs = cfg.train.batch_size
    model.train()
    opt.zero_grad()
    loss_fn(model(x[:bs]), y[:bs]).backward()  # warm-up
    opt.step()
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    bare = epochs * len(x) / (time.perf_counter() - t0)
    return ours, bare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="images per class")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10, help="linear-probe epochs")
    ap.add_argument("--ft-epochs", type=int, default=2, help="fine-tune epochs timed")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tiny_dataset(Path(tmp) / "data", n_per_class=args.n, size=args.size)
        cfg = apply_overrides(RunConfig(), [f"input.size=[{args.size}, {args.size}]",
                                            f"train.batch_size={args.batch_size}", "train.augment.enabled=false"])
        manifest = index_scans(root, config=cfg.data)
        cache = Path(tmp) / "cache"
        print(f"{len(manifest)} images at {args.size} px, {args.backbone}, batch {args.batch_size}, "
              f"{torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}")
        cached, naive = linear_probe(manifest, cfg, args.backbone, cache, args.epochs)
        print(f"(a) linear probe, {args.epochs} epochs: feature cache {cached:.1f}s vs naive frozen loop "
              f"{naive:.1f}s -> {naive / cached:.1f}x faster (target >= 5x)")
        ours, bare = fine_tune_throughput(manifest, cfg, args.backbone, cache, args.ft_epochs)
        print(f"(b) fine-tune throughput: medtransfer {ours:.1f} img/s vs bare PyTorch {bare:.1f} img/s "
              f"-> {ours / bare:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
