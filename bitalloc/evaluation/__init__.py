"""Evaluation: perplexity, how close a plan's quantized starts are to the original (KL, top-1,
embedding cosine; `fidelity`), and the report figures (`report`)."""

from .fidelity import evaluate, evaluation_sentences, format_evaluation
from .figures import ReportFiles, report
from .likelihood import perplexity

__all__ = ["ReportFiles", "evaluate", "evaluation_sentences", "format_evaluation", "perplexity", "report"]
