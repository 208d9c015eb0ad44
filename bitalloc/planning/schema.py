"""JSON Schemas generated from dataclasses: one property per field, from its metadata.

A field's ``metadata["schema"]`` is its JSON Schema fragment; a zero-argument callable
anywhere in a fragment is called when the schema is built, so enumerations (solvers,
objectives, formats) are read from their registries at that moment instead of being
copied. A field is required unless its default is None (then it is written only when set).
"""

from __future__ import annotations

import dataclasses


def resolve(fragment: object) -> object:
    """``fragment`` with every zero-argument callable in it replaced by its result."""
    if callable(fragment):
        return resolve(fragment())
    if isinstance(fragment, dict):
        return {key: resolve(value) for key, value in fragment.items()}
    if isinstance(fragment, (list, tuple)):
        return [resolve(value) for value in fragment]
    return fragment


def object_schema(cls) -> dict:
    """The JSON Schema of dataclass ``cls``'s JSON form (fields with a schema fragment)."""
    properties, required = {}, []
    for field in dataclasses.fields(cls):
        if "schema" not in field.metadata:
            continue
        properties[field.name] = resolve(field.metadata["schema"])
        if field.default is not None:
            required.append(field.name)
    return {"type": "object", "required": required, "additionalProperties": False, "properties": properties}


def keys_of(cls) -> tuple[str, ...]:
    """The JSON keys of dataclass ``cls``, in field order."""
    return tuple(field.name for field in dataclasses.fields(cls) if "schema" in field.metadata)
