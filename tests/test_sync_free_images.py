"""benchmarks/sync_free_images.py: images merged into the text from fixed shapes give transformers' logits and
gradients, for images of different shapes (so pooled rows of padding sit between real ones) in both chat families
(CPU; ``tests/test_gpu.py`` checks on a GPU that the merge does not wait for it)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForMultimodalLM, AutoProcessor

from benchmarks.sync_free_images import (
    core_model,
    merge_before_forward,
    merge_images_without_sync,
    padded_image_rows,
)
from helpers.collator import VisionChatCollator


def mixed_shape_batch(path):
    """Four images, square, wide, tall and square: the tall one has fewer real soft tokens than the others."""
    rng = np.random.default_rng(0)
    shapes = [(32, 32), (16, 64), (48, 20), (40, 40)]
    examples = [{"image": Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), "label": i % 3, "row": i}
                for i, (h, w) in enumerate(shapes)]
    batch = VisionChatCollator(AutoProcessor.from_pretrained(path), ["cat", "dog", "bird"],
                               logits_to_keep=True)(examples)
    batch.pop("labels")
    return batch


def logits_and_gradients(model, batch):
    model.zero_grad()
    logits = model(**batch).logits
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(params=["large", "e-series"])
def miniature_path(request, tiny_path, tiny_e_series_path):
    return tiny_path if request.param == "large" else tiny_e_series_path


def test_the_batch_has_padding_rows_between_real_ones(miniature_path):
    model = AutoModelForMultimodalLM.from_pretrained(miniature_path)
    batch = mixed_shape_batch(miniature_path)
    _, real = padded_image_rows(core_model(model), batch["pixel_values"], batch["image_position_ids"])
    per_image = real.sum(dim=-1).tolist()
    assert len(set(per_image)) > 1 and max(per_image) < real.shape[1], per_image


def test_merged_without_sync_gives_transformers_logits_and_gradients(miniature_path):
    model = AutoModelForMultimodalLM.from_pretrained(miniature_path)
    tower = core_model(model).vision_tower
    if tower.config.standardize:  # the miniature's are 0 and 1, which would let a skipped standardization pass
        generator = torch.Generator().manual_seed(0)
        tower.std_bias.normal_(0.0, 0.5, generator=generator)
        tower.std_scale.uniform_(0.5, 2.0, generator=generator)
    batch = mixed_shape_batch(miniature_path)
    want_logits, want_grads = logits_and_gradients(model, batch)
    handle = merge_images_without_sync(model)
    got_logits, got_grads = logits_and_gradients(model, batch)
    handle.remove()
    assert torch.equal(got_logits, want_logits)
    assert got_grads.keys() == want_grads.keys()
    assert any(n.startswith("model.vision_tower") for n in got_grads)  # the image path trains through the merge
    # embed_vision's projection sees the padding rows too (their gradient is zero), so its weight gradient sums
    # in another order; every other gradient is equal
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(logits_and_gradients(model, batch)[0], want_logits)  # removed: transformers' path again


def test_a_wrong_count_of_image_tokens_is_refused(tiny_path):
    model = AutoModelForMultimodalLM.from_pretrained(tiny_path)
    batch = mixed_shape_batch(tiny_path)
    image_token = core_model(model).config.image_token_id
    first = int((batch["input_ids"][0] == image_token).nonzero()[0])
    batch["input_ids"][0, first] = 0  # one image token fewer than the tower's rows
    merge_images_without_sync(model)
    with pytest.raises(RuntimeError):
        model(**batch)


@pytest.mark.parametrize("other", ["pixel_values_videos", "input_features", "mm_encoder_outputs", "past_key_values"])
def test_video_audio_given_features_and_generation_take_transformers_path(tiny_path, other):
    model = AutoModelForMultimodalLM.from_pretrained(tiny_path)
    batch = mixed_shape_batch(tiny_path)
    assert merge_before_forward(core_model(model), (), dict(batch)) is not None
    assert merge_before_forward(core_model(model), (), dict(batch, **{other: object()})) is None
