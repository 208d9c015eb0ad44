"""Plan entries as typed values (`ModuleEntry`) and the plan schema generated from the
dataclasses: the JSON is unchanged, old plans load, the shipped schema file is the
generated one, and its enumerations are the registries'."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from bitalloc.errors import BitallocError
from bitalloc.planning import mckp, objectives
from bitalloc.planning.entry import MODULE_KEYS, ModuleEntry
from bitalloc.planning.plan_file import PLAN_FORMATS, SCHEMA_FILE, Plan, plan_schema, schema_text

DATA = Path(__file__).parent / "data" / "export"


@pytest.mark.parametrize("name", ["plan.json", "plan-per-tag.json"])
def test_stored_v1_plans_load_typed_and_write_the_same_json(name):
    text = (DATA / name).read_text()
    loaded = Plan.from_json(text)
    assert loaded.format == "bitalloc.plan/v1"
    for entry in loaded.modules.values():
        assert isinstance(entry, ModuleEntry)
        assert isinstance(entry.rank, int) and isinstance(entry.config, str) and len(entry.shape) == 2
    assert json.loads(loaded.to_json()) == json.loads(text)  # the JSON is the same, key order too
    assert list(json.loads(loaded.to_json())) == list(json.loads(text))
    first = next(iter(json.loads(text)["modules"].values()))
    assert list(next(iter(loaded.modules.values())).to_dict()) == list(first)


def test_entry_reads_as_its_json_mapping():
    entry = ModuleEntry.from_config("nf2-b64-s8b256", (64, 128), rank=4, error=0.5)
    assert entry.storage_bits == 64 * 128 * 2 + 128 * 8 + 32 and entry.numel == 64 * 128
    assert entry["config"] == "nf2-b64-s8b256" and entry.get("rank") == 4
    assert "coefficient" not in entry and entry.get("coefficient") is None
    assert dict(entry) == entry.to_dict() and list(entry) == [k for k in MODULE_KEYS if k in entry.to_dict()]
    assert entry == entry.to_dict() and entry == ModuleEntry.from_dict(entry.to_dict())
    assert entry != {**entry.to_dict(), "rank": 5} and entry != dataclasses.replace(entry, rank=5)
    with pytest.raises(KeyError):
        entry["nonsense"]
    weighted = dataclasses.replace(entry, weighted_error=0.25, coefficient=2.0)
    assert list(weighted.to_dict())[-2:] == ["weighted_error", "coefficient"]


def test_plan_built_from_dicts_holds_entries_and_bad_entries_are_refused():
    data = json.loads((DATA / "plan.json").read_text())
    plan = Plan(**data)
    assert all(isinstance(entry, ModuleEntry) for entry in plan.modules.values())
    name = next(iter(data["modules"]))
    data["modules"][name] = {**data["modules"][name], "colour": "red"}
    message = f"invalid plan: modules/{name}: unknown field 'colour'"
    with pytest.raises(BitallocError, match=re.escape(message)):
        Plan(**data)
    del data["modules"][name]["colour"]
    del data["modules"][name]["rank"]
    with pytest.raises(BitallocError, match="missing field 'rank'"):
        Plan(**data)


def test_shipped_schema_file_is_the_generated_one():
    """If this fails, regenerate it: python -m bitalloc.planning.plan_file"""
    assert SCHEMA_FILE.read_text(encoding="utf-8") == schema_text()


def test_schema_and_dataclasses_agree_field_by_field():
    schema = plan_schema()
    module = schema["$defs"]["module"]
    fields = dataclasses.fields(ModuleEntry)
    assert list(module["properties"]) == [f.name for f in fields] == list(MODULE_KEYS)
    assert module["required"] == [f.name for f in fields if f.default is not None]
    assert module["additionalProperties"] is False
    plan_fields = dataclasses.fields(Plan)
    assert list(schema["properties"]) == [f.name for f in plan_fields]
    assert schema["required"] == [f.name for f in plan_fields if f.default is not None]
    assert schema["properties"]["format"]["enum"] == list(PLAN_FORMATS)


def test_schema_enumerations_are_the_registries(monkeypatch):
    schema = plan_schema()
    assert schema["properties"]["solver"]["properties"]["name"]["enum"] == list(mckp.SOLVERS)
    assert schema["properties"]["objective"]["enum"] == list(objectives.OBJECTIVE_COLUMNS)
    # format fields are structural (a registered family validates); the config string decides
    module = schema["$defs"]["module"]["properties"]
    assert "enum" not in module["method"] and "enum" not in module["bits"]
    edited = json.loads((DATA / "plan.json").read_text())
    next(iter(edited["modules"].values()))["method"] = "zz"
    with pytest.raises(BitallocError, match="method"):
        Plan.from_json(json.dumps(edited))
    # a solver registered later is in the schema, and a plan naming it validates
    data = json.loads((DATA / "plan.json").read_text())
    data["solver"]["name"] = "toy"
    with pytest.raises(BitallocError, match="solver/name"):
        Plan.from_json(json.dumps(data))
    monkeypatch.setattr(mckp, "SOLVERS", (*mckp.SOLVERS, "toy"))
    assert plan_schema()["properties"]["solver"]["properties"]["name"]["enum"][-1] == "toy"
    assert Plan.from_json(json.dumps(data)).solver["name"] == "toy"
