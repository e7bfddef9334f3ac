"""A timm backbone through the normal paths: train (each strategy), evaluate, explain, export and predict, with the
run rebuilt offline from an empty Hugging Face cache.

timm's tiny test models, random init or a weights file saved here (no pretrained weights are downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer.cli import app
from medtransfer.digest import sha256_file
from medtransfer.models import backbones as bb
from medtransfer.models import timm_backbones as tb
from tests.training.conftest import TINY_OVERRIDES, make_tiny_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("timm_runs") / "data", n_per_class=12)


@pytest.mark.slow
@pytest.mark.parametrize("name, strategy, via_cli", [
    ("test_vit", "gradual", True),  # ViT tokens; --weights-file through the CLI
    ("test_efficientnet", "linear-probe", False),
    ("test_convnext", "fine-tune", False),
])
def test_a_timm_backbone_trains_evaluates_explains_exports_and_predicts(data, tmp_path, monkeypatch, name, strategy,
                                                                        via_cli):
    out = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, "train.epochs=2"]
    if via_cli:
        torch.manual_seed(0)
        weights = tmp_path / "vit_rgb.safetensors"
        save_file({k: v.contiguous() for k, v in tb.create_model(name).state_dict().items()}, str(weights))
        args = ["train", str(data), "--backbone", f"timm:{name}", "--weights-file", str(weights), "--strategy",
                strategy, "--out", str(out)]
        result = CliRunner().invoke(app, [*args, *[a for o in overrides for a in ("--set", o)]])
        assert result.exit_code == 0, result.output
    else:
        mt.train(data, overrides=[*overrides, f"model.backbone=timm:{name}", "model.weights=none",
                                  f"train.strategy={strategy}"], out=out)

    card = json.loads((out / "model_card.json").read_text())
    assert card["backbone"] == f"timm:{name}" and card["strategy"] == strategy
    assert card["weights"]["timm_model"] == f"{name}.r160_in1k" and card["weights"]["timm_version"] == tb.timm_version()
    if via_cli:
        assert card["weights"]["sha256"] == sha256_file(weights) and card["weights"]["source"] == "local weights file"

    # everything after training works offline from an empty hub cache: the run needs no pretrained weights
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv(bb.OFFLINE_ENV, "1")
    run = mt.load_run(out)
    result = mt.evaluate(run, n_boot=50)
    assert result.meta["n_cases"] > 0 and result.overall["auroc"].between(0, 1).all()

    index = pd.read_csv(mt.explain_run(out, method="gradcam", cases=1))
    assert len(index) >= 1 and (index["method"] == "gradcam").all()
    assert all((out / "saliency" / f).is_file() for f in index["file"])

    paths = mt.export(out, ("torchscript", "onnx"))
    for fmt in ("torchscript", "onnx"):
        side = json.loads((paths[fmt].parent / "model.json").read_text())
        assert side["verified"]["max_abs_diff"] <= 1e-4, fmt

    files = sorted(data.rglob("*.dcm"))[:4]
    table = run.predict([str(f) for f in files], device="cpu")
    assert table["error"].fillna("").eq("").all()
    want = table.set_index("file").loc[[str(f) for f in files], "p_pneumonia"].to_numpy(dtype=np.float64)
    assert ((want >= 0) & (want <= 1)).all()
    x = run.preprocess(files)
    with torch.no_grad():
        ts = torch.jit.load(str(paths["torchscript"])).eval()(x).numpy()[:, 0]
    import onnxruntime as ort

    onnx = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"image": x.numpy()})[0][:, 0]
    assert np.abs(ts - want).max() <= 1e-4 and np.abs(onnx - want).max() <= 1e-4
