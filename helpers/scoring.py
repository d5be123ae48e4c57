"""Fast evaluation: score every class name as the answer, reusing the prompt's KV cache. Taught in notebook 05.

The seed evaluates by ``generate(max_new_tokens=128)`` and then searches the text for the longest class
name. For a closed set of labels that is slow (one decoding step per generated token, up to 128) and can
answer "Unknown". Here each prompt (image + question) is run once; its KV cache is then reused to score
each class name's tokens followed by the end-of-turn token ``<turn|>``, and the label with the highest
log-likelihood is the prediction. Every answer is a valid label; the scores are real log-likelihoods, so
they also give a ranking (top-k) and a calibrated-looking confidence.

The scores equal those of naive full forward passes over ``prompt + class name`` (``tests/test_scoring.py``
checks it on the tiny model): positions are taken from the attention mask, so left padding changes nothing.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from helpers.losses import IGNORE_INDEX, MODEL_INPUTS

END_OF_TURN = "<turn|>"


def class_token_ids(tokenizer, class_names, end_token: str = END_OF_TURN) -> list[list[int]]:
    """Token ids of each answer as the model would write it: the class name, then ``<turn|>``."""
    end = tokenizer.convert_tokens_to_ids(end_token)
    return [tokenizer.encode(name, add_special_tokens=False) + [end] for name in class_names]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def score_class_names(model, processor_or_tokenizer, prompt_batch: dict, class_names, *,
                      end_token: str = END_OF_TURN, max_logit_bytes: int = 2**30) -> torch.Tensor:
    """Log-likelihood of each class name (plus ``<turn|>``) after each prompt: a ``[batch, classes]`` matrix.

    ``prompt_batch``: the processor's output for the prompts *with* the generation prompt
    (``add_generation_prompt=True``), left-padded as for ``generate``. The prompt runs once; its cache is
    copied per class (in chunks that keep the logits under ``max_logit_bytes``) to score the continuations.
    """
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    candidates = class_token_ids(tokenizer, class_names, end_token)
    device = next(p.device for p in model.parameters())
    inputs = {k: v.to(device) for k, v in prompt_batch.items() if k in MODEL_INPUTS and v is not None}
    mask = inputs["attention_mask"]
    if not bool(mask[:, -1].all()):
        raise ValueError("score_class_names needs left-padded prompts (tokenizer.padding_side = 'left')")
    inputs["position_ids"] = _positions(mask)
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
    batch = mask.shape[0]
    scores = first[:, [c[0] for c in candidates]].clone()  # the first token of every class, for free
    cache = out.past_key_values
    del out

    feeds = [c[:-1] for c in candidates]  # tokens fed after the prompt ...
    targets = [c[1:] for c in candidates]  # ... and the tokens they predict (the rest of the name, <turn|>)
    length = max(len(f) for f in feeds)
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else None
    per_row = length * (vocab or 262_144) * 4
    chunk = max(1, min(len(candidates), max_logit_bytes // max(1, per_row * batch)))
    pad = tokenizer.pad_token_id or 0
    valid = mask.long().sum(-1)  # prompt tokens per row
    for start in range(0, len(candidates), chunk):
        idx = list(range(start, min(start + chunk, len(candidates))))
        k = len(idx)
        ids = torch.full((batch * k, length), pad, dtype=torch.long, device=device)
        cont_mask = torch.zeros((batch * k, length), dtype=mask.dtype, device=device)
        tgt = torch.full((batch * k, length), IGNORE_INDEX, dtype=torch.long, device=device)
        for j, c in enumerate(idx):
            n = len(feeds[c])
            rows = torch.arange(batch, device=device) * k + j
            ids[rows, :n] = torch.tensor(feeds[c], device=device)
            cont_mask[rows, :n] = 1
            tgt[rows, :n] = torch.tensor(targets[c], device=device)
        chunk_cache = copy.deepcopy(cache)
        chunk_cache.batch_repeat_interleave(k)
        full_mask = torch.cat([mask.repeat_interleave(k, dim=0), cont_mask], dim=1)
        positions = valid.repeat_interleave(k)[:, None] + torch.arange(length, device=device)[None]
        logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                       past_key_values=chunk_cache, use_cache=True).logits
        logp = F.log_softmax(logits.float(), dim=-1)
        keep = tgt != IGNORE_INDEX
        token_logp = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0] * keep
        scores[:, start:start + k] += token_logp.sum(-1).view(batch, k)
        del chunk_cache, logits, logp
    return scores


def predict(scores: torch.Tensor) -> torch.Tensor:
    """The class index with the highest log-likelihood, per prompt."""
    return scores.argmax(dim=-1)


@torch.no_grad()
def naive_class_scores(model, tokenizer, prompt_ids: torch.Tensor, extra_inputs: dict, class_names,
                       end_token: str = END_OF_TURN) -> torch.Tensor:
    """The slow reference for one unpadded prompt: a full forward of ``prompt + class`` per class."""
    candidates = class_token_ids(tokenizer, class_names, end_token)
    device = next(p.device for p in model.parameters())
    out = []
    for cand in candidates:
        ids = torch.cat([prompt_ids.to(device), torch.tensor(cand, device=device)])[None]
        extra = {k: v.to(device) for k, v in extra_inputs.items()}
        if "mm_token_type_ids" in extra:
            extra["mm_token_type_ids"] = F.pad(extra["mm_token_type_ids"], (0, len(cand)))
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra, use_cache=False).logits
        logp = F.log_softmax(logits[0, -len(cand) - 1:-1].float(), dim=-1)
        out.append(logp.gather(-1, torch.tensor(cand, device=device)[:, None]).sum())
    return torch.stack(out)
