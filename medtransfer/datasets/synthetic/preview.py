"""A contact sheet of a generated data set, to see what the task looks like (captions: site and label only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer import io
from medtransfer.datasets.synthetic.generate import sample_truth


def render_preview(out_dir: str | os.PathLike[str], png_path: str | os.PathLike[str], n: int = 8) -> Path:
    """Write a contact sheet of ``n`` images (both labels, all sites) to ``png_path`` and return it.

    Positives are the clearest ones of each site (most opacity), so the sheet shows what the task looks like;
    most positives are subtler. Images are shown as a radiologist would see them (MONOCHROME1 inverted back,
    percentile window); captions show site and label only, never identifiers.

    Examples:
        >>> render_preview("sample_data/cxr", "sample_data/cxr_preview.png", n=8)  # doctest: +SKIP
    """
    import pydicom
    from PIL import Image, ImageDraw

    table = pd.read_csv(Path(out_dir) / "labels.csv")
    table["site"] = table.path.str.split("/").str[1]
    if (Path(out_dir) / ".truth" / "truth.csv").is_file():  # show the clearest positives first
        truth = sample_truth(out_dir)
        table = table.assign(clear=-truth.opacity_contrast * truth.opacity_area_frac).sort_values("clear")
    table["rank"] = table.groupby(["site", "label"]).cumcount()
    picks = table.sort_values(["rank", "label", "site"]).head(n)
    tile, cols = 256, min(4, n)
    sheet = Image.new("L", (cols * tile, -(-len(picks) // cols) * (tile + 18)), 0)
    draw = ImageDraw.Draw(sheet)
    for k, item in enumerate(picks.itertuples()):
        ds = pydicom.dcmread(Path(out_dir) / item.path)
        arr = ds.pixel_array.astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = arr.max() - arr
        lo, hi = np.percentile(arr, [0.5, 99.5])
        arr = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1) * 255
        left, top = (k % cols) * tile, (k // cols) * (tile + 18)
        sheet.paste(Image.fromarray(arr.astype(np.uint8)).resize((tile, tile)), (left, top + 18))
        draw.text((left + 4, top + 3), f"site {item.site} - {item.label}", fill=255)
    with io.atomic_path(png_path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(png_path)
