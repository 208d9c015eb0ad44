"""Evaluation: perplexity (and later KL to the original and report figures)."""

from .perplexity import perplexity

__all__ = ["perplexity"]
