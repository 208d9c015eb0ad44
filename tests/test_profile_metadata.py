"""Profile metadata as a typed, versioned record: written as bitalloc.profile/v2, older v1
profiles still load, plan and resume; unknown formats and mistyped fields are refused."""

import json
import re

import pandas as pd
import pyarrow.parquet as pq
import pytest
from _models import make_tiny_llama

from bitalloc.errors import BitallocError
from bitalloc.planning.planner import plan
from bitalloc.profiling.profiler import profile
from bitalloc.profiling.table import (
    PROFILE_FORMAT,
    PROFILE_FORMATS,
    ProfileMetadata,
    profile_metadata,
    read_profile,
    write_profile,
)

CONFIGS = ["nf2-b64-s8b256", "nf4-b128-sfp16"]
FAST = dict(configs=CONFIGS, rank=4, iters=2, quiet=True)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("metadata")
    make_tiny_llama(root / "model", seed=1, shard_size=None)
    output = root / "profile.parquet"
    return root, profile(root / "model", output, **FAST), output


def test_new_profiles_are_v2_and_read_back_typed(profiled):
    _, table, output = profiled
    assert PROFILE_FORMAT == "bitalloc.profile/v2"
    assert PROFILE_FORMATS == ("bitalloc.profile/v1", PROFILE_FORMAT)
    meta = profile_metadata(read_profile(output))
    assert isinstance(meta, ProfileMetadata)
    assert meta.format == PROFILE_FORMAT and meta.objective_name == "weight" and meta.modules == 14
    assert meta.settings == {"configs": CONFIGS, "rank": 4, "iters": 2, "lowrank": "randomized"}
    assert len(meta.tensor_digests) == 14 and meta.extra == {}
    assert meta.to_attrs() == table.attrs  # the JSON form round-trips exactly


def _as_v1(table: pd.DataFrame) -> pd.DataFrame:
    """The table as bitalloc wrote it before the metadata was versioned: the same keys, format v1."""
    old = table.copy()
    old.attrs = {**table.attrs, "format": "bitalloc.profile/v1"}
    return old


def test_a_v1_profile_loads_plans_and_is_reused(profiled, tmp_path):
    root, table, _ = profiled
    old_path = tmp_path / "old.parquet"
    write_profile(_as_v1(table), old_path)
    raw = json.loads(pq.read_schema(old_path).metadata[b"bitalloc"])
    assert raw["format"] == "bitalloc.profile/v1"
    old = read_profile(old_path)
    assert profile_metadata(old).format == "bitalloc.profile/v1"
    assert plan(old, 3.0, solver="dp").to_json() == plan(table, 3.0, solver="dp").to_json()
    assert plan(old_path, 3.0, solver="dp").to_json() == plan(table, 3.0, solver="dp").to_json()
    again = profile(root / "model", old_path, **FAST)  # same model and settings: reused, not refused
    assert again["error"].tolist() == table["error"].tolist()
    assert again.attrs["format"] == "bitalloc.profile/v1"


def test_a_v1_csv_profile_loads(profiled, tmp_path):
    _, table, _ = profiled
    write_profile(_as_v1(table), tmp_path / "old.csv")
    first = (tmp_path / "old.csv").read_text().splitlines()[0]
    assert first.startswith("# bitalloc: ") and '"format": "bitalloc.profile/v1"' in first
    assert plan(tmp_path / "old.csv", 3.0, solver="dp").to_json() == plan(table, 3.0, solver="dp").to_json()


def test_unknown_format_and_mistyped_fields_are_refused(profiled, tmp_path):
    _, table, _ = profiled
    future = table.copy()
    future.attrs = {**table.attrs, "format": "bitalloc.profile/v9"}
    with pytest.raises(BitallocError, match=re.escape("unsupported profile format 'bitalloc.profile/v9'")):
        write_profile(future, tmp_path / "never.parquet")
    assert not (tmp_path / "never.parquet").exists()  # nothing written that the reader refuses
    with pytest.raises(BitallocError, match="unsupported profile format"):
        plan(future, 3.0)
    future.attrs["format"] = PROFILE_FORMAT
    future.attrs["calibration"] = ["not", "a", "record"]
    with pytest.raises(BitallocError, match="the profile's calibration record is not a JSON object"):
        plan(future, 3.0)
    future.attrs["calibration"] = None
    future.attrs["modules"] = True
    with pytest.raises(BitallocError, match="the profile's modules record is not an integer"):
        profile_metadata(future)


def test_a_table_without_metadata_is_weight_only(profiled):
    _, table, _ = profiled
    bare = table.copy()
    bare.attrs = {}
    meta = profile_metadata(bare)
    assert meta.format is None and meta.objective_name == "weight" and meta.to_attrs() == {}
    assert plan(bare, 3.0, solver="dp").assignments == plan(table, 3.0, solver="dp").assignments


def test_unknown_keys_are_kept(profiled, tmp_path):
    _, table, _ = profiled
    newer = table.copy()
    newer.attrs = {**table.attrs, "note": {"from": "a later bitalloc"}}
    write_profile(newer, tmp_path / "p.parquet")
    back = read_profile(tmp_path / "p.parquet")
    assert back.attrs["note"] == {"from": "a later bitalloc"}
    assert profile_metadata(back).extra == {"note": {"from": "a later bitalloc"}}
