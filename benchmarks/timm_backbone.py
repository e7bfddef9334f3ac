"""A real pretrained timm backbone against efficientnet_lite0: linear probes on ../shared/data/kermany-cxr-600.

For each timm model whose pretrained weights are in the Hugging Face hub cache (``--model NAME`` to name one; by
default the first cached of a short list of self-supervised and supervised ImageNet models, then anything else
cached under timm/), both backbones are linear-probed with the same recipe (frozen backbone, cached features,
224 px unless the model takes only its own size, the same patient split and seed) and evaluated on the test split:
test AUROC with its 95% CI (patient bootstrap) and seconds for training + evaluation.

When no such weights are cached (the usual case on an air-gapped machine) it prints which hub repos and files it
looked for, where the cache is and how to fetch one, and exits 0: nothing is downloaded.

Usage: python benchmarks/timm_backbone.py [--data ../shared/data/kermany-cxr-600] [--model vit_small_patch16_224.dino]
       [--epochs 30] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import medtransfer as mt  # noqa: E402
from medtransfer.models import timm_backbones as tb  # noqa: E402
from medtransfer.models.backbones import get_backbone  # noqa: E402

#: looked for in this order: self-supervised ViTs (DINO, DINOv2 with registers), then supervised CNNs
CANDIDATES = ("vit_small_patch16_224.dino", "vit_small_patch14_reg4_dinov2.lvd142m", "convnext_tiny.fb_in1k",
              "resnet50.a1_in1k", "efficientnet_b0.ra_in1k")


def probe(data: Path, backbone: str, out: Path, epochs: int, extra: list[str]) -> dict[str, float]:
    """Linear-probe ``backbone`` and evaluate it on the test split: AUROC, its CI and the seconds taken."""
    spec = get_backbone(backbone)
    size = spec.input_size if spec.fixed_input_size else 224
    overrides = ["train.strategy=linear-probe", f"train.epochs={epochs}", f"model.backbone={backbone}",
                 f"input.size=[{size}, {size}]", "train.seed=0", *extra]
    t0 = time.perf_counter()
    run = mt.train(data, labels=data / "labels.csv", overrides=overrides, out=out)
    result = mt.evaluate(run, split="test")
    row = result.overall.iloc[0]
    return {"auroc": float(row["auroc"]), "lo": float(row["auroc_lo"]), "hi": float(row["auroc_hi"]),
            "n": int(row["n"]), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "kermany-cxr-600"))
    ap.add_argument("--model", action="append", default=[], help="timm model (with its tag) to compare; repeatable")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"{data} not found: this check needs the shared real chest X-ray subset")

    wanted = args.model or list(CANDIDATES)
    cached = [m for m in wanted if tb.weights_available(tb.TIMM_PREFIX + m)]
    if not args.model:
        cached += [tb.timm_name(n) for n in tb.cached_timm_models() if tb.timm_name(n) not in cached]
    if not cached:
        print(f"No pretrained timm weights in the Hugging Face hub cache {tb.hf_cache_dir()}; nothing to compare "
              "(expected on an air-gapped machine). Looked for:")
        for m in wanted:
            src = tb.pretrained_source(tb.TIMM_PREFIX + m)
            where = f"{src.hf_hub_id} ({' or '.join(src.files)})" if src and src.hf_hub_id else "no hub weights"
            print(f"  timm:{m}: {where}")
        print("Fetch one on a connected machine ('hf download timm/<name> model.safetensors') and copy its "
              "models--timm--<name> folder into the cache, or set HF_HUB_CACHE; then run this again.")
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in ["efficientnet_lite0", *(tb.TIMM_PREFIX + m for m in cached)]:
            print(f"linear probe: {backbone} ...", flush=True)
            r = probe(data, backbone, Path(tmp) / backbone.replace(":", "_"), args.epochs, args.overrides)
            rows.append((backbone, r))
    print(f"\n{'backbone':<45} {'test AUROC [95% CI]':<26} {'n':>4} {'seconds':>8}")
    for backbone, r in rows:
        print(f"{backbone:<45} {r['auroc']:.3f} [{r['lo']:.3f}-{r['hi']:.3f}]{'':<7} {r['n']:>4} {r['seconds']:>8.0f}")


if __name__ == "__main__":
    main()
