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
from . import gptqmodel, hqq
from ._common import PlanLike, read_plan
from .api import ExportResult, export

GPTQ_FORMAT = "gptq_v2"  # GPTQModel's checkpoint format that stores zero points as z (v1: z - 1)
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


def _check_exact(plan: Plan, target: str, why_not: Callable, exact) -> None:
    """BitallocError naming the first module whose config ``target`` cannot hold exactly
    (``why_not(config, shape)``), or why the plan as a whole cannot (``exact.plan_why_not``)."""
    configs = []
    for name, entry in plan.modules.items():
        config = QuantConfig.parse(entry.config)
        why = why_not(config, (int(entry.shape[0]), int(entry.shape[1])))
        if why is not None:
            raise BitallocError(
                f"{target} weights cannot hold {config} (module {name}): {why}; plan with --target {target}"
            )
        configs.append(config)
    why = exact.plan_why_not(configs)
    if why is not None:
        raise BitallocError(f"{target} weights cannot hold this plan: {why}; plan with --target {target}")


def _check_hqq(plan: Plan) -> None:
    _check_exact(plan, hqq.TARGET, hqq_why_not, hqq.EXACT)


def _check_gptq(plan: Plan) -> None:
    _check_exact(plan, gptqmodel.TARGET, gptqmodel.EXACT.why_not, gptqmodel.EXACT)


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


def read_quantized(quantized: Path) -> tuple[dict[str, QuantizedTensor], dict[str, dict[str, torch.Tensor]]]:
    """Apply's ``OUT/quantized`` in memory: each planned module's `QuantizedTensor`, and every other
    tensor grouped by module (``{module: {leaf: tensor}}``, e.g. a planned module's bias)."""
    from ..artifacts.nn import packed_files, read_quant_info

    info = read_quant_info(quantized)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in info["modules"]}
    dense: dict[str, dict[str, torch.Tensor]] = {}
    for file in packed_files(quantized):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                module, _, leaf = key.rpartition(".")
                owner = module.removesuffix(".weight")
                if owner in parts and module.endswith(".weight"):
                    parts[owner][leaf] = handle.get_tensor(key)
                else:
                    dense.setdefault(module, {})[leaf] = handle.get_tensor(key)
    packed = {
        name: QuantizedTensor.from_tensors(
            stored, info["modules"][name]["config"], info["modules"][name]["shape"]
        )
        for name, stored in parts.items()
    }
    return packed, dense


def _copy_configs(quantized: Path, folder: Path, quantization_config: dict | None = None) -> None:
    """config.json without bitalloc's marks (with ``quantization_config`` when given), the
    tokenizer and generation files, and the plan."""
    import json

    from ..artifacts.hf_quantizer import unmark_config

    for file in quantized.iterdir():
        if file.name == "config.json":
            unmark_config(file, folder / file.name)
            if quantization_config is not None:
                config = json.loads((folder / file.name).read_text(encoding="utf-8"))
                config["quantization_config"] = quantization_config
                (folder / file.name).write_text(
                    json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
                )
        elif CONFIG_FILES.match(file.name) or file.name == "bitalloc_plan.json":
            shutil.copyfile(file, folder / file.name)


def _write_hqq(quantized: Path, folder: Path, plan: Plan) -> None:
    """HQQ's saved-model folder from apply's ``OUT/quantized``: ``qmodel.pt`` maps each module
    name to its state dict (an ``HQQLinear``'s for planned modules, else its own tensors)."""
    packed, weights = read_quantized(quantized)
    for name, tensor in packed.items():
        weights.setdefault(name, {}).update(hqq_state(tensor))
    folder.mkdir()
    _copy_configs(quantized, folder)
    _add_tied(weights, folder)
    torch.save(weights, folder / HQQ_WEIGHTS)


def _add_tied(weights: dict[str, dict], folder: Path) -> None:
    """Give each tied parameter the checkpoint leaves out (a tied ``lm_head.weight``) its own
    entry: HQQ's loader builds the model empty and fills only the modules ``qmodel.pt`` names."""
    from ..checkpoints.skeleton import build_skeleton

    model = build_skeleton(folder, str(folder))
    model.tie_weights()
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for group in names.values():
        split = [name.rpartition(".")[::2] for name in group]
        stored = [weights[m][leaf] for m, leaf in split if leaf in weights.get(m, {})]
        for module, leaf in split:
            if stored and leaf not in weights.get(module, {}):
                weights.setdefault(module, {})[leaf] = stored[0]


def gptq_tensors(packed: QuantizedTensor) -> dict[str, torch.Tensor]:
    """One planned module in GPTQ's packed layout, ``gptq_v2`` (zero points stored as z): int32
    ``qweight`` (in·b/32, out), each output's codes along the inputs as one little-endian bit
    stream of 32-bit words (input i at bit i·b: at 2, 4, 8 bits 32/b whole codes per word; at 3
    bits 32 codes in 3 words, two codes split across words); int32 ``qzeros`` (groups, out·b/32)
    packed the same way along the outputs; fp16 ``scales`` (groups, out); int32 ``g_idx`` (in,),
    input i's group i // group size. Dequantized: scales[g_idx]·(q - z[g_idx])."""
    from ..artifacts.compressed import pack_int32

    rows, columns = packed.shape
    bits, group = packed.config.bits, packed.config.block_size
    return {
        "qweight": pack_int32(packed.unpacked_codes()[:, :columns], bits).T.contiguous(),
        "qzeros": pack_int32(packed.zero_values().T.contiguous(), bits),
        "scales": packed.scale_values().to(torch.float16).reshape(rows, -1).T.contiguous(),
        "g_idx": torch.arange(columns, dtype=torch.int32) // group,
    }


def gptq_config(plan: Plan) -> dict:
    """``quantize_config.json`` (and config.json's ``quantization_config``): `to_gptqmodel`'s
    bits, group size and per-module ``dynamic`` overrides, asymmetric, no act-order, in the
    ``gptq_v2`` checkpoint format."""
    with warnings.catch_warnings():  # the LoRA warning: export_weights gives its own
        warnings.simplefilter("ignore")
        config = dict(gptqmodel.translate(plan).payload)
    config.update(quant_method="gptq", desc_act=False, pack_dtype="int32", format=GPTQ_FORMAT,
                  checkpoint_format=GPTQ_FORMAT)  # fmt: skip
    return config


def _write_gptq(quantized: Path, folder: Path, plan: Plan) -> None:
    """A GPTQModel checkpoint from apply's ``OUT/quantized``: one ``model.safetensors`` with each
    planned module's `gptq_tensors` (and its bias), every other tensor as stored, config.json
    with the ``quantization_config`` and the same in ``quantize_config.json``."""
    import json

    from ..fileio import save_safetensors

    packed, dense = read_quantized(quantized)
    tensors = {
        f"{module}.{leaf}": tensor for module, leaves in dense.items() for leaf, tensor in leaves.items()
    }
    for name, tensor in packed.items():
        tensors.update({f"{name}.{part}": value for part, value in gptq_tensors(tensor).items()})
    folder.mkdir()
    save_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = gptq_config(plan)
    _copy_configs(quantized, folder, config)
    (folder / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


WEIGHTS_TARGETS: dict[str, WeightsTarget] = {
    "compressed-tensors": WeightsTarget(_check_compressed, format="compressed-tensors"),
    "hqq": WeightsTarget(_check_hqq, write=_write_hqq, options=(("per_module", True),)),
    "gptqmodel": WeightsTarget(_check_gptq, write=_write_gptq),
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
        raise BitallocError(
            f"export --weights writes the weights of {', '.join(WEIGHTS_TARGETS)} only, not {target!r}"
        )
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
