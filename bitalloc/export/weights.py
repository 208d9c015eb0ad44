"""``export --weights``: the plan's quantized weights in a target's own format, so that the
target's loader gives back bitalloc's dequantized Q bit for bit.

The codes are the ones `bitalloc.apply` computes (the plan's decomposition, seeded as profiled):
`export_weights` runs apply into a temporary folder beside the output and converts its packed
codes, scales and zero points, so nothing is quantized a second time. Targets:

``compressed-tensors``  apply's own ``--format compressed-tensors`` checkpoint (`artifacts.compressed`):
                        a transformers folder with a ``pack-quantized`` quantization_config.
``hqq``                 HQQ's own saved-model folder (``config.json`` + ``qmodel.pt``, what
                        ``AutoHQQHFModel.save_quantized`` writes): ``HQQLinear`` state dicts for the
                        planned modules (axis 1, packed by HQQ's ``BitPack``), plain tensors for the
                        rest; load it with ``AutoHQQHFModel.from_quantized(OUT, compute_dtype=<the plan's
                        scale dtype>)``. transformers' HQQ integration cannot load it: its
                        ``HqqHfQuantizer`` (transformers 5.x) has no operations for pre-quantized weights.

The LoRA factors of a rank > 0 plan are not part of these weights (a warning says so);
``bitalloc apply`` writes them as a PEFT adapter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoints import CONFIG_FILES
from ..errors import BitallocError, check_path
from ..fileio import check_name, write_text_atomic
from ..planning.plan_file import Plan
from ..quant import QuantConfig, QuantizedTensor
from ..quant.formats import TORCH_DTYPES
from . import hqq
from ._common import PlanLike, read_plan
from .api import ExportResult, export

HQQ_WEIGHTS = "qmodel.pt"  # HQQ's BaseHQQModel.get_weight_file
# HQQ's packings (hqq.core.quantize.Quantizer.bit_to_packing): name, codes per word, word dtype
HQQ_PACKING = {
    8: ("8bit_u8", 1, torch.uint8),
    4: ("4bit_u8", 2, torch.uint8),
    3: ("3bit_32", 10, torch.int32),
    2: ("2bit_u8", 4, torch.uint8),
}


@dataclass(frozen=True)
class WeightsTarget:
    """A target whose weights bitalloc writes: ``check(plan)`` raises BitallocError naming the
    first module it cannot store exactly; ``write(quantized, folder, plan)`` turns apply's
    ``OUT/quantized`` into ``folder`` (None: apply writes the target's format itself, ``format``);
    ``options`` are passed to the target's config translation (for the notes)."""

    check: Callable[[Plan], None]
    format: str = "bitalloc"
    write: Callable[[Path, Path, Plan], None] | None = None
    options: tuple[tuple[str, object], ...] = ()


def _check_compressed(plan: Plan) -> None:
    from ..artifacts.compressed import check_expressible

    check_expressible(plan)


def hqq_why_not(config: QuantConfig, shape: tuple[int, int]) -> str | None:
    """Why HQQ cannot hold ``config`` for a ``shape`` matrix exactly, or None. Besides its exact
    grid, HQQ packs the groups of a matrix along one dimension in equal slices (2 slices at 4
    bits, 4 at 2 bits), so the number of groups must be a multiple of that."""
    why = hqq.EXACT.why_not(config, shape)
    if why is None:
        per_word = HQQ_PACKING[config.bits][1]
        groups = shape[0] * shape[1] // config.block_size
        if per_word in (2, 4) and groups % per_word:
            why = f"{groups} groups: HQQ packs {config.bits}-bit groups in {per_word} equal slices"
    return why


def _check_hqq(plan: Plan) -> None:
    configs = []
    for name, entry in plan.modules.items():
        config = QuantConfig.parse(entry.config)
        why = hqq_why_not(config, (int(entry.shape[0]), int(entry.shape[1])))
        if why is not None:
            raise BitallocError(
                f"hqq weights cannot hold {config} (module {name}): {why}; plan with --target hqq"
            )
        configs.append(config)
    why = hqq.EXACT.plan_why_not(configs)
    if why is not None:
        raise BitallocError(f"hqq weights cannot hold this plan: {why}; plan with --target hqq")


def pack_hqq(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """HQQ's ``BitPack`` of unsigned codes (groups, group size): the rows cut into ``per_word``
    equal slices (padded with zero rows to a multiple of 10 at 3 bits), slice i shifted left by
    ``bits·(per_word - 1 - i)`` and OR-ed into one word."""
    _, per_word, dtype = HQQ_PACKING[bits]
    rows = -(-codes.shape[0] // per_word) * per_word
    padded = torch.zeros(rows, codes.shape[1], dtype=dtype)
    padded[: codes.shape[0]] = codes.to(dtype)
    step = rows // per_word
    out = torch.zeros(step, codes.shape[1], dtype=dtype)
    for i in range(per_word):
        out |= padded[i * step : (i + 1) * step] << (bits * (per_word - 1 - i))
    return out


def hqq_state(packed: QuantizedTensor) -> dict:
    """One planned module as HQQ's ``HQQLinear`` state dict (unencoded, as ``save_quantized``
    writes it), axis 1: groups of ``group_size`` consecutive inputs, one float scale and zero
    per group in the scale's dtype, the compute dtype."""
    config = packed.config
    rows, columns = packed.shape
    group = config.block_size
    dtype = TORCH_DTYPES[config.scale_dtype]
    packing, _, word = HQQ_PACKING[config.bits]
    codes = packed.unpacked_codes()[:, :columns].reshape(-1, group)
    return {
        "W_q": pack_hqq(codes, config.bits),
        "nbits": config.bits,
        "group_size": group,
        "shape": torch.Size([rows, columns]),
        "scale": packed.scale_values().to(dtype).reshape(-1, 1).contiguous(),
        "zero": packed.zero_values().to(dtype).reshape(-1, 1).contiguous(),
        "axis": hqq.AXIS,
        "packing": packing,
        "unpack_view_dtype": word,
        "view_as_float": False,
        "quant_scale": False,
        "quant_zero": False,
        "compute_dtype": dtype,
        "offload_meta": False,
        "stores_quant_config": True,
        "channel_wise": True,
        "optimize": False,  # the codes are bitalloc's, not HQQ's optimizer's
        "round_zero": False,
    }


def _write_hqq(quantized: Path, folder: Path, plan: Plan) -> None:
    """HQQ's saved-model folder from apply's ``OUT/quantized``: ``qmodel.pt`` maps each module
    name to its state dict (an ``HQQLinear``'s for planned modules, else its own tensors)."""
    from ..artifacts.hf_quantizer import unmark_config
    from ..artifacts.nn import packed_files, read_quant_info

    info = read_quant_info(quantized)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in info["modules"]}
    weights: dict[str, dict] = {}
    for file in packed_files(quantized):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                module, _, leaf = key.rpartition(".")
                owner = module.removesuffix(".weight")
                if owner in parts and module.endswith(".weight"):
                    parts[owner][leaf] = handle.get_tensor(key)
                else:
                    weights.setdefault(module, {})[leaf] = handle.get_tensor(key)
    for name, stored in parts.items():
        entry = info["modules"][name]
        packed = QuantizedTensor.from_tensors(stored, entry["config"], tuple(entry["shape"]))
        weights.setdefault(name, {}).update(hqq_state(packed))
    folder.mkdir()
    torch.save(weights, folder / HQQ_WEIGHTS)
    for file in quantized.iterdir():
        if file.name == "config.json":
            unmark_config(file, folder / file.name)
        elif CONFIG_FILES.match(file.name) or file.name == "bitalloc_plan.json":
            shutil.copyfile(file, folder / file.name)


WEIGHTS_TARGETS: dict[str, WeightsTarget] = {
    "compressed-tensors": WeightsTarget(_check_compressed, format="compressed-tensors"),
    "hqq": WeightsTarget(_check_hqq, write=_write_hqq, options=(("per_module", True),)),
}


# shape: the public function's documented options (the export --weights CLI's twin)
def export_weights(
    plan: PlanLike,
    target: str,
    output: str | os.PathLike,
    model: str | os.PathLike,
    *,
    device: str = "auto",
    calibration: str | os.PathLike | None = None,
    quiet: bool = False,
    config_output: str | os.PathLike | None = None,
) -> ExportResult:
    """Write ``plan``'s quantized weights of ``model`` for ``target`` (one of `WEIGHTS_TARGETS`)
    as the folder ``output``, and return the target's config translation (notes, bits) with
    ``path`` the folder. The codes are `bitalloc.apply`'s (``device``, ``calibration`` as there).
    ``config_output``: also write the config translation there, as `export` does.
    BitallocError (one line, before any work) for another target, a config the target does not
    store exactly (naming the first module), or an existing ``output``; nothing is left behind
    on failure."""
    if target not in WEIGHTS_TARGETS:
        raise BitallocError(f"export --weights writes {', '.join(WEIGHTS_TARGETS)} weights, not {target!r}")
    check_path(output, "output")
    check_path(model, "model")
    spec = WEIGHTS_TARGETS[target]
    plan = read_plan(plan)
    spec.check(plan)
    out = check_name(output)
    if out.exists() or out.is_symlink():
        raise BitallocError(f"output {out} already exists: remove it or choose another folder")
    if config_output is not None:
        check_path(config_output, "config_output")
    result = export(plan, target, **dict(spec.options))
    notes = list(result.notes)
    rank = max([plan.defaults["rank"], *(entry.rank for entry in plan.modules.values())])
    if rank > 0:
        note = (
            f"the plan's LoRA factors (rank {rank}) are not part of the {target} weights: the folder holds "
            "Q only (bitalloc apply writes them as a PEFT adapter)"
        )
        warnings.warn(note, UserWarning, stacklevel=2)
        notes.append(note)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from ..artifacts.writer import apply

        applied = apply(model, plan, work / "apply", device=device, calibration=calibration,
                        quiet=quiet, format=spec.format)  # fmt: skip
        built = applied / "quantized"
        if spec.write is not None:
            spec.write(built, work / "build", plan)
            built = work / "build"
        if out.exists() or out.is_symlink():
            raise BitallocError(f"output {out} appeared while export ran")
        os.replace(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if config_output is not None:
        write_text_atomic(config_output, result.text)
    return ExportResult(target, result.text, notes, result.target_bits, out)
