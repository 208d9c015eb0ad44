"""The built-in calibration and evaluation texts, reading user texts, tokenization and windowing.

The built-in texts come from the Python standard library (``pydoc_data.topics``: the
language reference and library topics as English prose), so nothing is downloaded. Its
topics are sorted by key and split in two halves: the first half calibrates, the second
evaluates. Some topics quote others verbatim ("compound" holds the "if", "while", "try"
sections), so the evaluation text drops every paragraph that also occurs in the
calibration text: the two share no paragraph.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import torch

from ..errors import BitallocError

SEPARATOR = "\n\n"
DEFAULT_TEXT = "default"  # names the built-in text wherever a text file may be given


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


def is_default(text) -> bool:
    return text is None or str(text) == DEFAULT_TEXT


def read_text(text, which: str = "calibration") -> str:
    """The text of a file, or the built-in ``which`` text for None/"default"."""
    if is_default(text):
        return calibration_text() if which == "calibration" else evaluation_text()
    path = Path(text)
    if not path.is_file():
        raise BitallocError(f"{which} text not found: {text}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BitallocError(f"cannot read {which} text {text}: {exc}") from None


def describe_text(text, which: str = "calibration") -> str:
    """A readable name: the built-in text's description, or the file's name."""
    return text_name(which) if is_default(text) else Path(text).name
