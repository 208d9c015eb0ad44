"""transformers Trainer over a bitalloc model loaded with from_pretrained + PEFT: fp32 and bf16
autocast on CPU, gradient checkpointing, prepare_model_for_kbit_training; the adapter saves,
reloads to the same logits and generates; the packed weights never change."""

from __future__ import annotations

import pytest
import torch
from _models import make_tiny_llama
from peft import PeftModel, prepare_model_for_kbit_training
from test_apply import logits
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import bitalloc
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    make_tiny_llama(root / "model", shard_size=None)
    table = profile(root / "model", configs=["nf2-b64-s8b256", "nf4-b64-s8b256"], rank=8, iters=2,
                    device="cpu", quiet=True)  # fmt: skip
    return bitalloc.apply(root / "model", make_plan(table, 3.0), root / "out", device="cpu", quiet=True)


class Rows(torch.utils.data.Dataset):
    """A fixed token pattern the tiny model can learn: loss must fall."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, 256, (2, 16), generator=generator).repeat(8, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_trainer_trains_saves_reloads_and_generates(out, tmp_path, bf16):
    base = AutoModelForCausalLM.from_pretrained(out / "quantized", dtype=torch.float32)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    packed = {n: b.clone() for n, b in model.named_buffers() if n.endswith((".codes", ".scales", ".scales2"))}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=bf16,
        gradient_checkpointing=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(b, packed[n]) for n, b in model.named_buffers() if n in packed)
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()  # no bf16 autocast
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = AutoModelForCausalLM.from_pretrained(out / "quantized", dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-5, atol=1e-5)
    prompt = Rows()[0]["input_ids"][:4].unsqueeze(0)
    with torch.no_grad():
        generated = reloaded.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        again = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 10) and torch.equal(generated, again)
