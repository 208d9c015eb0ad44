"""One matrix's entry in a plan: `ModuleEntry`, a dataclass whose fields are the JSON keys.

The plan file's ``modules`` object maps each quantized matrix to one of these. Each field
carries its JSON Schema fragment (`bitalloc.planning.schema` builds the plan schema from
them), so the entry, its key order in the file and the schema are one definition.

For code written against the plan's JSON form, an entry also reads as a read-only mapping
of its JSON keys (``entry["config"]``, ``"coefficient" in entry``, ``dict(entry)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ..errors import BitallocError
from ..quant import QuantConfig
from ..quant.config import BLOCK_SIZE_RANGE
from .schema import keys_of

# Structural only: the config string is the authority, and a registered format family brings
# its own grammar after ``-s``; the plan reader checks method, bits, block size and scale
# against the parsed config (`plan_file._check_module`), so a new family's plans validate.
CONFIG_PATTERN = "^[a-z]+[0-9]+-b[0-9]+-s[a-z0-9-]+$"
SCALE_SCHEMA = {
    "type": "object",
    "minProperties": 1,
    "description": "How the family stores scales (QuantConfig.to_dict): "
    "{dtype[, zero][, search][, rounding]} for float scales (uint adds its zero point: its bits or the "
    "scale's dtype), {bits, block_size, second_level[, search][, rounding]} for quantized scales.",
}


def _schema(fragment, **options):
    """A dataclass field whose JSON Schema is ``fragment``."""
    return field(metadata={"schema": fragment}, **options)


NUMBER = {"type": "number", "minimum": 0}
COUNT = {"type": "integer", "minimum": 1}


@dataclass(kw_only=True)
class ModuleEntry(Mapping):
    """A planned matrix: its config (the authority) and what the config implies on its shape,
    the LoRA rank it is decomposed with, and the errors the plan was chosen on."""

    config: str = _schema({
        "type": "string",
        "description": "The authority (bitalloc.quant.config): a registered format family's name, then bits, "
        "block size and what that family stores (symmetric nf/int with float or quantized scales, asymmetric "
        "uint with a zero point, each optionally -mse, -gptq). method, bits, block_size and scale are "
        "checked against it when a plan is read.",
        "pattern": CONFIG_PATTERN,
    })  # fmt: skip
    method: str = _schema({
        "type": "string", "pattern": "^[a-z]+$",
        "description": "The format family: nf, int, uint or a registered one.",
    })  # fmt: skip
    bits: int = _schema({"type": "integer", "minimum": 1, "maximum": 8})
    block_size: int = _schema(
        {"type": "integer", "minimum": BLOCK_SIZE_RANGE[0], "maximum": BLOCK_SIZE_RANGE[1]}
    )
    scale: dict = _schema(SCALE_SCHEMA)
    bits_per_param: float = _schema({"type": "number", "exclusiveMinimum": 0})
    storage_bits: int = _schema(COUNT)  # exact bits on disk: codes, padding, scales
    shape: list[int] = _schema({
        "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 1},
    })  # fmt: skip
    numel: int = _schema(COUNT)
    rank: int = _schema({"type": "integer", "minimum": 0})  # LoRA rank r of the decomposition
    error: float = _schema(NUMBER)  # ||W - Q - BA||_F^2 at the profile
    weighted_error: float | None = _schema(
        {
            "description": "Only in data-aware plans (objective activation or output): the matrix's "
            "weighted (output) error.",
            **NUMBER,
        },
        default=None,
    )
    coefficient: float | None = _schema(
        {
            "description": "Only in plans with layer_weights: what the solver multiplied weighted_error by.",
            **NUMBER,
        },
        default=None,
    )

    @classmethod
    def from_config(cls, config: str | QuantConfig, shape, **values) -> ModuleEntry:
        """The entry of ``config`` on ``shape``: the config's derived fields and exact storage,
        plus ``values`` (numel defaults to out·in)."""
        config = QuantConfig.parse(config)
        shape = [int(n) for n in shape]
        values.setdefault("numel", shape[0] * shape[1])
        return cls(**config.to_dict(), storage_bits=config.storage_bits(tuple(shape)), shape=shape, **values)

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "invalid plan: modules entry") -> ModuleEntry:
        """An entry from its JSON form; BitallocError naming a missing or unknown key."""
        if isinstance(data, ModuleEntry):
            return data
        if not isinstance(data, Mapping):
            raise BitallocError(f"{where}: expected an object, got {type(data).__name__}")
        unknown = [key for key in data if key not in MODULE_KEYS]
        if unknown:
            raise BitallocError(f"{where}: unknown field {unknown[0]!r}")
        try:
            return cls(**data)
        except TypeError:
            missing = [
                f.name for f in dataclasses.fields(cls) if f.default is not None and f.name not in data
            ]
            raise BitallocError(f"{where}: missing field {missing[0]!r}") from None

    def to_dict(self) -> dict:
        """The JSON form, keys in the documented order; optional fields only when set."""
        return {key: getattr(self, key) for key in MODULE_KEYS if getattr(self, key) is not None}

    # ---- the read-only mapping view of the JSON form ------------------------------------
    def __getitem__(self, key: str):
        value = getattr(self, key, None) if key in MODULE_KEYS else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        """Equal to an entry or a mapping with the same JSON form."""
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # mutable, like the dict it replaces


MODULE_KEYS = keys_of(ModuleEntry)  # the entry's key order in the file (the contract)
