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
    """The text's token ids (1-D, no special tokens), cut to ``max_tokens``.

    With ``max_tokens``, only a prefix of the text is tokenized (see `tokenize_prefix`): the
    same ids as tokenizing the whole text, at the cost of the tokens asked for."""
    if max_tokens is None:
        return torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    return _stable_prefix_ids(tokenizer, lambda chars: (text[:chars], chars >= len(text)), max_tokens)


def tokenize_prefix(tokenizer, text, max_tokens: int, which: str = "calibration") -> torch.Tensor:
    """The first ``max_tokens`` token ids of ``text`` (a file, or None/"default" for the
    built-in ``which`` text), reading and tokenizing only a prefix of it.

    Prefixes of growing length (doubling from 16 characters per token) are tokenized until
    two consecutive ones agree on their first ``max_tokens`` ids and both have more: a token
    never spans the cut then, so the ids equal those of the whole text (a text shorter than
    the prefix is tokenized whole, as before). Memory and time follow the tokens asked for,
    not the size of the file. BitallocError when the text has no tokens."""
    if is_default(text):
        full = read_text(text, which)
        ids = tokenize(tokenizer, full, max_tokens)
    else:
        ids = _stable_prefix_ids(tokenizer, lambda chars: _read_prefix(text, chars, which), max_tokens)
    if ids.numel() == 0:
        name = describe_text(text, which)
        raise BitallocError(f"the {which} text {name} has no tokens: give a text with words")
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _stable_prefix_ids(tokenizer, prefix, max_tokens: int) -> torch.Tensor:
    """``prefix(chars) -> (text, complete)``; see `tokenize_prefix`."""
    chars, previous = max(4096, 16 * max_tokens), None
    while True:
        text, complete = prefix(chars)
        ids = _encode(tokenizer, text)
        if complete:
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        if len(ids) > max_tokens:
            if previous is not None and previous[:max_tokens] == ids[:max_tokens]:
                return torch.tensor(ids[:max_tokens], dtype=torch.long)
            previous = ids
        chars *= 2


def _read_prefix(text, chars: int, which: str) -> tuple[str, bool]:
    """The first ``chars`` characters of the text file ``text`` and whether that is all of it."""
    path = _text_file(text, which)
    try:
        with open(path, encoding="utf-8") as handle:
            prefix = handle.read(chars)
            return prefix, handle.read(1) == ""
    except (OSError, UnicodeDecodeError) as exc:
        raise BitallocError(f"cannot read {which} text {text}: {exc}") from None


def _text_file(text, which: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise BitallocError(f"{which} text not found: {text}")
    return path


def text_sha256(text, which: str = "calibration") -> str:
    """`text_digest` of a text file (streamed: the file is never held whole) or of the
    built-in ``which`` text for None/"default". BitallocError when the text is empty or
    only whitespace (checked here, before any work: nothing to measure on)."""
    if is_default(text):
        return text_digest(read_text(text, which))
    digest, words = hashlib.sha256(), False
    try:
        with open(_text_file(text, which), encoding="utf-8") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk.encode("utf-8"))
                words = words or not chunk.isspace()
    except (OSError, UnicodeDecodeError) as exc:
        raise BitallocError(f"cannot read {which} text {text}: {exc}") from None
    if not words:
        raise BitallocError(f"the {which} text {text} is empty or only whitespace: give a text with words")
    return digest.hexdigest()


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
    path = _text_file(text, which)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BitallocError(f"cannot read {which} text {text}: {exc}") from None


def describe_text(text, which: str = "calibration") -> str:
    """A readable name: the built-in text's description, or the file's name."""
    return text_name(which) if is_default(text) else Path(text).name
