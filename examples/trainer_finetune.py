"""Fine-tune a `bitalloc apply` output with the standard Hugging Face stack: `Trainer` + PEFT.

The only bitalloc-specific line is ``import bitalloc`` (it registers the ``bitalloc``
quantization method with transformers); everything else is the usual QLoRA recipe:

1. ``AutoModelForCausalLM.from_pretrained(OUT/quantized, dtype=..., device_map=...)``: the
   packed mixed-precision backbone (QuantLinear layers),
2. ``prepare_model_for_kbit_training`` and ``PeftModel.from_pretrained(OUT/adapter,
   is_trainable=True)``: the LoftQ adapter, trainable,
3. ``Trainer`` on text that ships with Python (stdlib docstrings; nothing is downloaded),
4. ``trainer.save_model`` (the trained adapter), a ``generate`` sample, and with ``--merge``
   ``merge_and_unload`` into a plain dense checkpoint that needs no bitalloc.

Make OUT with ``bitalloc apply MODEL --plan plan.json -o OUT`` (or examples/finetune_smollm2.py,
which writes OUT/artifacts); the folder needs a tokenizer (a safetensors model folder or a
GGUF with one). CPU or CUDA:

    python examples/trainer_finetune.py runs/smollm2/artifacts --steps 200 --output runs/trained
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from finetune_smollm2 import training_text  # noqa: E402  (the same stdlib text)


class Windows(torch.utils.data.Dataset):
    """Consecutive seq_len-token windows of one long token sequence (labels = inputs)."""

    def __init__(self, token_ids: torch.Tensor, seq_len: int) -> None:
        count = len(token_ids) // seq_len
        self.rows = token_ids[: count * seq_len].reshape(count, seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", type=Path, help="a bitalloc apply output (quantized/ and adapter/)")
    parser.add_argument("--output", type=Path, required=True, help="where the trained adapter goes")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or CUDA)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--merge", action="store_true", help="also write OUTPUT/merged, a dense checkpoint")
    args = parser.parse_args()

    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    import bitalloc  # noqa: F401  (registers quant_method "bitalloc" with transformers)

    quantized, adapter = args.artifacts / "quantized", args.artifacts / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(quantized)
    model = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32, device_map="auto")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    model.print_trainable_parameters()  # packed weights are buffers: see docs/apply.md

    token_ids = tokenizer(training_text(), return_tensors="pt").input_ids[0]
    training = TrainingArguments(
        output_dir=str(args.output / "checkpoints"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, logging_steps=10,
        save_strategy="no", report_to=[], bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=training, train_dataset=Windows(token_ids, args.seq_len))
    trainer.train()
    trainer.save_model(str(args.output / "adapter"))
    print(f"saved the trained adapter to {args.output / 'adapter'}")

    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    prompt = tokenizer("The json module", return_tensors="pt").to(model.device)
    with torch.no_grad():
        sample = model.generate(**prompt, max_new_tokens=30, do_sample=False)
    print("sample:", tokenizer.decode(sample[0], skip_special_tokens=True))
    if args.merge:
        merged = model.merge_and_unload()  # dequantizes: a dense model, with a warning
        merged.save_pretrained(args.output / "merged")
        tokenizer.save_pretrained(args.output / "merged")
        print(f"saved the merged dense model to {args.output / 'merged'}")


if __name__ == "__main__":
    main()
