"""What a profile table says about itself: `ProfileMetadata`, a typed, versioned record.

It travels in the table's ``DataFrame.attrs`` as plain JSON data (pandas keeps attrs a
dict, and the file stores them as one JSON object: Parquet schema metadata, or a CSV's
first line), and is read back through `ProfileMetadata.from_attrs`, which checks every
field's type once, so later stages read attributes instead of probing a dict.

Formats: ``bitalloc.profile/v2`` is this record; ``bitalloc.profile/v1`` (the same keys,
written before the record was typed: the objective, calibration, layer weights and
per-matrix digests were added to it without a new format string) still loads, and a table
with no metadata at all (a CSV written by hand) reads as a weight-only profile.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

from ..errors import BitallocError

PROFILE_FORMAT = "bitalloc.profile/v2"
PROFILE_FORMATS = ("bitalloc.profile/v1", PROFILE_FORMAT)  # what loads
# 2: a sha256 of every stored byte per matrix (format 1 sampled 4,096 elements per matrix)
DIGEST_FORMAT = 2


@dataclass(kw_only=True)
class ProfileMetadata:
    """A profile's metadata; field names are the keys of its JSON form."""

    format: str | None = PROFILE_FORMAT  # None: a table with no metadata (hand-made)
    source: str | None = None  # the model as given (a path, "demo:...")
    fingerprint: str | None = None  # digest of the selected matrices' names and shapes
    objective: str | None = None  # None: weight-only (older or hand-made tables)
    settings: dict | None = None  # what was measured: configs, rank, iters, lowrank, calibration...
    modules: int | None = None  # number of matrices profiled
    selection: dict | None = None  # the include/exclude regexes
    digest_format: int | None = None  # DIGEST_FORMAT; None: an older sampled content digest
    file_stats: dict | None = None  # checkpoint file -> (size, mtime): cheap change detection
    tensor_digests: dict | None = None  # module -> sha256 of its stored bytes
    content_digest: str | None = None  # digest of all of them (or the older sampled digest)
    calibration: dict | None = None  # data-aware: what the statistics are computed from
    layer_weights: dict | None = None  # per-matrix loss coefficients and how they were measured
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as read

    # ---- reading ------------------------------------------------------------------------
    @classmethod
    def from_attrs(cls, attrs: object) -> ProfileMetadata:
        """The metadata of ``attrs`` (a table's ``.attrs``); BitallocError naming the first
        field of the wrong type, or an unknown format."""
        if not isinstance(attrs, dict):
            raise BitallocError(f"the profile's metadata is not a JSON object: {_shown(attrs)}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {key: value for key, value in attrs.items() if key in known}
        values.setdefault("format", None)
        meta = cls(**values, extra={key: value for key, value in attrs.items() if key not in known})
        meta.check()
        return meta

    def check(self) -> None:
        """BitallocError unless every field has its type (see the field comments)."""
        if self.format is not None and self.format not in PROFILE_FORMATS:
            raise BitallocError(
                f"unsupported profile format {_shown(self.format)}: "
                f"expected one of {', '.join(PROFILE_FORMATS)}"
            )
        if self.objective is not None and not isinstance(self.objective, str):
            raise BitallocError(f"unknown objective {_shown(self.objective)} in the profile")
        for name, kind in _TYPES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if (isinstance(value, bool) and kind is numbers.Integral) or not isinstance(value, kind):
                expected = {str: "a string", dict: "a JSON object", numbers.Integral: "an integer"}[kind]
                raise BitallocError(f"the profile's {name} record is not {expected}: {_shown(value)}")
        if self.layer_weights and not isinstance(self.layer_weights.get("coefficients"), dict):
            raise BitallocError("the profile's layer_weights record has no coefficients")

    # ---- views --------------------------------------------------------------------------
    @property
    def objective_name(self) -> str:
        """The objective the errors were measured for ("weight" when none is recorded)."""
        return self.objective or "weight"

    @property
    def coefficients(self) -> dict | None:
        """Module -> loss coefficient, when the profile measured layer weights."""
        return self.layer_weights["coefficients"] if self.layer_weights else None

    def identity(self) -> dict:
        """What a resumed or reused profile must share with the run: the model's fingerprint
        and the settings (the format string is not compared: every loadable format measures
        the same way)."""
        return {"fingerprint": self.fingerprint, "settings": self.settings}

    # ---- writing ------------------------------------------------------------------------
    def to_attrs(self) -> dict:
        """The JSON form: fields that are set, then the unknown keys kept from reading."""
        data = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "extra" and getattr(self, f.name) is not None
        }
        return {**data, **{key: value for key, value in self.extra.items() if key not in data}}


_TYPES = {
    "format": str, "source": str, "fingerprint": str, "settings": dict,
    "modules": numbers.Integral, "selection": dict, "digest_format": numbers.Integral, "file_stats": dict,
    "tensor_digests": dict, "content_digest": str, "calibration": dict, "layer_weights": dict,
}  # fmt: skip


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"
