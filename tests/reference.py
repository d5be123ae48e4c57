"""Slow reference implementations the tests compare the shipped code with (nothing in helpers/ calls them)."""

import torch
import torch.nn.functional as F

from helpers.scoring import END_OF_TURN, class_token_ids


def full_logits_loss(model, batch: dict) -> torch.Tensor:
    """Transformers' own loss: every position's logits, the labels shifted by the model."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "logits_to_keep")}
    return model(**inputs, labels=batch["labels"], use_cache=False).loss


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
