"""Fast evaluation: every class name scored as the answer, with the prompt run once. Taught in notebook 05.

The seed evaluates by ``generate(max_new_tokens=128)`` and then searches the text for the longest class
name. For a closed set of labels that is slow (one decoding step per generated token, up to 128) and can
answer "Unknown". Here each prompt (image + question) is run once, with every class name's tokens followed by
the end-of-turn token ``<turn|>`` scored in the same pass, and the label with the highest log-likelihood is the
prediction. Every answer is a valid label; the scores are real log-likelihoods, so
they also give a ranking (top-k) and a calibrated-looking confidence.

How the names are scored (``method``):
- ``"tree"`` (the default): the names' tokens form a prefix tree (names that start alike share their first
  tokens' nodes), and every node of it is appended to the prompt in the *same* forward pass as the prompt itself,
  with a tree attention mask: a node sees the prompt and its own ancestors, at the position it would have in
  ``prompt + that name``. One pass in all, no cache: the names cost a few more tokens in the prompt's pass.
- ``"copies"``: the prompt's pass with a cache, then the cache copied once per class (in chunks), each name fed
  as an ordinary continuation. Used when the attention implementation takes no custom mask (not SDPA or eager).

The scores equal those of naive full forward passes over ``prompt + class name`` (``tests/test_scoring.py``
checks both methods on the tiny model): positions are taken from the attention mask, so left padding changes
nothing.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from helpers.collator import IGNORE_INDEX, MODEL_INPUT_KEYS
from helpers.modeling import unwrap_gemma4

END_OF_TURN = "<turn|>"
# What the model's forward takes from a prompt batch (the processor's keys, and the positions scoring sets).
MODEL_INPUTS = (*MODEL_INPUT_KEYS, "position_ids")


def softcapped_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """``lm_head`` then Gemma 4's final logit softcap (cap · tanh(logits / cap)), as the model's forward applies them."""
    gemma = unwrap_gemma4(model)
    logits = gemma.lm_head(hidden)
    cap = gemma.config.get_text_config().final_logit_softcapping
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def class_token_ids(tokenizer, class_names, end_token: str = END_OF_TURN) -> list[list[int]]:
    """Token ids of each answer as the model would write it: the class name, then ``<turn|>``."""
    end = tokenizer.convert_tokens_to_ids(end_token)
    return [tokenizer.encode(name, add_special_tokens=False) + [end] for name in class_names]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def score_class_names(model, processor_or_tokenizer, prompt_batch: dict, class_names, *,
                      end_token: str = END_OF_TURN, max_logit_bytes: int = 2**30, method: str = "tree") -> torch.Tensor:
    """Log-likelihood of each class name (plus ``<turn|>``) after each prompt: a ``[batch, classes]`` matrix.

    ``prompt_batch``: the processor's output for the prompts *with* the generation prompt
    (``add_generation_prompt=True``), left-padded as for ``generate``. The prompt runs once: ``method``
    ``"tree"``, the names' prefix tree in the prompt's own pass, or ``"copies"``, the names on copies of the
    prompt's cache (see the module docstring); float32 logits are kept under ``max_logit_bytes``.
    """
    if method not in ("tree", "copies"):
        raise ValueError(f"method must be 'tree' or 'copies', got {method!r}")
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    candidates = class_token_ids(tokenizer, class_names, end_token)
    device = next(p.device for p in model.parameters())
    inputs = {k: v.to(device) for k, v in prompt_batch.items() if k in MODEL_INPUTS and v is not None}
    mask = inputs["attention_mask"]
    if not bool(mask[:, -1].all()):
        raise ValueError("score_class_names needs left-padded prompts (tokenizer.padding_side = 'left')")
    if method == "tree" and _takes_custom_masks(model):
        return _tree_scores(model, inputs, candidates, max_logit_bytes)
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


def answer_tree(candidates: list[list[int]]) -> tuple[list[int], list[int], list[int], list[list[tuple[int, int]]]]:
    """The prefix tree of the tokens fed after the prompt (each answer but its last token).

    Returns ``tokens``, ``parents`` (-1: the node follows the prompt) and ``depths`` (1 = the first token) per
    node, parents before children; and per answer its ``(node, next token)`` pairs: the node whose output
    predicts that token (the answer's first token is predicted by the prompt itself)."""
    index, tokens, parents, depths = {}, [], [], []
    for answer in candidates:
        for k in range(1, len(answer)):
            prefix = tuple(answer[:k])
            if prefix not in index:
                index[prefix] = len(tokens)
                tokens.append(answer[k - 1])
                parents.append(index.get(prefix[:-1], -1))
                depths.append(k)
    steps = [[(index[tuple(answer[:k])], answer[k]) for k in range(1, len(answer))] for answer in candidates]
    return tokens, parents, depths, steps


def _takes_custom_masks(model) -> bool:
    """SDPA and eager attention take a ready 4-D mask per layer type; other implementations may not."""
    return unwrap_gemma4(model).config.get_text_config()._attn_implementation in ("sdpa", "eager")


def node_rows(prompt_mask: torch.Tensor, parents: list[int], depths: list[int], sliding_window: int | None = None
              ) -> torch.Tensor:
    """What each node of the answer tree attends to, ``[B, nodes, prompt + nodes]`` (True: attend), the nodes
    appended after the left-padded prompt: the prompt's real tokens and the node's own ancestors and itself. With
    ``sliding_window`` (a sliding-attention layer), a key as far back as the window from the node is hidden, as
    in a plain forward over ``prompt + answer``."""
    device = prompt_mask.device
    batch, prompt_len = prompt_mask.shape
    nodes = len(parents)
    ancestors = torch.eye(nodes, dtype=torch.bool)
    for i, parent in enumerate(parents):  # parents come first, so each row copies a finished one
        if parent >= 0:
            ancestors[i] |= ancestors[parent]
    depth = torch.tensor(depths, device=device)
    seen = prompt_mask.bool()[:, None, :].expand(batch, nodes, prompt_len)
    tree = ancestors.to(device)[None].expand(batch, nodes, nodes)
    if sliding_window:
        node_positions = prompt_mask.long().sum(-1, keepdim=True) + depth - 1  # [B, N]
        seen = seen & ((node_positions[:, :, None] - _positions(prompt_mask)[:, None, :]) < sliding_window)
        tree = tree & ((depth[:, None] - depth[None, :]) < sliding_window)[None]
    return torch.cat([seen, tree], dim=-1)


def _with_node_rows(mask, rows: torch.Tensor, sliding_window: int | None):
    """One layer type's mask over ``prompt + nodes`` as transformers made it (``None``: plain causal), with the
    nodes' rows (the last ones) replaced by ``rows``; in the mask's own format (SDPA: bool, eager: additive)."""
    batch, nodes, length = rows.shape
    if mask is None:
        index = torch.arange(length, device=rows.device)
        allowed = index[:, None] >= index[None, :]
        if sliding_window:
            allowed = allowed & (index[:, None] - index[None, :] < sliding_window)
        allowed = allowed[None, None].expand(batch, 1, length, length).clone()
    elif mask.dtype == torch.bool:
        allowed = mask.expand(batch, 1, length, length).clone()
    else:
        allowed = (mask == 0).expand(batch, 1, length, length).clone()
    allowed[:, 0, length - nodes:, :] = rows
    if mask is None or mask.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(~allowed, torch.finfo(mask.dtype).min)


def _tree_scores(model, inputs: dict, candidates, max_logit_bytes: int) -> torch.Tensor:
    """Every answer's log-likelihood, ``[B, classes]``, in one forward pass: the answer tree's nodes appended to
    the prompts, the masks transformers makes for that sequence given node rows of their own (``node_rows``) in
    a pre-hook on the language model, then ``lm_head`` on the last prompt token and the nodes, in chunks."""
    gemma = unwrap_gemma4(model)
    text = gemma.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    mask = inputs["attention_mask"]
    device = mask.device
    batch = mask.shape[0]
    tokens, parents, depths, steps = answer_tree(candidates)
    nodes = len(tokens)
    depth = torch.tensor(depths, device=device)
    joined = dict(inputs)
    joined["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor(tokens, device=device)[None].expand(batch, -1)], 1)
    joined["attention_mask"] = torch.cat([mask, mask.new_ones((batch, nodes))], 1)
    joined["position_ids"] = torch.cat([_positions(mask), mask.long().sum(-1, keepdim=True) + depth - 1], 1)
    if "mm_token_type_ids" in inputs:  # the nodes are text
        joined["mm_token_type_ids"] = F.pad(inputs["mm_token_type_ids"], (0, nodes))
    windows = {kind: window if kind == "sliding_attention" else None for kind in set(text.layer_types)}
    rows = {kind: node_rows(mask, parents, depths, kind_window) for kind, kind_window in windows.items()}
    hidden = {}

    def tree_masks(module, args, kwargs):  # transformers' masks for prompt + nodes, the nodes' rows replaced
        masks = kwargs["attention_mask"]
        kwargs["attention_mask"] = {kind: _with_node_rows(m, rows[kind], windows[kind]) for kind, m in masks.items()}
        return args, kwargs

    def keep_hidden(module, args):  # lm_head sees one row; the kept rows' hidden states are scored below in chunks
        hidden["rows"] = args[0]
        return (args[0][:, :1],)

    handles = [gemma.model.language_model.register_forward_pre_hook(tree_masks, with_kwargs=True),
               gemma.lm_head.register_forward_pre_hook(keep_hidden)]
    try:  # the last prompt token (row 0) predicts every answer's first token; node i (row i + 1) the next one
        model(**joined, use_cache=False, logits_to_keep=nodes + 1)
    finally:
        for handle in handles:
            handle.remove()
    kept = hidden.pop("rows")
    row_of = torch.tensor([r for answer, pairs in zip(candidates, steps) for r in [0] + [n + 1 for n, _ in pairs]],
                          dtype=torch.long, device=device)
    token_of = torch.tensor([t for answer, pairs in zip(candidates, steps) for t in [answer[0]] + [t for _, t in pairs]],
                            dtype=torch.long, device=device)
    answer_of = torch.tensor([c for c, pairs in enumerate(steps) for _ in range(len(pairs) + 1)],
                             dtype=torch.long, device=device)
    picked = torch.zeros((batch, len(row_of)), dtype=torch.float32, device=device)
    vocab = gemma.lm_head.weight.shape[0]
    chunk = max(1, max_logit_bytes // max(1, batch * vocab * 4))
    for start in range(0, nodes + 1, chunk):
        logp = F.log_softmax(softcapped_logits(model, kept[:, start:start + chunk]).float(), dim=-1)
        inside = (row_of >= start) & (row_of < start + chunk)
        picked[:, inside] = logp[:, row_of[inside] - start, token_of[inside]]
        del logp
    scores = torch.zeros((batch, len(candidates)), dtype=torch.float32, device=device)
    return scores.index_add_(1, answer_of, picked)
