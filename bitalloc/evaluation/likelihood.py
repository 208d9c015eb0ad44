"""Perplexity of a causal LM on token windows."""

from __future__ import annotations

import math

import torch

from ..texts import tokenize, windows


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str | torch.Tensor,
    context: int = 512,
    max_tokens: int | None = None,
) -> float:
    """exp(mean next-token NLL) of a causal LM over non-overlapping ``context``-token windows.

    ``text`` is a string (tokenized with ``tokenizer``, no special tokens) or token ids (then
    ``tokenizer`` may be None). Only whole windows count, except a text shorter than one.
    Each window predicts its tokens 2..n from the ones before (no state across windows).
    """
    ids = text if isinstance(text, torch.Tensor) else tokenize(tokenizer, text)
    ids = ids.reshape(-1)[:max_tokens] if max_tokens is not None else ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least two tokens")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for window in windows(ids, context):
        window = window.unsqueeze(0).to(device)
        logits = model(window, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += window.shape[1] - 1
    return math.exp(total_nll / total_tokens)
