"""The loss only where labels are kept. Taught in notebook 04.

Gemma 4's vocabulary has 262,144 entries. ``model(**batch, labels=...)`` materialises logits for every
position (batch × sequence × 262,144, in float32 for the loss): for one 31B sample of ~300 tokens
that is ~315 MB of logits, and more for their gradient, although only the answer's few tokens carry a
label. Here the hidden states are gathered at the labelled positions first, then ``lm_head`` and
Gemma 4's final logit softcap are applied to those rows only. The value is the same (tests check it).

For training, all of this happens *inside* the model's own forward (``model(...)``), with a pre-hook that
hands ``lm_head`` the labelled rows only: DDP synchronises gradients only for a forward called through its
wrapper, and FSDP gathers ``lm_head``'s sharded weight only inside the root module's forward, so calling
``gemma.model`` and ``lm_head`` directly would silently skip both (notebook 04's single-GPU path is the same
code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of a position that is not trained (PyTorch's cross-entropy default)
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_position_ids", "mm_token_type_ids",
                "position_ids")


def unwrap_gemma4(model):
    """The ``Gemma4ForConditionalGeneration`` inside a PEFT / DDP / compiled wrapper."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def softcapped_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """``lm_head`` then Gemma 4's final logit softcap (cap · tanh(logits / cap))."""
    gemma = unwrap_gemma4(model)
    logits = gemma.lm_head(hidden)
    cap = gemma.config.get_text_config().final_logit_softcapping
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def labelled_index(labels: torch.Tensor) -> torch.Tensor:
    """Where the labelled positions are: flat indices into ``labels.flatten()`` of the positions whose *next*
    label is kept (the hidden state there predicts it), in row-major order.

    On a GPU its data-dependent size costs one device sync (the CPU waits for the GPU); checking its size for no
    label and selecting rows and targets by it cost none, where ``keep.any()`` and the boolean selections of the
    rows and of the targets were one sync each."""
    predicts_a_label = torch.zeros_like(labels, dtype=torch.bool)
    predicts_a_label[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    index = predicts_a_label.flatten().nonzero().squeeze(1)
    if index.numel() == 0:
        raise ValueError("no labelled tokens in this batch: every label is -100")
    return index


def labelled_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Softcapped logits at the labelled positions and their targets, through ``model``'s own forward.

    ``model`` may be wrapped (PEFT, DDP, FSDP): the call goes through every wrapper, and a pre-hook on
    ``lm_head`` replaces its input (every position's hidden state) with the labelled rows only.
    """
    labels = batch["labels"]
    index = labelled_index(labels)

    def labelled_rows(module, args):
        hidden = args[0]
        if hidden.shape[:-1] != labels.shape:  # known on the host: a wrong row would be picked silently
            raise ValueError(f"hidden states {tuple(hidden.shape[:-1])} do not match labels {tuple(labels.shape)}")
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, index),)

    handle = unwrap_gemma4(model).lm_head.register_forward_pre_hook(labelled_rows)
    try:
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        logits = model(**inputs, use_cache=False).logits  # Gemma 4's softcap is applied by its forward
    finally:
        handle.remove()
    return logits, labels.flatten().index_select(0, index + 1)


def labelled_positions_loss(model, batch: dict, num_items_in_batch: int | None = None) -> torch.Tensor:
    """Cross-entropy over labelled tokens only; a sum over ``num_items_in_batch`` when given.

    With gradient accumulation, dividing each micro-batch's sum by the number of labelled tokens in the
    whole accumulated batch gives exactly the mean over that batch (transformers' Trainer passes it; with
    several processes it is the count over all of them).
    """
    logits, targets = labelled_logits(model, batch)
    logits = logits.float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch


def full_logits_loss(model, batch: dict) -> torch.Tensor:
    """The reference: every position's logits, then transformers' own loss (used in tests only)."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    return model(**inputs, labels=batch["labels"], use_cache=False).loss
