"""`BatchedPilPixels` (the collator's batched resize/rescale/normalise) against transformers' own
PIL image processor, the reference, on images of many sizes and processor settings: equal bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from pg_finetune.collator import BatchedPilPixels, PaliGemmaCollator
from pg_finetune.tiny import build_processor

SIZES = [(64, 64), (37, 91), (300, 200), (64, 65), (1, 1), (500, 33), (224, 224), (17, 400)]


def _images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    # smooth content too: resampling filters round differently on gradients than on noise
    ramp = np.linspace(0, 255, 90 * 70 * 3).reshape(90, 70, 3).astype(np.uint8)
    return [*images, Image.fromarray(ramp)]


@pytest.mark.parametrize(
    "settings",
    [
        {},  # PaliGemma's: 224 px, bicubic, mean = std = 0.5
        {"size": {"height": 64, "width": 48}, "resample": Image.Resampling.BILINEAR},
        {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
        {"size": {"height": 33, "width": 97}, "resample": Image.Resampling.LANCZOS, "rescale_factor": 1 / 127.5},
        {"resample": Image.Resampling.NEAREST, "image_mean": 0.3, "image_std": 0.7},
    ],
)
def test_equals_the_pil_image_processor_bit_for_bit(settings):
    processor = SiglipImageProcessorPil(**settings)
    batched = BatchedPilPixels.of(processor)
    assert batched is not None
    images = _images(len(settings))
    expected = processor(images, return_tensors="pt")["pixel_values"]
    got = batched(images)
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.is_contiguous()
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "settings",
    [
        {"do_rescale": False},
        {"do_normalize": False},
        {"size": {"shortest_edge": 64}},
    ],
)
def test_settings_it_does_not_transcribe_fall_back_to_the_processor(settings):
    assert BatchedPilPixels.of(SiglipImageProcessorPil(**settings)) is None


def test_collator_pixels_equal_the_processor_with_and_without_its_cache():
    processor = build_processor()
    images = _images(7)
    records = [{"image": image, "prefix": "caption en", "suffix": "x"} for image in images]
    expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    for cache_mb in (0, 64):
        collator = PaliGemmaCollator(processor, max_length=32, pixel_cache_mb=cache_mb)
        assert collator._process_images.__class__ is BatchedPilPixels
        assert torch.equal(collator(records)["pixel_values"], expected)
        assert torch.equal(collator(records[::-1])["pixel_values"], expected.flip(0))  # the cache's hit path


def test_the_pixel_cache_tells_apart_images_with_the_same_bytes_in_another_shape():
    processor = build_processor()
    data = np.random.default_rng(3).integers(0, 256, 2 * 8 * 3, dtype=np.uint8)
    images = [Image.fromarray(data.reshape(2, 8, 3)), Image.fromarray(data.reshape(8, 2, 3))]
    assert images[0].tobytes() == images[1].tobytes()
    records = [{"image": image, "prefix": "caption en", "suffix": "x"} for image in images]
    expected = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert not torch.equal(expected[0], expected[1])
    collator = PaliGemmaCollator(processor, max_length=32, pixel_cache_mb=64)
    assert torch.equal(collator(records[:1])["pixel_values"][0], expected[0])  # cached first
    assert torch.equal(collator(records)["pixel_values"], expected)
