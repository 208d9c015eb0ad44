"""llama.cpp: a ``--tensor-type-file`` for ``llama-quantize``, one ``^gguf_name$=type`` token per tensor.

llama.cpp (``tools/quantize/quantize.cpp``, ``src/llama-quant.cpp``) reads whitespace-separated
``pattern=type`` tokens (no comments), lower-cases the pattern, and gives a tensor the type of the
first pattern that ``std::regex_search`` finds in its name; only when the base type on the command
line is a quantized type. A row (``ne[0]``, the input dimension) that is not a multiple of the type's
block falls back to another type (``tensor_type_fallback``), or, for a type with no fallback (the
block-32 types), makes llama-quantize stop; the choice here models that and writes only types that
llama.cpp applies as written. Every pattern names one block tensor of the model the plan was made
for; ``token_embd``/``output`` are set with ``--token-embedding-type``/``--output-tensor-type`` on
the command line instead (llama.cpp applies those before the file, and a model that ties its
embeddings has no ``output.weight`` for a pattern to match).

A matrix planned in a ggml config (``ggml4-b32-s0`` = q4_0, `bitalloc.quant.ggml`) whose block divides
its row gets that type: the plan's bits are the GGUF's, and bitalloc quantized it as llama-quantize
will. Other configs get the ggml type nearest their bits per weight (an approximation, said in the
notes). `exact_configs` lists the configs a matrix can take for an exact export.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ..checkpoints.gguf import LLAMA_BLOCK_NAMES
from ..errors import BitallocError
from ..quant import QuantConfig
from ..quant.ggml import TYPES as GGML_CONFIGS
from ..quant.ggml import configs_for, ggml_type
from ._common import Matrix, PlanLike, Translation, anchored, begin, count, finish, read_plan
from ._plan import Plan, Shape, TargetFormat, most_common

TARGET = "llamacpp"


@dataclass(frozen=True)
class GgmlType:
    """A ggml tensor type: ``block`` weights stored in ``block_bytes`` bytes."""

    name: str
    block: int
    block_bytes: int
    needs_imatrix: bool = False

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.block

    def storage_bits(self, rows: int, columns: int) -> int:
        return rows * (columns // self.block) * self.block_bytes * 8


# ggml's names and sizes (ggml/src/ggml.c type_traits; gguf-py GGML_QUANT_SIZES), in order of
# preference when two types store the same bits per weight. Types llama-quantize refuses to write
# without an importance matrix (tensor_requires_imatrix) are marked; the ternary, MXFP4/NVFP4 and
# Q1_0/Q2_0 types are left out.
TYPES = {
    t.name: t
    for t in (
        GgmlType("q2_K", 256, 84),
        GgmlType("q3_K", 256, 110),
        GgmlType("q4_K", 256, 144),
        GgmlType("q5_K", 256, 176),
        GgmlType("q6_K", 256, 210),
        GgmlType("q8_0", 32, 34),
        GgmlType("iq4_xs", 256, 136),
        GgmlType("iq4_nl", 32, 18),
        GgmlType("iq3_s", 256, 110),
        GgmlType("q4_0", 32, 18),
        GgmlType("q4_1", 32, 20),
        GgmlType("q5_0", 32, 22),
        GgmlType("q5_1", 32, 24),
        GgmlType("iq1_s", 256, 50, needs_imatrix=True),
        GgmlType("iq1_m", 256, 56, needs_imatrix=True),
        GgmlType("iq2_xxs", 256, 66, needs_imatrix=True),
        GgmlType("iq2_xs", 256, 74, needs_imatrix=True),
        GgmlType("iq2_s", 256, 82, needs_imatrix=True),
        GgmlType("iq3_xxs", 256, 98, needs_imatrix=True),
        GgmlType("f16", 1, 2),
    )
}
# llama-quantize's fallback when a row is not a multiple of the type's block (tensor_type_fallback;
# older releases sent q2_K/q3_K to iq4_nl, which stores the same 4.5 bits per weight as q4_0).
FALLBACK = {
    **dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"), "iq4_nl"),
    "q2_K": "q4_0",
    "q3_K": "q4_0",
    "q4_K": "q5_0",
    "q5_K": "q5_1",
    "q6_K": "q8_0",
}
KEPT_TYPE = "f16"
HEAD_TYPE = "q8_0"  # token_embd and output: outside the plan's budget, kept near-lossless

# Hugging Face llama block Linears -> GGUF tensor names: the reader's table, inverted (one place)
GGUF_NAMES = {hf: gguf for gguf, hf in LLAMA_BLOCK_NAMES.items() if hf.endswith("_proj")}
_LLAMA_MODULE = re.compile(r"model\.layers\.(\d+)\.(" + "|".join(map(re.escape, GGUF_NAMES)) + ")")


def gguf_name(module: str) -> str:
    """The GGUF tensor of a llama module: ``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``."""
    match = _LLAMA_MODULE.fullmatch(module)
    if match is None:
        raise BitallocError(
            f"llamacpp cannot address module {module!r}: expected llama names "
            "model.layers.N.self_attn.{q,k,v,o}_proj or model.layers.N.mlp.{gate,up,down}_proj"
        )
    return f"blk.{match[1]}.{GGUF_NAMES[match[2]]}.weight"


def effective_type(name: str, columns: int) -> GgmlType:
    """The type llama-quantize really writes for ``name`` on rows of ``columns`` weights, as
    ``tensor_type_fallback`` (src/llama-quant.cpp) decides: the type when ``columns`` is a
    multiple of its block; else its fallback (`FALLBACK`), or f16 when that does not fit either.
    BitallocError for a type with no fallback (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl: block 32)
    on such rows: llama-quantize stops with "no tensor type fallback is defined"."""
    ggml_type = TYPES[name]
    if columns % ggml_type.block == 0:
        return ggml_type
    if name not in FALLBACK:
        raise BitallocError(
            f"llama-quantize refuses {name} on rows of {columns} (not a multiple of {ggml_type.block}, "
            "and it defines no fallback for that type)"
        )
    fallback = TYPES[FALLBACK[name]]
    return fallback if columns % fallback.block == 0 else TYPES[KEPT_TYPE]


def _applied(name: str, columns: int) -> str | None:
    """`effective_type`'s name, or None where llama-quantize refuses the type."""
    try:
        return effective_type(name, columns).name
    except BitallocError:
        return None


def head_type(hidden: int) -> GgmlType:
    """``token_embd``/``output``: `HEAD_TYPE`, or f16 when rows of ``hidden`` do not fit its block
    (llama.cpp applies ``--token-embedding-type``/``--output-tensor-type`` without a fallback)."""
    return TYPES[HEAD_TYPE] if hidden % TYPES[HEAD_TYPE].block == 0 else TYPES[KEPT_TYPE]


def exact_configs(rows: int, columns: int) -> list[str]:
    """The config strings llama.cpp stores exactly on a (rows, columns) matrix: the ggml types
    (`bitalloc.quant.ggml`) whose block divides the row, so that a plan made of them exports with
    the plan's codes' bits, type for type."""
    QuantConfig().num_blocks((rows, columns))  # BitallocError unless two positive integers
    return configs_for(int(columns))


class GgmlTypes(TargetFormat):
    """What llama.cpp stores exactly: the ggml configs (`bitalloc.quant.ggml`) whose block divides
    the row, in ggml's own block bytes (the same as bitalloc's storage for them). Planning with
    ``--target llamacpp`` makes the plan's bits the GGUF's for the planned matrices."""

    name = TARGET
    description = (
        "the ggml configs (ggml{bits}-b{block}-s{variant}: q4_0 ... q6_K, iq4_nl, iq4_xs) whose block "
        "divides the row"
    )

    def why_not(self, config: QuantConfig, shape: Shape | None = None) -> str | None:
        if config.method != "ggml":
            return f"llama.cpp stores ggml types, not {config.method} levels"
        if shape is not None and not config.fits(shape):
            return f"{shape[1]} columns are not a multiple of its block {config.block_size}"
        return None

    def storage_bits(self, config: QuantConfig, shape: Shape) -> int:
        return TYPES[ggml_type(config).name].storage_bits(*shape)

    def grid(self, bits, block_sizes) -> list[str]:
        """Every ggml type at ``bits`` (its block is fixed: ``block_sizes`` do not apply); shapes
        whose rows a type's block does not divide skip it when profiled."""
        configs = [text for text, t in GGML_CONFIGS.items() if t.bits in set(bits)]
        if not configs:
            raise BitallocError(f"--target llamacpp: no ggml type at {', '.join(map(str, bits))} bits")
        return configs


EXACT = GgmlTypes()


def exact_type(m: Matrix) -> GgmlType | None:
    """The ggml type of ``m``'s config when it is one and its block divides the row, else None."""
    if m.config.method != "ggml" or not m.config.fits((m.rows, m.columns)):
        return None
    return TYPES[ggml_type(m.config).name]


def choose_type(m: Matrix, imatrix: bool) -> tuple[GgmlType, GgmlType]:
    """(chosen, ideal): a ggml config's own type (`exact_type`); for other configs the usable type
    whose bits/weight is nearest the plan's exact storage for ``m``, fallback included, and the
    nearest one had the row length been a multiple of 256."""
    exact = exact_type(m)
    if exact is not None:
        return exact, exact
    target = m.storage_bits / m.numel
    allowed = [t for t in TYPES.values() if t.name != KEPT_TYPE and (imatrix or not t.needs_imatrix)]

    def nearest(types: list[GgmlType]) -> GgmlType:
        return min(types, key=lambda t: abs(t.bits_per_weight - target))  # first on ties: preference

    effective = {_applied(t.name, m.columns) for t in allowed} - {None}
    return nearest([t for t in TYPES.values() if t.name in effective]), nearest(allowed)


def translate(plan: Plan, imatrix: bool = False) -> Translation:
    """The tensor-type file for ``plan``, with notes and llama.cpp's bits/param for the plan's matrices."""
    mats, notes = begin(plan, TARGET, exact=EXACT)
    kept = {gguf_name(name): TYPES[KEPT_TYPE] for name in plan.kept}
    chosen: dict[str, GgmlType] = {}
    moved = []
    for m in mats:
        chosen[m.name], ideal = choose_type(m, imatrix)
        if chosen[m.name] != ideal:
            moved.append((m, ideal))
    tensor_types = {gguf_name(m.name): chosen[m.name] for m in mats} | kept
    order = sorted(tensor_types, key=_tensor_order)
    tokens = [f"{anchored(name)}={tensor_types[name].name}" for name in order]
    # the embedding width: the input of every block matrix but ffn_down, whose output it is
    hidden = most_common(m.rows if ".ffn_down." in gguf_name(m.name) else m.columns for m in mats)
    head = head_type(hidden).name
    base = most_common(chosen[m.name].name for m in mats)
    if imatrix:
        scope = "importance-matrix types included (run llama-quantize with --imatrix)"
    else:
        excluded = ", ".join(t.name for t in TYPES.values() if t.needs_imatrix)
        scope = f"types that need no importance matrix ({excluded} excluded; --imatrix allows them)"
    notes += _type_notes(mats, chosen, scope)
    if moved:
        pairs = sorted({(ideal.name, chosen[m.name].name, m.columns) for m, ideal in moved})
        detail = ", ".join(f"{a} -> {b} on rows of {c}" for a, b, c in pairs)
        notes.append(
            f"rows not a multiple of the type's block ({count(moved, len(mats))}): {detail}, the nearest "
            "type that fits the row, as llama-quantize's own fallback would give (q2_K/q3_K -> q4_0, "
            "q4_K -> q5_0, q6_K -> q8_0, i-quants -> iq4_nl)"
        )
    notes.append(
        f"kept matrices -> {KEPT_TYPE} ({len(kept)}); token_embd and output -> {head} by the command's "
        "--token-embedding-type/--output-tensor-type (outside the plan's budget; the file names only "
        "tensors the model has: output.weight is absent when it ties its embeddings)"
    )
    notes.append(
        f"run: llama-quantize --tensor-type-file FILE --token-embedding-type {head} --output-tensor-type "
        f"{head} MODEL-F16.gguf OUT.gguf {base.upper()} (the base type must be a quantized type: llama.cpp "
        "applies the file's types only then)"
    )
    text = "\n".join(tokens) + "\n"
    return finish(plan, mats, notes, TARGET, lambda m: chosen[m.name].storage_bits(m.rows, m.columns), text)


def _type_notes(mats: list[Matrix], chosen: dict[str, GgmlType], scope: str) -> list[str]:
    """What the plan's configs became: ggml configs their own type (exact), others the nearest type."""
    exact = [m for m in mats if exact_type(m) is not None]
    approximated = [m for m in mats if exact_type(m) is None]
    notes = []
    if exact:
        which = "every matrix" if not approximated else count(exact, len(mats))
        types = ", ".join(_type_counts(chosen[m.name] for m in exact))
        notes.append(
            f"{'types' if not approximated else 'exact'}: {which} planned in a ggml type ({types}) "
            "-> that type, with the plan's bits (bitalloc quantized each block as ggml's reference quantizer "
            "does, which llama-quantize runs without --imatrix)"
        )
    if approximated:
        which = f"all {len(mats)} matrices" if not exact else count(approximated, len(mats))
        notes.append(f"types: the nearest bits/weight to each matrix's exact storage among ggml {scope}")
        notes.append(
            f"codebooks, blocks and scales -> ggml's own (blocks of 32 or super-blocks of 256) for {which}: "
            f"{', '.join(_type_counts(chosen[m.name] for m in approximated))}"
        )
    return notes


def _tensor_order(name: str) -> tuple[int, int]:
    """GGUF block order: block index, then q, k, v, output, gate, up, down."""
    _, block, tensor, _ = name.split(".")
    return int(block), list(GGUF_NAMES.values()).index(tensor)


def _type_counts(types: Iterable[GgmlType]) -> list[str]:
    """'N x type' from the most used type down."""
    counts = Counter(t.name for t in types)
    return [f"{n} x {name}" for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def to_llamacpp(plan: PlanLike, imatrix: bool = False) -> str:
    """The ``--tensor-type-file`` text for ``plan`` (GGUF names of a llama model)."""
    return translate(read_plan(plan), imatrix=imatrix).payload
