"""What `evaluate` measures per window or sentence: NLL, KL and top-1 agreement of a causal
LM's next-token distributions, or the cosine similarity of an encoder's sentence embeddings,
for each version of the model (`VARIANTS`) against the original's."""

from __future__ import annotations

import math

import numpy as np
import torch

VARIANTS = ("original", "loftq", "qlora")
# Elements per float64 chunk of positions x vocabulary: bounds the temporaries, and at 40 MB
# is above glibc's largest mmap threshold (32 MB), so each chunk's memory goes back to the
# system when freed instead of fragmenting the heap (smaller chunks grew the RSS by ~100 MB
# per window on SmolLM2).
KL_CHUNK_ELEMENTS = 5 << 20


class CausalMetric:
    """Per window: NLL of each start; KL(original || start) and top-1 agreement per token."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.nll = dict.fromkeys(VARIANTS, 0.0)
        self.count = dict.fromkeys(VARIANTS, 0)
        self.kl: dict[str, list[np.ndarray]] = {v: [] for v in VARIANTS[1:]}
        self.agree = dict.fromkeys(VARIANTS[1:], 0)
        self.reference: torch.Tensor | None = None

    def add(self, batch: int, row: int, variant: str, output) -> None:
        logits = output.logits[0, :-1]
        targets = self.batches[batch][row, 1:].to(logits.device)
        if variant == VARIANTS[0]:
            self.reference = logits
        nll, kl, agree = 0.0, [], 0
        step = max(1, KL_CHUNK_ELEMENTS // logits.shape[-1])
        for start in range(0, logits.shape[0], step):
            part = logits[start : start + step]
            logp = torch.log_softmax(part.double(), dim=-1)
            nll -= float(logp.gather(-1, targets[start : start + step].unsqueeze(-1)).sum())
            if variant != VARIANTS[0]:
                ref = self.reference[start : start + step]
                ref_logp = torch.log_softmax(ref.double(), dim=-1)
                logp.neg_().add_(ref_logp)  # log p_original - log p_start
                kl.append(ref_logp.exp_().mul_(logp).sum(-1).cpu().numpy())
                agree += int((part.argmax(-1) == ref.argmax(-1)).sum())
            del logp
        self.nll[variant] += nll
        self.count[variant] += int(logits.shape[0])
        if variant != VARIANTS[0]:
            self.kl[variant].extend(kl)
            self.agree[variant] += agree
        if variant == VARIANTS[-1]:
            self.reference = None

    def results(self) -> dict:
        out = {}
        base = self.nll[VARIANTS[0]] / self.count[VARIANTS[0]]
        for variant in VARIANTS:
            nll = self.nll[variant] / self.count[variant]
            row = {"perplexity": _finite(math.exp(min(nll, 700.0))), "nll": nll}
            if variant != VARIANTS[0]:
                kl = np.concatenate(self.kl[variant])
                row.update(
                    ppl_ratio=_finite(math.exp(min(nll - base, 700.0))),
                    kl_mean=float(kl.mean()),
                    kl_stderr=float(kl.std(ddof=1) / math.sqrt(kl.size)) if kl.size > 1 else 0.0,
                    kl_median=float(np.percentile(kl, 50)),
                    kl_p90=float(np.percentile(kl, 90)),
                    kl_p99=float(np.percentile(kl, 99)),
                    kl_max=float(kl.max()),
                    top1_agreement=self.agree[variant] / kl.size,
                )
            out[variant] = row
        return out


class EmbeddingMetric:
    """Per sentence: the mean-pooled last hidden state; cosine similarity to the original's."""

    def __init__(self, order: list[list[int]]) -> None:
        self.order = order
        self.reference: dict[int, torch.Tensor] = {}
        self.cosines: dict[str, dict[int, float]] = {v: {} for v in VARIANTS[1:]}

    def add(self, batch: int, row: int, variant: str, output) -> None:
        index = self.order[batch][row]
        embedding = output.last_hidden_state[0].double().mean(dim=0)
        if variant == VARIANTS[0]:
            self.reference[index] = embedding
            return
        reference = self.reference[index]
        cosine = torch.nn.functional.cosine_similarity(embedding, reference, dim=0)
        self.cosines[variant][index] = float(cosine)
        if variant == VARIANTS[-1]:
            del self.reference[index]

    def results(self) -> dict:
        out = {VARIANTS[0]: {"cosine_mean": 1.0}}
        for variant, by_index in self.cosines.items():
            values = np.array([by_index[i] for i in sorted(by_index)])
            out[variant] = {
                "cosine_mean": float(values.mean()),
                "cosine_median": float(np.percentile(values, 50)),
                "cosine_p01": float(np.percentile(values, 1)),
                "cosine_min": float(values.min()),
            }
        return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
