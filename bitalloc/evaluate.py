"""Perplexity on local text, and the built-in calibration / evaluation texts.

The built-in texts come from the Python standard library (``pydoc_data.topics``: the
language reference and library topics as English prose), so nothing is downloaded. Its
topics are sorted by key and split in two halves: the first half calibrates, the second
evaluates. Some topics quote others verbatim ("compound" holds the "if", "while", "try"
sections), so the evaluation text drops every paragraph that also occurs in the
calibration text: the two share no paragraph.
"""

from __future__ import annotations

import hashlib
import math
import platform

import torch

SEPARATOR = "\n\n"


def _topic_halves() -> tuple[list[str], list[str]]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    return keys[:half], keys[half:]


def _text(keys: list[str]) -> str:
    from pydoc_data.topics import topics

    return SEPARATOR.join(topics[key] for key in keys)


def calibration_text() -> str:
    """The first half (by sorted key) of ``pydoc_data.topics``, topics joined by blank lines."""
    return _text(_topic_halves()[0])


def evaluation_text() -> str:
    """The second half (by sorted key) of ``pydoc_data.topics``, without the paragraphs that
    also occur in the calibration text (so the two share none)."""
    seen = {p.strip() for p in _paragraphs(calibration_text())}
    return SEPARATOR.join(p for p in _paragraphs(_text(_topic_halves()[1])) if p.strip() not in seen)


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split(SEPARATOR) if p.strip()]


def text_name(which: str) -> str:
    """A readable name for a built-in text ("calibration" or "evaluation"), with the keys
    and Python version (the topics change between Python releases)."""
    first, second = _topic_halves()
    keys = first if which == "calibration" else second
    version = platform.python_version()
    name = f"pydoc_data.topics[{keys[0]!r}..{keys[-1]!r}] ({len(keys)} topics, Python {version})"
    return name if which == "calibration" else name + " minus paragraphs shared with calibration"


def text_digest(text: str) -> str:
    """sha256 of the text's UTF-8 bytes (identifies a calibration text in metadata)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """The text's token ids (1-D, no special tokens), cut to ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)
    return ids


def windows(ids: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping windows (n, context) of a 1-D id tensor; a shorter text gives one window."""
    ids = ids.reshape(-1)
    if context <= 0:
        raise ValueError(f"context must be positive, got {context}")
    if ids.numel() < context:
        return ids.unsqueeze(0)
    count = ids.numel() // context
    return ids[: count * context].reshape(count, context)


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
