"""Calibration and evaluation texts are tokenized only as far as the tokens asked for, with
the same ids as tokenizing the whole text (`bitalloc.texts.tokenize_prefix`)."""

from __future__ import annotations

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.texts import calibration_text, tokenize, tokenize_prefix


def trained_tokenizer(pre_tokenizer: str):
    """A BPE tokenizer (2,000 merges' worth) trained here on the built-in text: real merges
    across characters, byte-level (GPT-2 style) or Metaspace (SentencePiece/llama style)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    if pre_tokenizer == "bytelevel":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator([calibration_text()[:300_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


class Recording:
    """A tokenizer that records the length of every text it is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def tokenizer(request):
    return trained_tokenizer(request.param)


def test_prefix_ids_equal_the_whole_texts(tokenizer, tmp_path):
    text = calibration_text()
    full = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(full) > 20_000
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    for tokens in (1, 7, 256, 3001, 20_000, len(full) + 10):
        assert tokenize(tokenizer, text, tokens).tolist() == full[:tokens]
        assert tokenize_prefix(tokenizer, path, tokens).tolist() == full[:tokens]
        assert tokenize_prefix(tokenizer, "default", tokens).tolist() == full[:tokens]


def test_a_big_text_is_read_and_tokenized_only_as_far_as_needed(tokenizer, tmp_path):
    text = calibration_text()
    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(100):  # ~ 20 MB
            handle.write(text)
    assert path.stat().st_size > 15_000_000
    recording = Recording(tokenizer)
    ids = tokenize_prefix(recording, path, 256)
    expected = tokenizer(text[:100_000], add_special_tokens=False, verbose=False)["input_ids"][:256]
    assert ids.tolist() == expected
    assert ids.dtype == torch.long
    assert max(recording.lengths) <= 16_384  # characters: prefixes of 4,096 doubling, not 20 MB
    assert sum(recording.lengths) <= 32_768
    recording = Recording(tokenizer)  # a text already in memory (the evaluation text)
    assert tokenize(recording, text * 10, 256).tolist() == expected
    assert max(recording.lengths) <= 16_384


def test_a_text_without_tokens_is_refused(tmp_path):
    class NoTokens:
        def __call__(self, text, **kwargs):
            return {"input_ids": []}

    path = tmp_path / "t.txt"
    path.write_text("words\n")
    with pytest.raises(BitallocError, match="no tokens"):
        tokenize_prefix(NoTokens(), path, 256)
