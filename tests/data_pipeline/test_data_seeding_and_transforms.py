"""seeding.derive_seed and the reader-side image transforms."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.samples import SampleSpec
from data_pipeline.seeding import derive_seed
from data_pipeline.transforms import SquareCrops, random_square_crop, to_tensor
from dp_testlib import flat, make_reader

# ------------------------------------------------------------------ derive_seed


def test_derive_seed_is_deterministic_and_pinned() -> None:
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    # Pinned values: a change would silently change every shuffle and crop of existing runs.
    assert derive_seed() == 0x6A09E667F3BCC908 >> 1
    assert [derive_seed(0), derive_seed(0, 0), derive_seed(7, 1, 2), derive_seed(1234, 0, 3, 17)] == [
        963809279175046933, 6992918295576740008, 2062217808558084945, 8809177748180559737]
    assert derive_seed(-1) == derive_seed(2**64 - 1)  # parts are taken modulo 2**64


def test_derive_seed_differs_by_any_part() -> None:
    base = (3, 1, 4, 1, 5)
    seeds = {derive_seed(*base)}
    for i in range(len(base)):
        for delta in (1, -1, 2**32, 2**62):
            changed = list(base)
            changed[i] += delta
            seeds.add(derive_seed(*changed))
    assert len(seeds) == 1 + 4 * len(base)
    assert derive_seed(0, 1) != derive_seed(1, 0)  # order matters
    assert derive_seed(1, 2) != derive_seed(1, 2, 0)  # length matters


def test_derive_seed_is_63_bit_non_negative_and_spread() -> None:
    seeds = [derive_seed(a, b, c) for a, b, c in itertools.product(range(8), range(8), (-1, 0, 2**63))]
    assert len(set(seeds)) == len(seeds) == 192
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)
    assert max(seeds) > 2**62  # uses the high bits
    bits = np.array([[(s >> k) & 1 for k in range(63)] for s in seeds])
    assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 0.15)  # every bit roughly balanced
    np.random.default_rng(max(seeds))  # usable as a numpy seed


# ------------------------------------------------------------------ transforms


def gradient(width: int, height: int) -> Image.Image:
    """Every column and row different, so any shift of a crop changes its pixels."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 128.0)], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def test_to_tensor_range_and_layout() -> None:
    img = Image.fromarray(np.array([[[0, 255, 127]]], dtype=np.uint8), "RGB")
    t = to_tensor(img)
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.flatten().tolist() == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1.0])


@pytest.mark.parametrize(("width", "height"), [(64, 32), (32, 64), (40, 40), (10, 90)])
def test_random_square_crop_shape_and_determinism(width: int, height: int) -> None:
    img = gradient(width, height)
    crop = random_square_crop(img, 16, seed=5)
    assert crop.size == (16, 16) and crop.mode == "RGB"
    assert crop.tobytes() == random_square_crop(img, 16, seed=5).tobytes()
    crops = {random_square_crop(img, 16, seed=s).tobytes() for s in range(20)}
    # The short side is resized to 16: a square image has one crop, others have many.
    assert (len(crops) == 1) == (width == height)
    if width != height:
        assert len(crops) >= 5


def test_random_square_crop_upscales_small_images() -> None:
    crop = random_square_crop(gradient(8, 4), 32, seed=0)
    assert crop.size == (32, 32)


def test_square_crops_tensor_values_and_seed() -> None:
    sample = {"image": gradient(96, 48), "seed": derive_seed(1, 2)}
    t = SquareCrops(24)(sample)
    assert t.shape == (3, 24, 24) and t.dtype == torch.float32
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert float(t.max() - t.min()) > 0.5  # a real image, not a constant
    assert torch.equal(t, SquareCrops(24)(dict(sample)))
    other = SquareCrops(24)({**sample, "seed": derive_seed(1, 3)})
    assert not torch.equal(t, other)


class KeyedCrops:
    """Transform: (key, 16x16 crop tensor) per sample (picklable)."""

    def __call__(self, sample: dict[str, Any]) -> tuple[str, torch.Tensor]:
        return sample["__key__"], SquareCrops(16)(sample)


def as_list(batch: list[Any]) -> list[Any]:
    return batch


def test_reader_crops_the_same_pixels_for_any_worker_count(dp_toy) -> None:
    spec = SampleSpec(GroundTruthAccess.NONE)
    crops = [dict(flat(make_reader(dp_toy.train_shards, spec=spec, workers=w, transform=KeyedCrops(),
                                   collate=as_list, seed=9))) for w in (0, 2)]
    assert sorted(crops[0]) == sorted(crops[1]) == dp_toy.train_keys
    for key in crops[0]:
        assert torch.equal(crops[0][key], crops[1][key]), key
        assert crops[0][key].shape == (3, 16, 16)


def test_reader_with_default_collate_gives_image_batches(dp_toy) -> None:
    """The training path: SquareCrops + default_collate -> (B, 3, S, S) float tensors in [-1, 1]."""
    reader = make_reader(dp_toy.train_shards, spec=SampleSpec(GroundTruthAccess.NONE), transform=SquareCrops(16),
                         collate=torch.utils.data.default_collate, batch_size=8, workers=2)
    batches = list(reader)
    assert [tuple(b.shape) for b in batches] == [(8, 3, 16, 16)] * 4
    assert all(b.dtype == torch.float32 and b.min() >= -1 and b.max() <= 1 for b in batches)
