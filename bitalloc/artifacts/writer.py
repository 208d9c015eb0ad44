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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoints import CONFIG_FILES, Source, open_source
from ..checkpoints.runnable import check_linears, unexpected_tensors
from ..devices import resolve_device
from ..errors import BitallocError, check_path
from ..fileio import WorkFolder, atomic_path, check_free_space, check_name, save_safetensors
from ..lora import Assignment, LoraSettings, decompose
from ..lora.decomposition import check_lora_alpha, check_lora_scaling
from ..planning.plan_file import Plan, most_common
from ..profiling.calibrator import Calibrator
from ..profiling.objectives import get_objective
from ..profiling.settings import MAX_ITERS
from ..quant import QuantConfig, QuantizedTensor
from .embedding import embedding_items, input_embedding, parse_embedding_config
from .hf_quantizer import mark_config, unmark_config
from .nn import PACKED_NAMES, PACKED_STEM, QUANT_FILE, QUANT_FORMAT, check_quantized

PLAN_FILE = "bitalloc_plan.json"
WORK_FORMAT = "bitalloc.apply-work/v1"
MAX_SHARD_BYTES = 2 * 1024**3
DEQUANTIZED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# OUT/quantized/: bitalloc's packed format, or a compressed-tensors checkpoint (`compressed`)
APPLY_FORMATS = ("bitalloc", "compressed-tensors")


# shape: the public function's documented options (the apply CLI's twin)
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
    verify: bool = False,
    calibration_ids: torch.Tensor | None = None,
    column_weights: dict | None = None,
    unplanned_dtype: str | None = None,
    format: str = "bitalloc",
    embedding_config: str | None = None,
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

    A data-aware plan (objective ``output`` or ``activation``) is decomposed with the
    statistics it was profiled with, computed again one block at a time just before that
    block's matrices (a calibration pass over the model: same tokens, same code, so the same
    decomposition): from its calibration text (``calibration``: the text file when it is not
    at the path the plan records; the built-in text is found by itself), or the same token ids
    (``calibration_ids``) or h (``column_weights``) given again; each is checked by sha256.

    An interrupted run resumes from ``OUT.partial/``; the matrices done there are trusted
    when the weight files' size and modification time are unchanged. ``verify`` re-hashes
    every weight a done matrix was computed from and refuses work from edited weights
    (costs one read of those weights; the default trusts file stats). A run stopped after
    its output was renamed into place but before ``OUT.partial/`` was deleted is finished
    by the rerun (a warning, and ``out_dir`` returned).

    Tensors outside the plan (embeddings, norms, kept matrices) keep the dtype they are stored
    in (a bf16 checkpoint stays 16-bit); a GGUF's quantized ones (Q8_0...) are written as
    bf16. ``unplanned_dtype`` (bf16, fp16, fp32) casts every one of them instead.
    ``embedding_config`` (a config string, e.g. ``int8-b32-sfp16``) stores the input embedding
    quantized in that config instead (`artifacts.embedding`; dense once loaded; bitalloc's format only).

    ``format`` "compressed-tensors" writes ``OUT/quantized/`` as a compressed-tensors
    ``pack-quantized`` checkpoint that transformers loads without bitalloc (see
    `bitalloc.artifacts.compressed`); a plan with a config it cannot store exactly is
    refused before any work.
    """
    lora = dataclasses.replace(lora or LoraSettings(), **options)
    lora_alpha, use_rslora = lora.lora_alpha, lora.use_rslora
    check_lora_alpha(lora_alpha)
    if not isinstance(plan, Plan):
        check_path(plan, "plan (a Plan or a plan file)")
    check_path(out_dir, "out_dir")
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    if format not in APPLY_FORMATS:
        raise BitallocError(f"unknown apply format {format!r}: {' or '.join(APPLY_FORMATS)}")
    if format != "bitalloc":
        from .compressed import check_expressible  # it builds on this module

        check_expressible(plan)
    out = check_name(out_dir)
    WorkFolder.sweep(f"{out}.partial")  # a clean-up cut short: finish deleting what is ours
    if (out.exists() or out.is_symlink()) and not _finished_path(out).is_file():
        raise BitallocError(f"output {out} already exists: remove it or choose another -o")
    if dequantized_dtype not in DEQUANTIZED_DTYPES:
        raise BitallocError(f"unknown dequantized dtype {dequantized_dtype!r}: bf16, fp16 or fp32")
    if unplanned_dtype is not None and unplanned_dtype not in DEQUANTIZED_DTYPES:
        raise BitallocError(f"unknown unplanned dtype {unplanned_dtype!r}: bf16, fp16 or fp32")
    embedding = parse_embedding_config(embedding_config)
    if embedding is not None and format != "bitalloc":
        raise BitallocError(
            f"an embedding stored quantized (embedding_config) is bitalloc's format only, not {format}"
        )
    torch_device = resolve_device(device)
    matrices = _open_matrices(source, plan)
    unplanned = Unplanned(unplanned_dtype)
    if embedding is not None:  # before any work: the model has an embedding to store so
        unplanned = Unplanned(unplanned_dtype, *input_embedding(matrices, set(plan.modules)), embedding)
    statistics = plan.statistics(source if source is not None else matrices, calibration=calibration,
                                 calibration_ids=calibration_ids, column_weights=column_weights)  # fmt: skip
    ranks = {name: entry.rank for name, entry in plan.modules.items()}
    for rank in sorted(set(ranks.values())):  # before any work: factors that stay finite
        check_lora_scaling(rank, (rank or None) if lora_alpha is None else lora_alpha, use_rslora)
    check_plan_iters(plan)
    identity = {
        "format": WORK_FORMAT,
        "plan": hashlib.sha256(plan.to_json().encode()).hexdigest(),
        # by absolute path: the same model named relative or absolute is the same work
        "weights": {str(Path(f).resolve()): v for f, v in matrices.file_stats().items()}
        or matrices.content_digest(),
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "calibration": (plan.calibration or {}).get("digest"),
        **({"output_format": format} if format != "bitalloc" else {}),
        **({"embedding": str(embedding)} if embedding is not None else {}),
    }
    if out.exists() or out.is_symlink():
        if _finish(out, identity):
            return out
        raise BitallocError(f"output {out} already exists: remove it or choose another -o")
    done = Path(f"{out}.partial") / "matrices"  # a resumed run's finished matrices
    needed = _bytes_to_write(plan, matrices, ranks, done, dequantized_dtype, dequantized)
    check_free_space(out, needed, f"the output {out}")
    work = _WorkDir(Path(f"{out}.partial"), identity)
    try:
        if verify:
            _verify(plan, matrices, work)
        job = _Job(plan, matrices, ranks, work, lora, torch_device, quiet, source, statistics)
        _build(job, out, dequantized, dequantized_dtype, max_shard_bytes, unplanned, format)
    finally:
        work.folder.close()
    return out


FINISHED_FILE = "finished.json"  # in OUT.partial/: its build is complete and renamed to OUT


def _finished_path(out: Path) -> Path:
    return Path(f"{out}.partial") / FINISHED_FILE


def _finish(out: Path, identity: dict) -> bool:
    """Whether ``out`` is the complete result of this very job whose clean-up was cut short
    (``OUT.partial/`` still there, marked finished for the same identity, its build renamed
    away): then delete ``OUT.partial/`` and say so."""
    partial = Path(f"{out}.partial")
    record = _finished_path(out)
    if partial.is_symlink() or (partial / "build").exists() or not record.is_file():
        return False
    folder = WorkFolder(partial, legacy=("job.json",)).open()
    try:
        done = json.loads(record.read_text(encoding="utf-8")) == identity
    except (OSError, ValueError):
        done = False
    if not done:
        folder.close()
        return False
    folder.remove()
    import warnings

    warnings.warn(
        f"{out} was already complete (an earlier run stopped during its clean-up): removed {partial}",
        stacklevel=3,
    )
    return True


def _verify(plan: Plan, matrices: Source, work: _WorkDir) -> None:
    """Re-hash the weights of every matrix already done in ``work`` and compare them with
    the digests recorded when it was computed; BitallocError on the first that differs."""
    for name in plan.modules:
        if not work.file(name).exists():
            continue
        recorded = work.digest(name)
        if recorded is None:
            raise BitallocError(f"{work.path} holds {name} with no digest to verify: delete it to start over")
        if recorded != matrices.tensor_digest(name):
            raise BitallocError(
                f"{work.path} holds {name} computed from other weights (edited, with the same size "
                "and time): delete it to start over"
            )


@dataclass(frozen=True)
class _Job:
    """One `apply` run's context: the plan and its matrices (``ranks`` by module), the work
    folder, the adapter's scaling, where LoftQ runs, and the plan's statistics (None, given
    h, or a `Calibrator` run on ``model``)."""

    plan: Plan
    matrices: Source
    ranks: dict[str, int]
    work: _WorkDir
    lora: LoraSettings
    device: torch.device
    quiet: bool
    model: object = None
    statistics: object = None


@dataclass(frozen=True)
class Unplanned:
    """How the tensors outside the plan are written: ``dtype`` (None: as stored), and the input
    embedding ``embedding`` (shape ``shape``) stored packed in ``config`` when one is given."""

    dtype: str | None = None
    embedding: str | None = None
    shape: tuple[int, int] | None = None
    config: QuantConfig | None = None

    def packed(self) -> dict[str, dict]:
        """``quantization_config``'s ``embeddings`` entry: {module: {"config", "shape"}}."""
        if self.embedding is None:
            return {}
        return {self.embedding: {"config": str(self.config), "shape": list(self.shape)}}


def _build(job: _Job, out: Path, dequantized: bool, dequantized_dtype: str, max_shard_bytes: int,
           unplanned: Unplanned, format: str = "bitalloc") -> None:  # fmt: skip
    """Decompose (resumable), write every part into ``OUT.partial/build`` (the backbone in
    ``format``), check that it loads, and rename it to ``out``."""
    plan, matrices, ranks, work = job.plan, job.matrices, job.ranks, job.work
    lora_alpha, use_rslora = job.lora.lora_alpha, job.lora.use_rslora
    _decompose(job)
    build = work.path / "build"
    shutil.rmtree(build, ignore_errors=True)
    if format == "bitalloc":
        _write_quantized(build / "quantized", matrices, plan, ranks, work, max_shard_bytes, unplanned)
        check_quantized(build / "quantized")  # what we wrote loads: names, shapes, dtypes
        unmark = unmark_config
    else:  # written and checked there
        from . import compressed

        compressed.write(build / "quantized", matrices, plan, work, max_shard_bytes, unplanned.dtype)
        unmark = compressed.unmark
    base = "../quantized"  # what the adapter was made for: Q, not W (relative: the folder can move)
    _write_adapter(build / "adapter", base, matrices, plan, ranks, work, lora_alpha, use_rslora)
    if dequantized:
        dtype = DEQUANTIZED_DTYPES[dequantized_dtype]
        items = _items(matrices, plan, lambda module: _dequantized_item(work, plan, module, dtype),
                       Unplanned(unplanned.dtype))  # fmt: skip
        _write_checkpoint(build / "dequantized", items, max_shard_bytes)
        for file in (build / "quantized").iterdir():  # config and tokenizer, built once
            if file.name == "config.json":  # a plain checkpoint: no quantization_config
                unmark(file, build / "dequantized" / file.name)
            elif CONFIG_FILES.match(file.name):
                shutil.copyfile(file, build / "dequantized" / file.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() or out.is_symlink():
        raise BitallocError(f"output {out} appeared while apply ran: its work is kept in {work.path}")
    # crash-safe finish: the record says the build is complete, so a rerun after a kill
    # between the rename and the folder's removal finishes the clean-up (see `_finish`)
    with atomic_path(_finished_path(out)) as temp:
        temp.write_text(json.dumps(work.identity, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(build, out)
    work.folder.remove()


def check_plan_iters(plan: Plan) -> None:
    """BitallocError for a plan (edited by hand) asking more LoftQ iterations than a profile
    may run: LoftQ drifts to NaN after about a thousand, and each one costs a factorization."""
    iters = plan.defaults.get("iters")
    if isinstance(iters, bool) or not isinstance(iters, int) or not 0 <= iters <= MAX_ITERS:
        raise BitallocError(f"plan iters must be a whole number from 0 to {MAX_ITERS}, got {iters!r}")


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
        rank = entry.rank
        if rank > min(actual):
            raise BitallocError(f"plan rank {rank} for {name} exceeds its size {actual[0]}x{actual[1]}")


def _open_matrices(source, plan: Plan) -> Source:
    """The model's reader selecting exactly the plan's matrices (quantized and kept), after
    checking names and shapes, and that every other tensor has its place in the model (known
    harmless extras are left out of the output); refuses a fingerprint other than the plan's."""
    reader = open_source(source, modules=[])
    reader.require_config()
    check_plan(plan, reader)
    model = source if isinstance(source, torch.nn.Module) else reader
    check_linears(model, [*plan.modules])
    extras = unexpected_tensors(model, reader)  # every tensor has its place, before any work
    matrices = reader.with_modules([*plan.modules, *plan.kept])
    matrices.dropped_tensors = frozenset(extras)
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
        self.identity = identity
        job = path / "job.json"
        if job.exists():
            try:
                other = json.loads(job.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                other = None
            if other != identity:
                self.folder.close()
                raise BitallocError(
                    f"{path} holds work for another plan, model, LoRA settings or output format: "
                    "delete it to start over"
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

    def digest(self, module: str) -> str | None:
        """The sha256 of the weights ``module`` was computed from (`Source.tensor_digest`)."""
        with safe_open(self.file(module), framework="pt") as handle:
            return (handle.metadata() or {}).get("digest")

    def quantized(self, module: str, plan: Plan) -> QuantizedTensor:
        entry = plan.modules[module]
        with safe_open(self.file(module), framework="pt") as handle:
            parts = {
                p: handle.get_tensor(f"weight.{p}") for p in PACKED_NAMES if f"weight.{p}" in handle.keys()
            }
        return QuantizedTensor.from_tensors(parts, entry["config"], tuple(entry["shape"]))


def planned_assignment(plan: Plan, name: str, lora: LoraSettings | None = None) -> Assignment:
    """How ``plan``'s matrix ``name`` is decomposed: its config and rank, the plan's
    iterations, and the adapter's scaling (``lora``; alpha None: alpha = r, scaling 1)."""
    entry = plan.modules[name]
    rank = entry.rank
    lora = lora or LoraSettings()
    alpha = (rank or None) if lora.lora_alpha is None else lora.lora_alpha
    return Assignment(QuantConfig.parse(entry["config"]), rank, plan.defaults["iters"],
                      LoraSettings(alpha, lora.use_rslora))  # fmt: skip


def _decompose(job: _Job) -> None:
    """LoftQ for each planned matrix not yet done, one at a time, saved as it finishes. A
    data-aware plan's statistics (a `Calibrator`, or given h) are computed block by block for
    the blocks with matrices to do, each just before them."""
    from tqdm.auto import tqdm

    plan, work = job.plan, job.work
    objective, damping = get_objective(plan.objective), plan.damping
    todo = [name for name in plan.modules if not work.file(name).exists()]
    bar = tqdm(total=len(plan.modules), initial=len(plan.modules) - len(todo), unit="matrix",
               disable=job.quiet, dynamic_ncols=True, desc="apply")  # fmt: skip
    work.matrices.mkdir(exist_ok=True)

    def one(name: str, statistic: torch.Tensor | None) -> None:
        weight, digest = job.matrices.read_with_digest(name)  # the digest lets `apply --verify` resume
        weighting = objective.weighting(statistic, damping)
        assignment = planned_assignment(plan, name, job.lora)
        result = decompose(weight, [name], assignment, weighting, device=job.device)[0]
        _save_matrix(work, name, result, digest)
        bar.set_postfix_str(f"{name} rel_error {result.rel_error:.4f}")
        bar.update(1)

    statistics = job.statistics
    try:
        if isinstance(statistics, Calibrator):
            statistics.stream(job.model if job.model is not None else job.matrices, todo,
                              lambda names, found: [one(name, found[name]) for name in names])  # fmt: skip
        else:
            for name in todo:
                one(name, None if statistics is None else statistics[name])
    finally:
        bar.close()


def _save_matrix(work: _WorkDir, name: str, result, digest: str) -> None:
    """One decomposed matrix into ``OUT.partial/matrices``, atomically (refusing non-finite factors)."""
    factors = (result.lora_A, result.lora_B)
    if not math.isfinite(result.rel_error) or not all(bool(torch.isfinite(f).all()) for f in factors):
        raise BitallocError(f"LoftQ gave non-finite values for {name} (error {result.rel_error!r})")
    tensors = {f"weight.{part}": t.cpu().contiguous() for part, t in result.q.tensors().items()}
    tensors["lora_A"] = result.lora_A.float().cpu().contiguous()
    tensors["lora_B"] = result.lora_B.float().cpu().contiguous()
    with atomic_path(work.file(name)) as temp:
        save_safetensors(tensors, str(temp), metadata={"rel_error": repr(result.rel_error), "digest": digest})


# ---- writing ----------------------------------------------------------------------------

Item = tuple[str, int, Callable[[], torch.Tensor]]  # (tensor name, bytes, loader)


def _items(source: Source, plan: Plan, planned: Callable[[str], list[Item]],
           unplanned: Unplanned | None = None) -> list[Item]:  # fmt: skip
    """Every backbone tensor in order, each planned weight replaced by ``planned(module)``,
    the others in `unplanned_torch_dtype`, or packed (the embedding of ``unplanned``)."""
    unplanned = unplanned or Unplanned()
    items: list[Item] = []
    for name in source.tensor_names():
        if name in source.dropped_tensors:
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in plan.modules:
            items += planned(module)
            continue
        if name.endswith(".weight") and module == unplanned.embedding:
            items += embedding_items(source, module, unplanned.shape, unplanned.config)
            continue
        dtype = unplanned_torch_dtype(source, name, unplanned.dtype)
        if dtype is None:
            items.append((name, source.tensor_nbytes(name), lambda name=name: source.load_tensor(name)))
        else:
            loaded = source.stored_dtype(name) or torch.float32  # what load_tensor returns
            nbytes = source.tensor_nbytes(name) // loaded.itemsize * dtype.itemsize
            items.append((name, nbytes, lambda name=name, dtype=dtype: source.load_tensor(name).to(dtype)))
    return items


def unplanned_torch_dtype(source: Source, name: str, unplanned_dtype: str | None) -> torch.dtype | None:
    """The dtype a tensor outside the plan is written in, None for as `load_tensor` gives it:
    ``unplanned_dtype`` (bf16, fp16, fp32) for every float tensor when given; otherwise the
    dtype it is stored in, and bf16 for a quantized storage type (a GGUF's Q8_0 embedding),
    which `load_tensor` expands to float32."""
    stored = source.stored_dtype(name)
    if unplanned_dtype is not None:
        wanted = DEQUANTIZED_DTYPES[unplanned_dtype]
        return wanted if stored is None or stored.is_floating_point else None
    return torch.bfloat16 if stored is None else None


def _packed_items(work: _WorkDir, plan: Plan, module: str) -> list[Item]:
    config = QuantConfig.parse(plan.modules[module].config)
    parts = config.storage_bits_parts(tuple(plan.modules[module].shape))
    return [
        (f"{module}.weight.{part}", math.ceil(bits / 8),
         lambda part=part: work.load(module, f"weight.{part}"))
        for part, bits in parts.items()
    ]  # fmt: skip


def _dequantized_item(work: _WorkDir, plan: Plan, module: str, dtype: torch.dtype) -> list[Item]:
    rows, cols = plan.modules[module].shape
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
        save_safetensors(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i[1] for i in items)}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_quantized(folder, source, plan, ranks, work, max_shard_bytes, unplanned: Unplanned) -> None:
    items = _items(source, plan, lambda module: _packed_items(work, plan, module), unplanned)
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
    if unplanned.packed():
        info["embeddings"] = unplanned.packed()
    (folder / QUANT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    index = folder / f"{PACKED_STEM}.safetensors.index.json"
    weights = index.name if index.exists() else f"{PACKED_STEM}.safetensors"
    mark_config(folder / "config.json", plan.modules, weights, unplanned.packed())  # quantization_config
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
    save_safetensors(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
