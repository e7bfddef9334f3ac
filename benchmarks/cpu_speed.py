"""CPU speed against bare PyTorch loops, in the same run, at 224 and 64 px (issue 15's figures).

For each size, on real chest X-rays (../shared/data/kermany-cxr-600; synthetic DICOMs when absent):

- inference: medtransfer's one inference path (``run_model``: cached pixels through a DataLoader, batches,
  no grad, its memory format) vs a bare ``no_grad`` loop over tensors already in memory, as a user would
  write it (NCHW float32). Target: medtransfer >= 0.9x the bare loop.
- fine-tune: medtransfer's training step (its Trainer, Stepper and loader; augmentation off and on) vs a bare
  loop (AdamW, grad clipping) over tensors in memory. Target: >= 0.9x (augmentation off: the same work).

Usage: python benchmarks/cpu_speed.py [--n 192] [--sizes 224 64] [--batch-size 32] [--steps 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from medtransfer.config import apply_overrides, load_config  # noqa: E402
from medtransfer.data.dataset import ScanDataset, warm_cache  # noqa: E402
from medtransfer.data.discovery import index_scans  # noqa: E402
from medtransfer.data.manifest import Manifest  # noqa: E402
from medtransfer.inference import run_model  # noqa: E402
from medtransfer.models.classifier import build_model  # noqa: E402
from medtransfer.training.fine_tune import Phase, _Trainer  # noqa: E402

KERMANY = ROOT.parent / "shared" / "data" / "kermany-cxr-600"


def _data(tmp: Path, n: int) -> Manifest:
    if (KERMANY / "labels.csv").is_file():
        m = index_scans(KERMANY, labels=KERMANY / "labels.csv", config=load_config(None).data)
        source = "kermany-cxr-600 (real)"
    else:
        from tests.training.conftest import make_tiny_dataset

        m = index_scans(make_tiny_dataset(tmp / "data", n_per_class=n // 2, size=256))
        source = "synthetic DICOMs"
    print(f"data: {source}")
    return m


def _first(m: Manifest, n: int) -> Manifest:
    return Manifest(m.df.iloc[:n].copy(), list(m.classes), m.task, m.data_dir)


def inference(m: Manifest, cfg, cache: Path, bs: int) -> tuple[float, float]:
    """Images/s: medtransfer's run_model (features, warm cache) vs a bare no_grad loop over in-memory tensors."""
    model = build_model("efficientnet_lite0", m.classes, task=m.task, weights="imagenet")
    ds = ScanDataset(m, cfg.input, cache_dir=cache)
    warm_cache(ds)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    bare_model = build_model("efficientnet_lite0", m.classes, task=m.task, weights="imagenet").eval()
    with torch.no_grad():
        bare_model.features(x[:bs])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(x), bs):
            bare_model.features(x[i:i + bs])
        bare = len(x) / (time.perf_counter() - t0)
    run_model(model, _first(m, bs), cfg.input, output="features", batch_size=bs, device="cpu", cache_dir=cache)
    t0 = time.perf_counter()
    run_model(model, m, cfg.input, output="features", batch_size=bs, device="cpu", cache_dir=cache)
    ours = len(m) / (time.perf_counter() - t0)
    return ours, bare


def fine_tune(m: Manifest, cfg, cache: Path, steps: int) -> tuple[float, float, float]:
    """Images/s of medtransfer's training steps (augmentation off, on) vs a bare loop over in-memory tensors."""
    bs = cfg.train.batch_size
    rates = []
    for aug in (False, True):
        c = apply_overrides(cfg, [f"train.augment.enabled={str(aug).lower()}", f"data.cache_dir={cache}"])
        torch.manual_seed(0)
        model = build_model("efficientnet_lite0", m.classes, task=m.task, weights="imagenet")
        trainer = _Trainer(model, m, c, None, False, None)
        st = trainer.stepper(Phase("all", 0, 1, False))
        loader = trainer._loader(trainer._dataset(trainer.train_m, train=True), shuffle=True)
        it = iter(loader)
        first = next(it)
        st.step(first["image"], first["label"])  # warm-up, as for the bare loop
        n, t0 = 0, time.perf_counter()
        for _, batch in zip(range(steps), it, strict=False):
            st.step(batch["image"], batch["label"])
            n += len(batch["image"])
        rates.append(n / (time.perf_counter() - t0))
    train_m = m.split("train")
    ds = ScanDataset(train_m, cfg.input, cache_dir=cache)
    x = torch.stack([ds[i]["image"] for i in range(min(len(ds), bs * (steps + 1)))])
    y = torch.as_tensor(train_m.targets()[: len(x)])
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", m.classes, task=m.task, weights="imagenet").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad()
        loss_fn(model(xb).squeeze(1), yb).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step(x[:bs], y[:bs])
    n, t0 = 0, time.perf_counter()
    for i in range(bs, len(x), bs):
        step(x[i:i + bs], y[i:i + bs])
        n += len(x[i:i + bs])
    bare = n / (time.perf_counter() - t0)
    return rates[0], rates[1], bare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=192, help="images timed for inference")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        full = _data(Path(tmp), args.n)
        m = _first(full, args.n)
        m.df["split"] = ["train"] * (len(m) - len(m) // 4) + ["val"] * (len(m) // 4)
        print(f"{len(m)} images, efficientnet_lite0, batch {args.batch_size}, torch threads "
              f"{torch.get_num_threads()}, CUDA {torch.cuda.is_available()}")
        for size in args.sizes:
            cfg = apply_overrides(load_config("quickstart"), [f"input.size=[{size}, {size}]",
                                                              f"train.batch_size={args.batch_size}"])
            cache = Path(tmp) / f"cache{size}"
            ours, bare = inference(m, cfg, cache, args.batch_size)
            print(f"{size:>4} px inference: medtransfer {ours:7.1f} img/s, bare no_grad loop {bare:7.1f} img/s "
                  f"-> {ours / bare:.2f}x (target >= 0.9x)")
            off, on, bare_t = fine_tune(m, cfg, cache, args.steps)
            print(f"{size:>4} px fine-tune: medtransfer {off:7.1f} img/s (augmentation on: {on:.1f}), bare loop "
                  f"{bare_t:7.1f} img/s -> {off / bare_t:.2f}x (with augmentation {on / bare_t:.2f}x; target >= 0.9x)")


if __name__ == "__main__":
    main()
