"""The command line takes its option names and enumerations from the library's definitions:
one table of profile options (`settings.OPTIONS`), and the registries of solvers,
objectives, low-rank methods, export targets and dtypes (never copied lists)."""

import argparse
import dataclasses

import pytest

from bitalloc.artifacts.writer import DEQUANTIZED_DTYPES
from bitalloc.cli import _profile_options, build_parser
from bitalloc.export import TARGETS
from bitalloc.lora.lowrank import LOWRANK_METHODS
from bitalloc.planning.mckp import SOLVERS
from bitalloc.planning.planner import OBJECTIVE_COLUMNS
from bitalloc.profiling.settings import (
    CALIBRATION_OPTIONS,
    OPTIONS,
    PROFILE_OPTIONS,
    CalibrationSettings,
    ProfileSettings,
    build_settings,
)


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _action(command: str, flag: str) -> argparse.Action:
    return next(a for a in _subparser(command)._actions if flag in a.option_strings)


@pytest.mark.parametrize(
    "command, flag, registry",
    [
        ("plan", "--solver", SOLVERS),
        ("plan", "--objective", ("auto", *OBJECTIVE_COLUMNS)),
        ("profile", "--objective", ("auto", *OBJECTIVE_COLUMNS)),
        ("profile", "--lowrank", LOWRANK_METHODS),
        ("export", "--to", TARGETS),
        ("apply", "--dequantized-dtype", DEQUANTIZED_DTYPES),
        ("apply", "--unplanned-dtype", DEQUANTIZED_DTYPES),
    ],
)
def test_cli_choices_are_the_registries(command, flag, registry):
    assert list(_action(command, flag).choices) == list(registry)


def test_every_profile_flag_is_one_option_of_the_table():
    for command in ("profile", "plan"):
        group = next(g for g in _subparser(command)._action_groups if g.title.startswith("profile settings"))
        flags = {a.option_strings[0] for a in group._group_actions} - {"--calibration", "--quiet"}
        assert flags == {o.flag for o in OPTIONS if o.flag is not None}
    assert len({o.keyword for o in OPTIONS}) == len(OPTIONS)  # each name once
    for option in OPTIONS:
        assert option.field in {f.name for f in dataclasses.fields(option.settings)}, option
    assert PROFILE_OPTIONS == {f.name for f in dataclasses.fields(ProfileSettings)}
    assert set(CALIBRATION_OPTIONS.values()) <= {f.name for f in dataclasses.fields(CalibrationSettings)}


def test_parsed_flags_reach_the_settings_fields():
    args = build_parser().parse_args(
        ["profile", "--method", "int,nf", "--block-sizes", "32", "--calibration-tokens", "100", "--damping",
         "0.05", "--layer-weights", "--rank", "8", "--objective", "activation"]
    )  # fmt: skip
    options = _profile_options(args)
    settings, calibration = build_settings(None, None, options)
    assert settings.methods == ("int", "nf") and settings.block_sizes == (32,) and settings.rank == 8
    assert (calibration.tokens, calibration.damping, calibration.layer_weights) == (100, 0.05, True)
    assert calibration.objective == "activation"
    assert build_settings(None, None, _profile_options(build_parser().parse_args(["profile"]))) == (
        ProfileSettings(),
        CalibrationSettings(),
    )  # nothing given: every default is the library's
