"""Saliency cost per image on CPU: Grad-CAM vs Integrated Gradients vs occlusion vs gradients.

Baseline in the same run: one plain forward pass (``model(x)`` under ``torch.no_grad()``) per image. Maps
are computed for the n images in one call (``explain_run`` batches report cases by 8) with the library
defaults: IG 32 steps evaluated 8 at a time; occlusion coarse to fine with a window of 1/8 side (8 x 8 = 64
occluded copies at a stride of one window, then up to 64 at half-window stride around the 8 windows with the
largest drop; 8 copies per forward pass).

Usage: python benchmarks/explain.py [--n 4] [--size 224] [--backbones efficientnet_lite0 densenet121]
       [--methods gradcam integrated_gradients occlusion saliency] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medtransfer.explain.saliency import METHODS, explain  # noqa: E402
from medtransfer.models.classifier import build_model  # noqa: E402

log = logging.getLogger("benchmarks.explain")


def ms_per_image(fn, x: torch.Tensor) -> float:
    """Milliseconds per image for ``fn(x)``, after a warm-up call on one image."""
    fn(x[:1])
    t0 = time.perf_counter()
    fn(x)
    return (time.perf_counter() - t0) * 1000 / len(x)


def bench(backbone: str, n: int, size: int, methods: list[str]) -> dict[str, float]:
    weights = "imagenet" if backbone == "efficientnet_lite0" else "none"  # timing does not depend on weights
    model = build_model(backbone, ["normal", "pneumonia"], weights=weights).eval()
    x = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    out = {"forward": ms_per_image(lambda t: _forward(model, t), x)}
    for method in methods:
        out[method] = ms_per_image(lambda t, m=method: explain(model, t, method=m), x)
        log.info("%s %s: %.0f ms/image", backbone, method, out[method])
    return out


def _forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "densenet121"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {b: bench(b, args.n, args.size, args.methods) for b in args.backbones}
    cols = ["forward", *args.methods]
    header = f"{'backbone':<20}" + "".join(f"{c:>22}" for c in cols)
    lines = [f"{args.n} images, {args.size} px, CPU, {torch.get_num_threads()} threads; ms/image (x forward)", header]
    for b, r in rows.items():
        cells = [f"{r['forward']:>22.1f}"] + [f"{r[c]:>13.0f} ({r[c] / r['forward']:>5.0f}x)" for c in args.methods]
        lines.append(f"{b:<20}" + "".join(cells))
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
