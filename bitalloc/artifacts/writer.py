"""Apply a plan: LoftQ for every planned matrix with its own config, then the artifacts.

``OUT/quantized/``    the packed backbone: ``<module>.weight.codes``/``.scales``[/``.scales2``]
                      per planned matrix, every other tensor as it was, config.json, tokenizer,
                      the plan (``bitalloc_plan.json``) and ``bitalloc_quant.json``; load it
                      with `bitalloc.load_quantized`.
``OUT/adapter/``      a PEFT LoRA adapter holding LoftQ's A and B.
``OUT/dequantized/``  (optional) a plain transformers checkpoint with Q as 16-bit weights.

Matrices stream one at a time; each one's result is saved in ``OUT.partial/`` as soon as it
is done, so an interrupted run resumes there. ``OUT.partial/`` is renamed to ``OUT`` at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoints import CONFIG_FILES, Source, open_source
from ..checkpoints.runnable import check_linears
from ..devices import resolve_device
from ..errors import BitallocError
from ..fileio import WorkFolder, atomic_path, check_free_space
from ..lora import LoraSettings, loftq, module_seed
from ..lora.decomposition import check_lora_alpha
from ..planning.plan_file import Plan, most_common
from ..profiling.calibration import weighting
from ..quant import QuantConfig, QuantizedTensor
from .nn import PACKED_NAMES, PACKED_STEM, QUANT_FILE, QUANT_FORMAT, check_quantized

PLAN_FILE = "bitalloc_plan.json"
WORK_FORMAT = "bitalloc.apply-work/v1"
MAX_SHARD_BYTES = 2 * 1024**3
DEQUANTIZED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def apply(
    source: str | os.PathLike | torch.nn.Module | Source | None,
    plan: Plan | str | os.PathLike,
    out_dir: str | os.PathLike,
    lora: LoraSettings | None = None,
    *,
    dequantized: bool = False,
    dequantized_dtype: str = "bf16",
    device: str = "auto",
    quiet: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    calibration: str | os.PathLike | None = None,
    **options,
) -> Path:
    """Run LoftQ for every matrix of ``plan`` on ``source`` and write ``out_dir`` (see above).

    Each matrix gets its plan config and rank and the plan's iterations, seeded as the
    profiler seeded it, so the decomposition is the profiled one. ``lora`` (or the options
    ``lora_alpha=``, ``use_rslora=``) sets the adapter's scaling. ``dequantized`` also
    writes ``OUT/dequantized/`` with Q in ``dequantized_dtype`` (bf16, fp16 or fp32) for
    trainers that cannot load `QuantLinear`; loading that with bitsandbytes quantizes Q a
    second time. Raises BitallocError when ``out_dir`` exists or the plan does not fit the
    model.

    A data-aware plan (objective ``activation``) is decomposed with the activation moments
    h it was planned with: ``calibration`` (a file), by default the one the plan carries
    (``PLAN.calibration.safetensors`` beside a saved plan); its sha256 must match the plan's
    record.
    """
    lora = dataclasses.replace(lora or LoraSettings(), **options)
    lora_alpha, use_rslora = lora.lora_alpha, lora.use_rslora
    check_lora_alpha(lora_alpha)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    column_weights = plan.input_statistics(calibration)
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        raise BitallocError(f"output {out} already exists: remove it or choose another -o")
    if dequantized_dtype not in DEQUANTIZED_DTYPES:
        raise BitallocError(f"unknown dequantized dtype {dequantized_dtype!r}: bf16, fp16 or fp32")
    torch_device = resolve_device(device)
    matrices = _open_matrices(source, plan)
    ranks = {name: int(entry.get("rank", plan.defaults["rank"])) for name, entry in plan.modules.items()}
    identity = {
        "format": WORK_FORMAT,
        "plan": hashlib.sha256(plan.to_json().encode()).hexdigest(),
        "weights": matrices.file_stats() or matrices.content_digest(),
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "calibration": (plan.calibration or {}).get("digest"),
    }
    done = Path(f"{out}.partial") / "matrices"  # a resumed run's finished matrices
    needed = _bytes_to_write(plan, matrices, ranks, done, dequantized_dtype, dequantized)
    check_free_space(out, needed, f"the output {out}")
    work = _WorkDir(Path(f"{out}.partial"), identity)
    try:
        _build(plan, matrices, ranks, work, out, lora, torch_device, quiet, column_weights,
               dequantized, dequantized_dtype, max_shard_bytes)  # fmt: skip
    finally:
        work.folder.close()
    return out


def _build(plan, matrices, ranks, work, out, lora, torch_device, quiet, column_weights,
           dequantized, dequantized_dtype, max_shard_bytes) -> None:  # fmt: skip
    """Decompose (resumable), write every part into ``OUT.partial/build``, check that it
    loads, and rename it to ``out``."""
    lora_alpha, use_rslora = lora.lora_alpha, lora.use_rslora
    _decompose(plan, matrices, ranks, work, lora_alpha, use_rslora, torch_device, quiet, column_weights)
    build = work.path / "build"
    shutil.rmtree(build, ignore_errors=True)
    _write_quantized(build / "quantized", matrices, plan, ranks, work, max_shard_bytes)
    base = str((out / "quantized").resolve())  # what the adapter was made for: Q, not W
    _write_adapter(build / "adapter", base, matrices, plan, ranks, work, lora_alpha, use_rslora)
    if dequantized:
        dtype = DEQUANTIZED_DTYPES[dequantized_dtype]
        items = _items(matrices, plan, lambda module: _dequantized_item(work, plan, module, dtype))
        _write_checkpoint(build / "dequantized", items, max_shard_bytes)
        for file in (build / "quantized").iterdir():  # config and tokenizer, built once
            if CONFIG_FILES.match(file.name):
                shutil.copyfile(file, build / "dequantized" / file.name)
    check_quantized(build / "quantized")  # what we wrote loads: names, shapes, dtypes
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() or out.is_symlink():
        raise BitallocError(f"output {out} appeared while apply ran: its work is kept in {work.path}")
    os.replace(build, out)
    work.folder.remove()


def _bytes_to_write(plan, matrices, ranks, done: Path, dequantized_dtype: str, dequantized: bool) -> int:
    """What `apply` still writes, in bytes: each matrix's packed weight and LoRA factors in
    ``OUT.partial/`` (those not done yet), then the backbone (packed matrices and every
    other tensor), the adapter and, if asked, the dequantized checkpoint beside them."""
    packed = lora = dense = 0
    todo = 0
    for name, entry in plan.modules.items():
        rows, cols = entry["shape"]
        size = math.ceil(QuantConfig.parse(entry["config"]).storage_bits((rows, cols)) / 8)
        factors = 4 * ranks[name] * (rows + cols)
        packed, lora, dense = packed + size, lora + factors, dense + rows * cols
        if not (done / f"{name}.safetensors").exists():
            todo += size + 2 * factors  # A and B are kept in float32 beside Q
    planned = {f"{name}.weight" for name in plan.modules}
    others = sum(matrices.tensor_nbytes(t) for t in matrices.tensor_names() if t not in planned)
    total = todo + packed + others + lora
    if dequantized:
        total += others + dense * DEQUANTIZED_DTYPES[dequantized_dtype].itemsize
    return total


def check_plan(plan: Plan, source: Source) -> None:
    """BitallocError naming the first plan module the model lacks or whose shape differs."""
    for name in [*plan.modules, *plan.kept]:
        if name not in source.all_matrices:
            raise BitallocError(f"plan module {name} not in model {source.name}")
    for name, entry in plan.modules.items():
        planned, actual = tuple(entry["shape"]), source.all_matrices[name]
        if planned != actual:
            raise BitallocError(
                f"shape mismatch for {name}: plan {planned[0]}x{planned[1]}, model {actual[0]}x{actual[1]}"
            )
        rank = int(entry.get("rank", plan.defaults["rank"]))
        if rank > min(actual):
            raise BitallocError(f"plan rank {rank} for {name} exceeds its size {actual[0]}x{actual[1]}")


def _open_matrices(source, plan: Plan) -> Source:
    """The model's reader selecting exactly the plan's matrices (quantized and kept), after
    checking names and shapes; warns when its fingerprint differs from the plan's."""
    reader = open_source(source, modules=[])
    reader.require_config()
    check_plan(plan, reader)
    check_linears(source if isinstance(source, torch.nn.Module) else reader, [*plan.modules])
    matrices = reader.with_modules([*plan.modules, *plan.kept])
    expected = plan.model.get("fingerprint")
    if expected is not None and matrices.fingerprint() != expected:
        raise BitallocError(
            f"the plan's matrices (quantized and kept) are not the ones its profile measured "
            f"(fingerprint {expected[:12]}): was a matrix added to or removed from the plan by hand? "
            "plan again from the profile"
        )
    return matrices


class _WorkDir:
    """``OUT.partial/``: job.json (what the work is for) and one safetensors file per matrix."""

    def __init__(self, path: Path, identity: dict) -> None:
        self.folder = WorkFolder(path, legacy=("job.json",)).open()
        self.path = path
        job = path / "job.json"
        if job.exists():
            try:
                other = json.loads(job.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                other = None
            if other != identity:
                self.folder.close()
                raise BitallocError(
                    f"{path} holds work for another plan, model or LoRA settings: delete it to start over"
                )
        else:
            self.folder.clear()
            with atomic_path(job) as temp:
                temp.write_text(json.dumps(identity, indent=1, sort_keys=True), encoding="utf-8")

    def file(self, module: str) -> Path:
        return self.matrices / f"{module}.safetensors"

    @property
    def matrices(self) -> Path:
        return self.path / "matrices"

    def load(self, module: str, key: str) -> torch.Tensor:
        with safe_open(self.file(module), framework="pt") as handle:
            return handle.get_tensor(key)

    def rel_error(self, module: str) -> float:
        with safe_open(self.file(module), framework="pt") as handle:
            return float(handle.metadata()["rel_error"])

    def quantized(self, module: str, plan: Plan) -> QuantizedTensor:
        entry = plan.modules[module]
        with safe_open(self.file(module), framework="pt") as handle:
            parts = {
                p: handle.get_tensor(f"weight.{p}") for p in PACKED_NAMES if f"weight.{p}" in handle.keys()
            }
        return QuantizedTensor.from_tensors(parts, entry["config"], tuple(entry["shape"]))


def _decompose(plan, matrices, ranks, work, lora_alpha, use_rslora, device, quiet, column_weights=None):
    """LoftQ for each planned matrix not yet done, one at a time, saved as it finishes."""
    from tqdm.auto import tqdm

    todo = [name for name in plan.modules if not work.file(name).exists()]
    bar = tqdm(total=len(plan.modules), initial=len(plan.modules) - len(todo), unit="matrix",
               disable=quiet, dynamic_ncols=True, desc="apply")  # fmt: skip
    work.matrices.mkdir(exist_ok=True)
    for name in todo:
        config = QuantConfig.parse(plan.modules[name]["config"])
        rank = ranks[name]
        result = loftq(
            matrices.read(name), config, rank=rank, iters=plan.defaults["iters"],
            lora_alpha=(rank or None) if lora_alpha is None else lora_alpha, use_rslora=use_rslora,
            seed=module_seed(name, config), device=device,
            **weighting(column_weights, name),
        )  # fmt: skip
        tensors = {f"weight.{part}": t.cpu().contiguous() for part, t in result.q.tensors().items()}
        tensors["lora_A"] = result.lora_A.float().cpu().contiguous()
        tensors["lora_B"] = result.lora_B.float().cpu().contiguous()
        with atomic_path(work.file(name)) as temp:
            save_file(tensors, str(temp), metadata={"rel_error": repr(result.rel_error)})
        bar.set_postfix_str(f"{name} rel_error {result.rel_error:.4f}")
        bar.update(1)
    bar.close()


# ---- writing ----------------------------------------------------------------------------

Item = tuple[str, int, Callable[[], torch.Tensor]]  # (tensor name, bytes, loader)


def _items(source: Source, plan: Plan, planned: Callable[[str], list[Item]]) -> list[Item]:
    """Every backbone tensor in order, each planned weight replaced by ``planned(module)``."""
    items: list[Item] = []
    for name in source.tensor_names():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in plan.modules:
            items += planned(module)
        else:
            items.append((name, source.tensor_nbytes(name), lambda name=name: source.load_tensor(name)))
    return items


def _packed_items(work: _WorkDir, plan: Plan, module: str) -> list[Item]:
    config = QuantConfig.parse(plan.modules[module]["config"])
    parts = config.storage_bits_parts(tuple(plan.modules[module]["shape"]))
    return [
        (f"{module}.weight.{part}", math.ceil(bits / 8),
         lambda part=part: work.load(module, f"weight.{part}"))
        for part, bits in parts.items()
    ]  # fmt: skip


def _dequantized_item(work: _WorkDir, plan: Plan, module: str, dtype: torch.dtype) -> list[Item]:
    rows, cols = plan.modules[module]["shape"]
    nbytes = rows * cols * dtype.itemsize
    return [(f"{module}.weight", nbytes, lambda: work.quantized(module, plan).dequantize(dtype))]


def _write_checkpoint(folder: Path, items: list[Item], max_shard_bytes: int, stem: str = "model") -> None:
    """Safetensors shards of at most ``max_shard_bytes`` (one ``{stem}.safetensors`` when it
    all fits), with ``{stem}.safetensors.index.json`` when sharded; one shard in memory."""
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item[1] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1]
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{stem}.safetensors"] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    weight_map = {}
    for file, shard in zip(names, shards):
        tensors = {name: load().contiguous() for name, _, load in shard}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i[1] for i in items)}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_quantized(folder, source, plan, ranks, work, max_shard_bytes) -> None:
    items = _items(source, plan, lambda module: _packed_items(work, plan, module))
    _write_checkpoint(folder, items, max_shard_bytes, stem=PACKED_STEM)
    source.write_config(folder)
    info = {
        "format": QUANT_FORMAT,
        "modules": {
            name: {
                "config": entry["config"],
                "shape": list(entry["shape"]),
                "rank": ranks[name],
                "rel_error": work.rel_error(name),
            }
            for name, entry in plan.modules.items()
        },
    }
    (folder / QUANT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (folder / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")


def _write_adapter(folder, base, source, plan, ranks, work, lora_alpha, use_rslora) -> None:
    """A PEFT LoRA adapter: A, B per planned matrix, rank_pattern/alpha_pattern when ranks differ."""
    from peft import LoraConfig

    targets = [name for name in plan.modules if ranks[name] > 0]
    if not targets:  # rank 0: plain quantization, nothing to correct
        return
    rank = most_common(ranks[name] for name in targets)
    differ = {name: ranks[name] for name in targets if ranks[name] != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if lora_alpha is None else lora_alpha,
        target_modules=targets,
        rank_pattern=differ,
        alpha_pattern=differ if lora_alpha is None else {},  # alpha = r: scaling 1 everywhere
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM" if source.is_causal_lm else None,
        base_model_name_or_path=base,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    written = folder / "adapter_config.json"  # PEFT writes target_modules in set order
    saved = json.loads(written.read_text(encoding="utf-8"))
    saved["target_modules"] = targets
    written.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {}
    for name in targets:
        for part in ("lora_A", "lora_B"):
            tensors[f"base_model.model.{name}.{part}.weight"] = work.load(name, part)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
