"""Images merged into the text without the CPU waiting for the GPU: a speed candidate for training on images.

transformers' Gemma 4 forward (``transformers/models/gemma4/modeling_gemma4.py``) makes the CPU wait for the GPU
between the vision tower and the language model: the vision model drops its padding rows by a boolean index (how many
rows remain depends on the data, so the CPU must read it), ``get_image_features`` reads the split sizes with
``.tolist()``, and the image-token check counts ``inputs_embeds[image_mask]`` and formats a count tensor into its
message; then the language model's attention masks are built, and their checks read the padding mask on the host.
While the CPU waits, the GPU's queue runs dry, and the language model's first layers are then launched while the GPU
idles.

This module computes the same embeddings with shapes that do not depend on the data. The vision tower runs as
transformers runs it, but its pooled rows keep their padding; the k-th image token of the text takes the k-th real
row, found by a stable sort of the padding mask and a running count of image tokens. The merged embeddings go to the
model as ``inputs_embeds``, so transformers' own image branch has nothing to do. Its count check becomes
``torch._assert_async``: on a GPU a wrong count fails as a device-side assert, which ends the process. The text's
masks are built first, before the vision tower, so their wait comes where the forward starts (the vision tower's own
mask waits there too), not between the towers; ``tests/test_gpu.py`` counts the waits there.

``merge_images_without_sync(model)`` installs it as a forward pre-hook on the model's ``Gemma4Model`` (the class of
every size but the 12B) and returns the hook's handle. Batches with video or audio, generation, and positional calls
take transformers' path. The training bench's ``*-sync-free-images`` variants time it;
``tests/test_sync_free_images.py`` checks it against transformers' path.
"""

import torch


def core_model(model):
    """The ``Gemma4Model`` inside ``model`` (``helpers.modeling.unwrap_gemma4``: PEFT-wrapped or not), which merges
    images into the text."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4Model

    from helpers.modeling import unwrap_gemma4

    core = getattr(unwrap_gemma4(model), "model", None)
    if type(core) is not Gemma4Model:
        raise ValueError(f"{type(model).__name__} holds a {type(core).__name__}, not a Gemma4Model")
    return core


def padded_image_rows(core, pixel_values: torch.Tensor, image_position_ids: torch.Tensor):
    """The soft tokens of every image, padding rows kept: ``(images, soft tokens, hidden)``, and which rows are
    real, ``(images, soft tokens)``. ``Gemma4VisionModel.forward`` and ``Gemma4Model.get_image_features`` without
    the boolean index that drops the padding and without the split by image."""
    tower = core.vision_tower
    output_length = pixel_values.shape[-2] // tower.config.pooling_kernel_size**2
    padding = (image_position_ids == -1).all(dim=-1)
    patches = tower.patch_embedder(pixel_values, image_position_ids, padding)
    encoded = tower.encoder(inputs_embeds=patches, attention_mask=~padding, pixel_position_ids=image_position_ids)
    rows, real = tower.pooler(hidden_states=encoded.last_hidden_state, pixel_position_ids=image_position_ids,
                              padding_positions=padding, output_length=output_length)
    if tower.config.standardize:  # in float32, as the vision model does, then the working dtype
        rows = (rows - tower.std_bias.float()) * tower.std_scale.float()
    return core.embed_vision(inputs_embeds=rows.to(patches.dtype)), real


def ids_without_placeholders(core, input_ids: torch.Tensor) -> torch.Tensor:
    """The ids with every image, video and audio token as padding, as transformers embeds the text."""
    config = core.config
    multimodal = ((input_ids == config.image_token_id) | (input_ids == config.video_token_id)
                  | (input_ids == config.audio_token_id))
    return torch.where(multimodal, config.get_text_config().pad_token_id, input_ids)


def merged_embeddings(core, input_ids: torch.Tensor, text_embeddings: torch.Tensor, rows: torch.Tensor,
                      real: torch.Tensor) -> torch.Tensor:
    """The text's embeddings with the k-th image token replaced by the k-th real image row (images in order, rows
    in order within each), as ``masked_scatter`` does with the padding dropped."""
    image_tokens = input_ids == core.config.image_token_id
    real = real.flatten()
    torch._assert_async(image_tokens.sum() == real.sum())  # transformers' count check, without a wait
    real_rows_first = torch.argsort((~real).to(torch.uint8), stable=True)  # real rows, in order, then padding
    # every position gathers a row (a fixed shape); text positions before the first image token would ask for row
    # -1, so clamp them, and torch.where keeps the text's own embedding at every text position
    kth_image_token = (image_tokens.flatten().cumsum(0) - 1).clamp(min=0).view_as(input_ids)
    image_rows = rows.flatten(0, 1)[real_rows_first[kth_image_token]].to(text_embeddings.dtype)
    return torch.where(image_tokens.unsqueeze(-1), image_rows, text_embeddings)


def text_masks(core, kwargs: dict, text_embeddings: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """The language model's attention masks, by transformers' own function for them. Its checks read the padding
    mask on the host, so building them waits for the GPU: here that happens before the vision tower runs, and the
    language model, given the masks, builds none after it."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4ForConditionalGeneration

    masks = kwargs.get("attention_mask")
    if isinstance(masks, dict):
        return masks
    return Gemma4ForConditionalGeneration.create_masks_for_generate(
        config=core.config, inputs_embeds=text_embeddings, attention_mask=masks, past_key_values=None,
        position_ids=position_ids, mm_token_type_ids=kwargs.get("mm_token_type_ids"))


def merge_before_forward(core, args, kwargs):
    """The pre-hook: images and text ids in; merged ``inputs_embeds``, the text's masks and positions (and, for the
    E-series, the per-layer inputs, which transformers looks up from the ids with image tokens as padding) out."""
    pixel_values, input_ids = kwargs.get("pixel_values"), kwargs.get("input_ids")
    others = ("past_key_values", "pixel_values_videos", "input_features", "mm_encoder_outputs")
    if args or pixel_values is None or input_ids is None or any(kwargs.get(k) is not None for k in others):
        return None  # text only, generation, video, audio, given features, a positional call: transformers' path
    text_ids = ids_without_placeholders(core, input_ids)
    text_embeddings = core.get_input_embeddings()(text_ids)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # as Gemma4Model.forward numbers them without a cache
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    masks = text_masks(core, kwargs, text_embeddings, position_ids)
    rows, real = padded_image_rows(core, pixel_values, kwargs["image_position_ids"])
    kwargs = dict(kwargs, pixel_values=None, image_position_ids=None, input_ids=None, attention_mask=masks,
                  position_ids=position_ids, inputs_embeds=merged_embeddings(core, input_ids, text_embeddings, rows, real))
    if core.config.get_text_config().hidden_size_per_layer_input and kwargs.get("per_layer_inputs") is None:
        kwargs["per_layer_inputs"] = core.language_model.get_per_layer_inputs(text_ids)
    return (), kwargs


def merge_images_without_sync(model) -> torch.utils.hooks.RemovableHandle:
    """Installs ``merge_before_forward`` on ``model``'s ``Gemma4Model``; ``.remove()`` the handle to undo it."""
    return core_model(model).register_forward_pre_hook(merge_before_forward, with_kwargs=True)
