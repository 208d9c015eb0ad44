"""The ``bitalloc`` command: parses arguments, calls the Python API, prints. No logic here."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from .errors import BitallocError
from .fileio import atomic_path


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_profile_options(parser: argparse.ArgumentParser) -> None:
    from .profiler import DEFAULT_BITS, DEFAULT_BLOCK_SIZES, DEFAULT_METHODS, DEFAULT_SCALES

    group = parser.add_argument_group("profile settings")
    group.add_argument("--bits", type=_ints, default=list(DEFAULT_BITS), help="code bits (default 2,3,4,8)")
    group.add_argument(
        "--block-sizes",
        type=_ints,
        default=list(DEFAULT_BLOCK_SIZES),
        help="block sizes B0 (default 32,64,128)",
    )
    group.add_argument("--method", type=_strs, default=list(DEFAULT_METHODS), help="nf,int (default nf)")
    group.add_argument(
        "--scales",
        type=_strs,
        default=list(DEFAULT_SCALES),
        help="scale storage: fp32, fp16, bf16 or b0bB1 like 8b256 (default 8b256)",
    )
    group.add_argument(
        "--configs",
        type=_strs,
        default=None,
        help="explicit config strings instead of the grid, e.g. nf2-b64-s8b256,nf4-b64-sfp32",
    )
    group.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    group.add_argument("--iters", type=int, default=5, help="LoftQ iterations T (default 5)")
    group.add_argument("--lowrank", choices=["randomized", "exact"], default="randomized")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    group.add_argument(
        "--include",
        action="append",
        default=None,
        metavar="REGEX",
        help="profile only matrices whose names match (repeatable)",
    )
    group.add_argument("--exclude", action="append", default=None, metavar="REGEX")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group.add_argument(
        "--objective",
        choices=["auto", "activation", "weight"],
        default=None,
        help="error to minimize: weight ||W - Q - BA||^2, activation (weighted by input second "
        "moments on calibration text), auto (activation when the model can be run: config and "
        "tokenizer). Default: auto for plan; for profile activation with --calibration, else weight",
    )
    group.add_argument(
        "--calibration",
        default=None,
        metavar="TEXTFILE",
        help="text to measure activations on ('default': built-in text from pydoc_data)",
    )
    group.add_argument(
        "--calibration-tokens", type=int, default=8192, help="calibration tokens (default 8192)"
    )


def _profile_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        bits=args.bits, block_sizes=args.block_sizes, methods=args.method, scales=args.scales,
        configs=args.configs, rank=args.rank, iters=args.iters, lowrank=args.lowrank,
        device=args.device, include=args.include, exclude=args.exclude, quiet=args.quiet,
        objective=args.objective or ("auto" if args.command == "plan" else None),
        calibration=args.calibration,
        calibration_tokens=args.calibration_tokens,
    )  # fmt: skip


def cmd_profile(args: argparse.Namespace) -> None:
    from .profiler import profile

    stats: dict[str, float] = {}
    start = time.perf_counter()
    table = profile(args.model, args.output, overwrite=args.overwrite, stats=stats, **_profile_kwargs(args))
    elapsed = time.perf_counter() - start
    if not args.quiet:
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(stats.items()))
        print(
            f"wrote {args.output}: {table['module'].nunique()} matrices x "
            f"{table['config'].nunique()} configs in {elapsed:.1f}s ({steps})"
        )


def cmd_plan(args: argparse.Namespace) -> None:
    from .plan_report import summarize
    from .planner import parse_sweep, plan, sweep
    from .profiler import profile, read_profile

    if args.profile is not None:
        if args.model is not None:
            raise BitallocError("give a MODEL or --profile, not both")
        table = read_profile(args.profile)
    else:
        settings = _profile_kwargs(args)
        table = profile(args.model, _profile_cache(args.output, args.model, settings), **settings)
    constraints = dict(
        solver=args.solver, count_lora=args.count_lora, tie=args.tie or (), min_bits=args.min_bits,
        max_bits=args.max_bits, pin=_pins(args.pin), keep=args.keep or (),
        source=table.attrs.get("source"),
    )  # fmt: skip
    if args.sweep is not None:
        budgets = parse_sweep(args.sweep)
        start = time.perf_counter()
        plans = sweep(table, budgets, **constraints)
        print(f"{'budget':>7} {'achieved':>9} {'total error':>12}  configs used")
        stem = Path(args.output)
        for budget, result in zip(budgets, plans):
            target = stem.with_name(f"{stem.stem}-{budget:g}{stem.suffix}")
            result.save(target)
            _keep_calibration(table, target)
            used = ", ".join(f"{c}x{n}" for c, n in _config_counts(result))
            print(f"{budget:>7g} {result.achieved_bits:>9.4f} {result.total_error:>12.5g}  {used}")
        print(
            f"solved {len(budgets)} budgets in {time.perf_counter() - start:.2f}s; "
            f"wrote {stem.stem}-<budget>{stem.suffix}"
        )
        return
    if args.budget is None:
        raise BitallocError("give --budget BITS (e.g. --budget 2.5) or --sweep START:STOP:STEP")
    start = time.perf_counter()
    result = plan(table, args.budget, **constraints)
    elapsed = time.perf_counter() - start
    result.save(args.output)
    _keep_calibration(table, args.output)
    print(summarize(result, table))
    print(f"solved in {elapsed:.2f}s; wrote {args.output}")


def cmd_apply(args: argparse.Namespace) -> None:
    from .artifacts import apply

    start = time.perf_counter()
    out = apply(
        args.model, args.plan, args.output, lora_alpha=args.lora_alpha, use_rslora=args.use_rslora,
        dequantized=args.dequantized, dequantized_dtype=args.dequantized_dtype,
        device=args.device, quiet=args.quiet, calibration=args.calibration,
    )  # fmt: skip
    parts = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out} ({parts}) in {time.perf_counter() - start:.1f}s")


def _keep_calibration(table, plan_path: str | Path) -> None:
    """A data-aware plan's h goes beside it (``PLAN.calibration.safetensors``) for `apply`."""
    from .calibration import plan_calibration_path

    record = table.attrs.get("calibration") or {}
    if table.attrs.get("objective", "weight") != "weight" and record.get("path"):
        with atomic_path(plan_calibration_path(plan_path)) as temp:
            shutil.copyfile(record["path"], temp)


def _profile_cache(output: str, model: str | None, settings: dict) -> Path:
    """Where `plan MODEL` caches its profile: beside the plan, named by model and settings,
    so that changing a setting starts a new profile instead of clashing with the old one."""
    key = {k: v for k, v in settings.items() if k != "quiet"}
    key["model"] = str(Path(model).resolve()) if model else None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return Path(output).with_name(f"{Path(output).stem}.profile-{digest}.parquet")


def _pins(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    pins = {}
    for item in items:
        regex, sep, config = item.rpartition("=")
        if not sep or not regex or not config:
            raise BitallocError(f"bad --pin {item!r}: expected REGEX=CONFIG, e.g. 'down_proj=nf4-b64-s8b256'")
        pins[regex] = config
    return pins


def _config_counts(result) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for config in result.assignments.values():
        counts[config] = counts.get(config, 0) + 1
    return sorted(counts.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitalloc",
        description="Choose how to quantize every weight matrix under a bit budget (LoftQ init).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"bitalloc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prof = commands.add_parser("profile", help="measure every matrix x config (LoftQ error, storage)")
    prof.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model folder, .safetensors or .gguf file (default: the demo model)",
    )
    prof.add_argument(
        "-o", "--output", default="profile.parquet", help="table to write (default profile.parquet)"
    )
    prof.add_argument("--overwrite", action="store_true", help="replace an output that holds another profile")
    _add_profile_options(prof)
    prof.set_defaults(func=cmd_profile)

    pl = commands.add_parser("plan", help="allocate configs under a bits/param budget (ILP)")
    pl.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model to profile first (cached next to -o); default: the demo model",
    )
    pl.add_argument("--budget", type=float, default=None, help="average bits per parameter, e.g. 2.5")
    pl.add_argument(
        "--sweep",
        default=None,
        metavar="START:STOP:STEP",
        help="many budgets from one profile; writes plan-<budget>.json",
    )
    pl.add_argument("--profile", default=None, help="an existing profile table (Parquet or CSV)")
    pl.add_argument("-o", "--output", default="plan.json", help="plan to write (default plan.json)")
    pl.add_argument(
        "--solver",
        choices=["cbc", "highs", "dp"],
        default="cbc",
        help="cbc (PuLP), highs (scipy) or dp (exact dynamic program); all prove optimality",
    )
    pl.add_argument("--count-lora", action="store_true", help="count the 16-bit LoRA factors in the budget")
    pl.add_argument(
        "--tie",
        action="append",
        metavar="REGEX",
        help="matrices matching with equal capture groups share a config",
    )
    pl.add_argument("--min-bits", type=int, default=None)
    pl.add_argument("--max-bits", type=int, default=None)
    pl.add_argument("--pin", action="append", metavar="REGEX=CONFIG", help="force a config")
    pl.add_argument("--keep", action="append", metavar="REGEX", help="leave in 16 bits, outside the budget")
    _add_profile_options(pl)
    pl.set_defaults(func=cmd_plan)

    ap = commands.add_parser("apply", help="build the quantized backbone and LoftQ LoRA adapter of a plan")
    ap.add_argument(
        "model", nargs="?", default=None,
        help="HF model folder, .safetensors or .gguf file (default: the demo model)",
    )  # fmt: skip
    ap.add_argument("--plan", required=True, help="plan JSON from `bitalloc plan`")
    ap.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="default: each matrix's rank (scaling 1)")
    ap.add_argument("--use-rslora", action="store_true", help="rsLoRA scaling alpha/sqrt(r)")
    ap.add_argument(
        "--dequantized", action="store_true",
        help="also write OUT/dequantized/, a plain checkpoint with Q as 16-bit weights",
    )  # fmt: skip
    ap.add_argument("--dequantized-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument(
        "--calibration", default=None, metavar="FILE",
        help="data-aware plans: the h file (default: PLAN.calibration.safetensors beside the plan)",
    )  # fmt: skip
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.set_defaults(func=cmd_apply)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BitallocError as exc:
        print(f"bitalloc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitalloc: interrupted (a rerun of the same command resumes)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
