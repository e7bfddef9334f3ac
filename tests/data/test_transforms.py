"""MONAI pipelines from InputSpec: shapes, padding, channels, determinism, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtransfer.config import AugmentConfig
from medtransfer.data.spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from medtransfer.data.transforms import deterministic_transforms, random_transforms, resize_transforms
from tests.factories import chest_like


def _img(h=48, w=40, seed=0):
    return (chest_like(max(h, w), seed=seed)[:h, :w].astype(np.float32) / 4095)[None]


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (64, 64)])  # shrink, mixed, enlarge
def test_output_shape_dtype_and_normalisation(size):
    spec = InputSpec(size=size)
    out = deterministic_transforms(spec)({"image": _img()})["image"]
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and tuple(out.shape) == (1, *size)
    resized = resize_transforms(spec)({"image": _img()})["image"]
    assert 0 <= float(resized.min()) and float(resized.max()) <= 1
    torch.testing.assert_close(out, (resized - spec.mean[0]) / spec.std[0])


def test_area_downsampling_is_a_block_mean():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4) / 15
    out = resize_transforms(InputSpec(size=(8, 8)))({"image": np.kron(img, np.ones((1, 4, 4)))})["image"]
    expected = np.kron(img, np.ones((1, 2, 2)))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_keep_aspect_pads_instead_of_stretching():
    img = np.ones((1, 20, 40), np.float32)  # wide: after fitting into 32x32 it is 16x32, padded top and bottom
    out = resize_transforms(InputSpec(size=(32, 32), keep_aspect=True))({"image": img})["image"]
    assert tuple(out.shape) == (1, 32, 32)
    assert float(out[0, :8].abs().max()) == 0 and float(out[0, -8:].abs().max()) == 0
    assert torch.allclose(out[0, 8:24], torch.ones(16, 32))
    stretched = resize_transforms(InputSpec(size=(32, 32)))({"image": img})["image"]
    assert torch.allclose(stretched, torch.ones(1, 32, 32))


def test_channels_3_replicates_grey():
    spec = InputSpec(channels=3, size=(32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = deterministic_transforms(spec)({"image": _img()})["image"]
    assert tuple(out.shape) == (3, 32, 32)
    grey = out * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(grey[0], grey[1])
    torch.testing.assert_close(grey[0], grey[2])


def test_volume_pipeline():
    vol = np.random.default_rng(0).random((1, 10, 20, 24)).astype(np.float32)
    out = deterministic_transforms(InputSpec(size=(8, 16, 16)))({"image": vol})["image"]
    assert tuple(out.shape) == (1, 8, 16, 16)
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps the transform's ValueError
        deterministic_transforms(InputSpec(size=(16, 16)))({"image": vol})
    assert "spatial dims" in str(info.value.__cause__)


def test_eval_pipeline_is_deterministic():
    pipe = deterministic_transforms(InputSpec(size=(32, 32)))
    a, b = pipe({"image": _img()})["image"], pipe({"image": _img()})["image"]
    assert torch.equal(a, b)


def test_train_augmentation_changes_images_but_keeps_shape_and_range():
    pipe = random_transforms(AugmentConfig(flip_prob=1.0, intensity_prob=1.0), spatial_dims=2)
    pipe.set_random_state(0)
    x = torch.from_numpy(_img(32, 32))
    outs = [pipe({"image": x.clone()})["image"] for _ in range(3)]
    for out in outs:
        assert out.shape == x.shape and out.dtype == torch.float32
        assert 0 <= float(out.min()) and float(out.max()) <= 1
        assert not torch.allclose(out, x, atol=1e-3)
    assert not torch.allclose(outs[0], outs[1])


def test_flip_is_left_right_only():
    pipe = random_transforms(AugmentConfig(flip_prob=1.0, rotate_degrees=0, zoom=(1, 1), intensity_prob=0), 2)
    x = torch.from_numpy(_img(32, 32))
    torch.testing.assert_close(pipe({"image": x})["image"], torch.flip(x, dims=[2]))


def test_volume_rotation_stays_within_slices():
    vol = np.zeros((1, 4, 32, 32), np.float32)
    for k in range(4):
        vol[0, k, 8:24, 8:24] = (k + 1) / 4
    pipe = random_transforms(AugmentConfig(flip_prob=0, rotate_degrees=30, zoom=(1, 1), intensity_prob=0), 3)
    pipe.set_random_state(3)
    out = pipe({"image": torch.from_numpy(vol)})["image"]
    for k in range(4):
        assert float(out[0, k].max()) <= (k + 1) / 4 + 1e-5  # no intensity leaks in from other slices


def test_disabled_augmentation_is_identity():
    x = torch.from_numpy(_img(32, 32))
    for pipe in (random_transforms(AugmentConfig(enabled=False, flip_prob=1.0), 2), random_transforms(None, 2)):
        assert pipe.transforms == () or len(pipe.transforms) == 0
        assert torch.equal(pipe({"image": x})["image"], x)


def test_three_channel_input_gets_rgb_statistics_unless_mean_std_are_given() -> None:
    from pydantic import ValidationError

    from medtransfer.config import load_config
    from medtransfer.data.spec import IMAGENET_MEAN, InputSpec
    from medtransfer.training.run import resolve_input_spec

    assert InputSpec(channels=3).mean == IMAGENET_MEAN and len(InputSpec(channels=3).std) == 3
    cfg = load_config(None, ["input.channels=3"])  # used to be refused: grey mean/std with 3 channels
    assert len(resolve_input_spec(cfg).mean) == 3  # then the backbone's own statistics
    with pytest.raises(ValidationError, match="one value per channel"):
        InputSpec(channels=3, mean=(0.5,), std=(0.5,))  # what the user set explicitly is still checked
