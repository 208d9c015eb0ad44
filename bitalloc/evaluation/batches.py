"""The evaluation data: a causal LM's token windows, or an encoder's sentences grouped by
length (no padding)."""

from __future__ import annotations

import re

import torch

from ..checkpoints.runnable import BATCH_TOKENS
from ..errors import BitallocError
from ..texts import tokenize, windows

MIN_SENTENCE_WORDS = 5
MAX_SENTENCE_CHARS = 300


def causal_batches(tokenizer, corpus, input_ids, tokens, context):
    if input_ids is None:
        ids = tokenize(tokenizer, corpus, tokens)
    else:
        ids = input_ids.to(torch.long)
        ids = ids.reshape(-1)[:tokens] if ids.dim() == 1 else ids
    rows = windows(ids, context) if ids.dim() == 1 else ids
    if rows.shape[1] < 2:
        raise BitallocError("the evaluation text has fewer than 2 tokens")
    per_batch = max(1, BATCH_TOKENS // rows.shape[1])
    batches = [rows[i : i + per_batch] for i in range(0, rows.shape[0], per_batch)]
    data = {
        "tokens": int(rows.shape[0] * (rows.shape[1] - 1)),
        "windows": int(rows.shape[0]),
        "context": int(rows.shape[1]),
    }
    return batches, data


def evaluation_sentences(text: str) -> list[str]:
    """Prose sentences of a text (paragraphs cut at ., ! or ?; code and short lines dropped),
    each once, in order: what an encoder is evaluated on."""
    seen, sentences = set(), []
    for paragraph in text.split("\n\n"):
        if not paragraph.strip() or paragraph.startswith((" ", "\t")):  # code examples are indented
            continue
        flat = " ".join(paragraph.split())
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = sentence.split()
            if len(words) < MIN_SENTENCE_WORDS or len(sentence) > MAX_SENTENCE_CHARS:
                continue
            if not sentence[0].isalpha() or sentence in seen:
                continue
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def sentence_batches(tokenizer, corpus, input_ids, tokens, context):
    """Sentences as id rows grouped by length (no padding), up to ``tokens`` tokens."""
    if input_ids is not None:
        rows = input_ids.to(torch.long)
        rows = rows.reshape(1, -1) if rows.dim() == 1 else rows
        encoded = [row[:context] for row in rows]
    else:
        encoded, total = [], 0
        for sentence in evaluation_sentences(corpus):
            ids = tokenizer(sentence, add_special_tokens=True, truncation=True, max_length=context)[
                "input_ids"
            ]
            encoded.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
            if total >= tokens:
                break
    if not encoded:
        raise BitallocError("the evaluation text has no sentences to embed")
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(int(ids.numel()), []).append(index)
    batches, order = [], []
    for length in sorted(by_length):
        indices = by_length[length]
        per_batch = max(1, BATCH_TOKENS // length)
        for i in range(0, len(indices), per_batch):
            chunk = indices[i : i + per_batch]
            batches.append(torch.stack([encoded[j] for j in chunk]))
            order.append(chunk)
    data = {"sentences": len(encoded), "tokens": int(sum(ids.numel() for ids in encoded)), "context": context}
    return batches, data, order
