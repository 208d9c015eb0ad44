"""Which weight matrices to quantize: the Linear layers inside transformer blocks.

One rule for every architecture and every source kind, so that a safetensors directory,
a GGUF file and an in-memory module of the same model select the same names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..errors import BitallocError
from ..names import compile_patterns, natural_key

# A block index in the name: "model.layers.3.", "encoder.layer.3.", "h.3.", "blocks.3.", ...
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers?|h|blocks?|blk)\.\d+\.")
# Parts of a name that mark a matrix we never quantize by default.
_NOT_LINEAR = ("embed", "norm", "pooler", "lm_head", "wte", "wpe")
# MoE routers ("mlp.gate", "block_sparse_moe.gate", "shared_expert_gate", "router").
_ROUTER = re.compile(r"(?:^|_)gate$|router")

Shape = tuple[int, ...]


def module_name(tensor_name: str) -> str:
    """The module name of a weight tensor: "a.b.q_proj.weight" -> "a.b.q_proj"."""
    return tensor_name.removesuffix(".weight")


def is_block_linear(name: str, shape: Sequence[int]) -> bool:
    """True for a 2-D weight of a Linear layer inside a transformer block (the default rule)."""
    if len(shape) != 2:
        return False
    name = module_name(name)
    if not _BLOCK_INDEX.search(name):
        return False
    lowered = name.lower()
    if any(part in lowered for part in _NOT_LINEAR):
        return False
    return not _ROUTER.search(lowered.rsplit(".", 1)[-1])


def default_selection(names_and_shapes: Iterable[tuple[str, Sequence[int]]]) -> list[str]:
    """The module names the default rule selects, in natural order."""
    return sorted((module_name(n) for n, s in names_and_shapes if is_block_linear(n, s)), key=natural_key)


def select_modules(
    matrices: dict[str, Shape],
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    where: str,
    modules: Sequence[str] | None = None,
) -> list[str]:
    """Apply the default rule, or `include` regexes instead of it, then `exclude` regexes;
    or take exactly ``modules`` (a plan's names) when given.

    `matrices` maps module names of 2-D weights to their shapes. Every regex must match at
    least one of them (a typo otherwise goes unnoticed); an empty selection is an error.
    """
    if modules is not None:
        missing = [name for name in modules if name not in matrices]
        if missing:
            raise BitallocError(f"{missing[0]} is not a weight matrix of {where}")
        return _nonempty(sorted(dict.fromkeys(modules), key=natural_key), matrices, where)
    includes, excludes = (
        [regex for _, regex in compile_patterns(kind, given)]
        for kind, given in (("include", include), ("exclude", exclude))
    )
    for kind, patterns in (("include", includes), ("exclude", excludes)):
        for pattern in patterns:
            if not any(pattern.search(name) for name in matrices):
                raise BitallocError(f"{kind} regex {pattern.pattern!r} matches no weight matrix in {where}")
    if includes:
        chosen = [n for n in matrices if any(p.search(n) for p in includes)]
    else:
        chosen = [n for n, shape in matrices.items() if is_block_linear(n, shape)]
    chosen = [n for n in chosen if not any(p.search(n) for p in excludes)]
    if not chosen:
        raise BitallocError(f"no weight matrices selected in {where}")
    return _nonempty(sorted(chosen, key=natural_key), matrices, where)


def _nonempty(chosen: list[str], matrices: dict[str, Shape], where: str) -> list[str]:
    for name in chosen:
        if 0 in matrices[name]:
            shape = "x".join(map(str, matrices[name]))
            raise BitallocError(f"weight {name} in {where} is empty ({shape}): exclude it")
    return chosen
