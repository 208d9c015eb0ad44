"""The ``bitalloc`` command: parses arguments, calls the Python API, prints. No logic here."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import warnings
from pathlib import Path

from .errors import BitallocError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _profile_flags() -> dict[str, str]:
    """argparse destination -> keyword option of `bitalloc.profile`, from the library's one
    table of option names (`bitalloc.profiling.settings.OPTIONS`)."""
    from .profiling.settings import OPTIONS

    return {option.dest: option.keyword for option in OPTIONS if option.flag is not None}


def _choices() -> dict[str, tuple[str, ...]]:
    """The enumerations the CLI offers, read from the library's registries (never copied)."""
    from .artifacts.writer import APPLY_FORMATS, DEQUANTIZED_DTYPES
    from .export import TARGETS
    from .lora.lowrank import LOWRANK_METHODS
    from .planning.mckp import SOLVERS
    from .planning.planner import OBJECTIVE_COLUMNS

    return {
        "objective": ("auto", *OBJECTIVE_COLUMNS),
        "solver": tuple(SOLVERS),
        "lowrank": tuple(LOWRANK_METHODS),
        "target": tuple(TARGETS),
        "dtype": tuple(DEQUANTIZED_DTYPES),
        "format": APPLY_FORMATS,
    }


def _add_profile_options(parser: argparse.ArgumentParser, choices: dict[str, tuple[str, ...]]) -> None:
    group = parser.add_argument_group("profile settings (defaults: bitalloc.ProfileSettings)")
    group.add_argument("--bits", type=_ints, help="code bits (default 2,3,4,8)")
    group.add_argument("--block-sizes", type=_ints, help="block sizes B0 (default 32,64,128)")
    group.add_argument("--method", type=_strs, help="nf,int (default nf)")
    group.add_argument(
        "--scales", type=_strs, help="scale storage: fp32, fp16, bf16 or b0bB1 like 8b256 (default 8b256)"
    )
    group.add_argument(
        "--configs",
        type=_strs,
        help="explicit config strings instead of the grid, e.g. nf2-b64-s8b256,nf4-b64-sfp32",
    )
    group.add_argument("--rank", type=int, help="LoRA rank r (default 16)")
    group.add_argument("--iters", type=int, help="LoftQ iterations T (default 5)")
    group.add_argument("--lowrank", choices=choices["lowrank"])
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    group.add_argument(
        "--include",
        action="append",
        metavar="REGEX",
        help="profile only matrices whose names match (repeatable)",
    )
    group.add_argument("--exclude", action="append", metavar="REGEX")
    group.add_argument(
        "--objective",
        choices=choices["objective"],
        help="error to minimize: weight ||W - Q - BA||^2; output: the layer's output error on "
        "calibration text (full input covariance); activation: its diagonal approximation; auto: "
        "output when the model can be run (config and tokenizer). Default: auto for plan; for "
        "profile output with --calibration, else weight",
    )
    group.add_argument(
        "--calibration", metavar="TEXTFILE", help="text to measure activations on ('default': built-in text)"
    )
    group.add_argument("--calibration-tokens", type=int, help="calibration tokens (default 8192)")
    group.add_argument(
        "--damping",
        type=float,
        help="output objective: λ, added to H as a fraction of its mean diagonal (0.01)",
    )
    group.add_argument(
        "--layer-weights",
        action="store_true",
        default=None,
        help="weigh each matrix's error by a measured loss coefficient (noise injection; data-aware only)",
    )
    group.add_argument(
        "--layer-tokens", type=int, help="tokens the layer weights are measured on (default 512)"
    )
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def _profile_options(args: argparse.Namespace) -> dict:
    """Only the profile options the user gave: the library owns every default."""
    return {
        key: getattr(args, flag) for flag, key in _profile_flags().items() if getattr(args, flag) is not None
    }


def cmd_profile(args: argparse.Namespace) -> None:
    from .profiling.profiler import profile

    stats: dict[str, float] = {}
    start = time.perf_counter()
    table = profile(
        args.model, args.output, calibration=args.calibration, overwrite=args.overwrite, verify=args.verify,
        quiet=args.quiet, stats=stats, **_profile_options(args),
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    if not args.quiet:
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(stats.items()))
        print(
            f"wrote {args.output}: {table['module'].nunique()} matrices x "
            f"{table['config'].nunique()} configs in {elapsed:.1f}s ({steps})"
        )


def cmd_plan(args: argparse.Namespace) -> None:
    from .export import target_format
    from .planning.pipeline import PlanConstraints, budget_label, plan_files
    from .planning.report import config_counts, summarize

    constraints = PlanConstraints(
        solver=args.solver, count_lora=args.count_lora, tie=tuple(args.tie or ()), min_bits=args.min_bits,
        max_bits=args.max_bits, pin=_pins(args.pin), keep=tuple(args.keep or ()),
        target=None if args.target is None else target_format(args.target),
    )  # fmt: skip
    options = _profile_options(args)
    run = plan_files(
        args.model, profile_path=args.profile, budget=args.budget, budgets=args.sweep, output=args.output,
        calibration=args.calibration, constraints=constraints, quiet=args.quiet, **options,
    )  # fmt: skip
    if args.sweep is None:
        print(summarize(run.plans[0], run.table, constraints.target))
        print(f"solved in {run.seconds:.2f}s; wrote {run.paths[0]}")
        return
    print(f"{'budget':>7} {'achieved':>9} {'total error':>12}  configs used")
    for budget, result in zip(run.budgets, run.plans):
        used = ", ".join(f"{c}x{n}" for c, n in config_counts(result))
        print(f"{budget_label(budget):>7} {result.achieved_bits:>9.4f} {result.total_error:>12.5g}  {used}")
    stem = Path(args.output)
    print(f"solved {len(run.plans)} budgets in {run.seconds:.2f}s; wrote {stem.stem}-<budget>{stem.suffix}")


def cmd_apply(args: argparse.Namespace) -> None:
    from .artifacts.writer import LoraSettings, apply

    start = time.perf_counter()
    out = apply(
        args.model, args.plan, args.output, LoraSettings(args.lora_alpha, args.use_rslora),
        dequantized=args.dequantized, dequantized_dtype=args.dequantized_dtype,
        device=args.device, quiet=args.quiet, calibration=args.calibration, verify=args.verify,
        unplanned_dtype=args.unplanned_dtype, format=args.format, embedding_config=args.embedding,
    )  # fmt: skip
    parts = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"wrote {out} ({parts}) in {time.perf_counter() - start:.1f}s")


def cmd_merge(args: argparse.Namespace) -> None:
    from .artifacts.merge_stream import merge

    start = time.perf_counter()
    merged = merge(args.out, args.output, adapter=args.adapter, dtype=args.dtype, quiet=args.quiet)
    print(f"wrote {merged} ({args.dtype}, adapter merged) in {time.perf_counter() - start:.1f}s")


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export, export_weights

    if args.weights is not None or args.model is not None:
        if args.weights is None or args.model is None:
            raise BitallocError("export --weights OUT_DIR needs --model MODEL (and --model needs --weights)")
        result = export_weights(args.plan, args.to, args.weights, args.model, device=args.device,
                                calibration=args.calibration, config_output=args.output)  # fmt: skip
    else:
        result = export(args.plan, args.to, args.output, imatrix=args.imatrix, per_module=args.per_module)
    for note in result.notes:
        print(f"bitalloc: note: {note}", file=sys.stderr)
    if args.weights is not None:
        bits = f"{result.target_bits:.4g} bits/param in its accounting"
        print(f"wrote {args.weights} ({args.to} weights, {bits})")
    elif args.output is None:
        sys.stdout.write(result.text)
    else:
        print(f"wrote {result.path} ({args.to}, {result.target_bits:.4g} bits/param in its accounting)")


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluation import evaluate, format_evaluation

    start = time.perf_counter()
    result = evaluate(
        args.model, args.plan, reference=args.reference, text=args.text, tokens=args.tokens,
        context=args.context, device=args.device, calibration=args.calibration, output=args.output,
        save=True, quiet=args.quiet,
    )  # fmt: skip
    print(format_evaluation(result))
    print(f"wrote {result['path']} in {time.perf_counter() - start:.1f}s")


def cmd_report(args: argparse.Namespace) -> None:
    from .evaluation import report

    files = report(args.inputs, args.output)
    for note in files.notes:
        print(f"bitalloc: note: {note}", file=sys.stderr)
    names = ", ".join(png.name for png, _ in files.figures.values())
    print(f"wrote {files.folder}/ ({len(files.figures)} figures: {names}; README.md)")


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


def _model_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("model", nargs="?", default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bitalloc",
        description="Choose how to quantize every weight matrix under a bit budget (LoftQ init).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"bitalloc {__version__}")
    choices = _choices()
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one error line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    _add_profile_command(commands, choices)
    _add_plan_command(commands, choices)
    _add_apply_command(commands, choices)
    _add_merge_command(commands, choices)
    _add_eval_command(commands)
    _add_report_command(commands)
    _add_export_command(commands, choices)
    return parser


def _add_profile_command(commands, choices: dict[str, tuple[str, ...]]) -> None:
    """The ``profile`` command's arguments."""
    prof = commands.add_parser("profile", help="measure every matrix x config (LoftQ error, storage)")
    _model_argument(prof, "HF model folder, .safetensors or .gguf file (default: the demo model)")
    prof.add_argument(
        "-o", "--output", default="profile.parquet", help="table to write (default profile.parquet)"
    )
    prof.add_argument("--overwrite", action="store_true", help="replace an output that holds another profile")
    prof.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every weight when resuming or reusing (default: changed files)",
    )
    _add_profile_options(prof, choices)
    prof.set_defaults(func=cmd_profile)


def _add_plan_command(commands, choices: dict[str, tuple[str, ...]]) -> None:
    """The ``plan`` command's arguments."""
    pl = commands.add_parser("plan", help="allocate configs under a bits/param budget (ILP)")
    _model_argument(pl, "model to profile first (cached next to -o); default: the demo model")
    pl.add_argument("--budget", type=float, default=None, help="average bits per parameter, e.g. 2.5")
    pl.add_argument(
        "--sweep",
        default=None,
        metavar="START:STOP:STEP",
        help="many budgets from one profile; writes plan-<budget>.json",
    )
    pl.add_argument(
        "--profile",
        default=None,
        help="an existing profile table (Parquet or CSV); profile settings do not apply",
    )
    pl.add_argument("-o", "--output", default="plan.json", help="plan to write (default plan.json)")
    pl.add_argument(
        "--solver",
        choices=choices["solver"],
        default="cbc",
        help=f"one of {', '.join(choices['solver'])} (see bitalloc.plan); all prove optimality",
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
    pl.add_argument(
        "--target",
        choices=choices["target"],
        default=None,
        help="plan in this export target's format: only configs it stores exactly, counted in its storage",
    )
    _add_profile_options(pl, choices)
    pl.set_defaults(func=cmd_plan)


def _add_apply_command(commands, choices: dict[str, tuple[str, ...]]) -> None:
    """The ``apply`` command's arguments."""
    ap = commands.add_parser("apply", help="build the quantized backbone and LoftQ LoRA adapter of a plan")
    _model_argument(ap, "HF model folder, .safetensors or .gguf file (default: the demo model)")
    ap.add_argument("--plan", required=True, help="plan JSON from `bitalloc plan`")
    ap.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="default: each matrix's rank (scaling 1)")
    ap.add_argument("--use-rslora", action="store_true", help="rsLoRA scaling alpha/sqrt(r)")
    ap.add_argument(
        "--dequantized", action="store_true",
        help="also write OUT/dequantized/, a plain checkpoint with Q as 16-bit weights",
    )  # fmt: skip
    ap.add_argument("--dequantized-dtype", choices=choices["dtype"], default="bf16")
    ap.add_argument(
        "--format", choices=choices["format"], default="bitalloc",
        help="OUT/quantized/ as bitalloc's packed format (default) or a compressed-tensors "
        "pack-quantized checkpoint (uint...-z{k} configs only; loads without bitalloc)",
    )  # fmt: skip
    ap.add_argument(
        "--unplanned-dtype", choices=choices["dtype"], default=None,
        help="dtype of the tensors outside the plan (default: as stored; a GGUF's quantized ones bf16)",
    )  # fmt: skip
    ap.add_argument(
        "--embedding", default=None, metavar="CONFIG",
        help="store the input embedding quantized in this config (e.g. int8-b32-sfp16); it loads dense",
    )  # fmt: skip
    ap.add_argument(
        "--calibration", default=None, metavar="FILE",
        help="data-aware plans: their calibration text, if not at the path the plan records",
    )  # fmt: skip
    ap.add_argument(
        "--verify", action="store_true",
        help="when resuming, re-hash the weights of every matrix already done (one read of them) "
        "instead of trusting unchanged file size and time",
    )  # fmt: skip
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.set_defaults(func=cmd_apply)


def _add_merge_command(commands, choices: dict[str, tuple[str, ...]]) -> None:
    """The ``merge`` command's arguments."""
    mg = commands.add_parser("merge", help="merge the LoRA adapter into the model: a plain 16-bit checkpoint")
    mg.add_argument("out", metavar="OUT", help="folder written by `bitalloc apply` (quantized/, adapter/)")
    mg.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    mg.add_argument("--adapter", default=None, metavar="DIR", help="adapter to merge (default: OUT/adapter)")
    mg.add_argument("--dtype", choices=choices["dtype"], default="bf16", help="dtype of the merged model")
    mg.add_argument("--quiet", action="store_true", help="no progress bar")
    mg.set_defaults(func=cmd_merge)


def _add_eval_command(commands) -> None:
    """The ``eval`` command's arguments."""
    ev = commands.add_parser(
        "eval", help="perplexity, KL and top-1 of a plan's LoftQ and QLoRA starts against the original"
    )
    _model_argument(ev, "model (default: the demo model), or OUT/ written by `bitalloc apply` (no --plan)")
    ev.add_argument("--plan", default=None, help="plan JSON from `bitalloc plan` (not with OUT/)")
    ev.add_argument(
        "--reference", default=None, metavar="MODEL",
        help="with OUT/: the original model (default: the model recorded in the plan)",
    )  # fmt: skip
    ev.add_argument("--text", default=None, metavar="FILE", help="text to evaluate on (default: built-in)")
    ev.add_argument("--tokens", type=int, default=None, help="tokens of the text (default 8192)")
    ev.add_argument("--context", type=int, default=None, help="window length (default 512)")
    ev.add_argument(
        "--calibration", default=None, metavar="FILE",
        help="data-aware plans: their calibration text, if not at the path the plan records",
    )  # fmt: skip
    ev.add_argument("-o", "--output", default=None, help="result JSON (default eval.json)")
    ev.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default auto)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)


def _add_report_command(commands) -> None:
    """The ``report`` command's arguments."""
    rp = commands.add_parser("report", help="figures (PNG, CSV, README.md) of a profile, plans, evals")
    rp.add_argument("inputs", nargs="+", help="profile.parquet, plan JSON and `bitalloc eval` JSON files")
    rp.add_argument("-o", "--output", default=None, help="output folder (default report/)")
    rp.set_defaults(func=cmd_report)


def _add_export_command(commands, choices: dict[str, tuple[str, ...]]) -> None:
    """The ``export`` command's arguments."""
    ex = commands.add_parser("export", help="write the plan as another quantizer's config")
    ex.add_argument("plan", help="plan JSON from `bitalloc plan` (best from a --rank 0 profile)")
    ex.add_argument("--to", required=True, metavar="TARGET", choices=choices["target"],
                    help=", ".join(choices["target"]))  # fmt: skip
    ex.add_argument("-o", "--output", default=None, help="file to write (default: standard output)")
    ex.add_argument("--imatrix", action="store_true", help="llamacpp: an importance matrix will be given")
    ex.add_argument(
        "--per-module",
        action="store_true",
        help="hqq: a per-module dict for HQQLinear (plans not uniform per tag)",
    )
    ex.add_argument(
        "--weights",
        default=None,
        metavar="OUT_DIR",
        help="also write the quantized weights in the target's format (compressed-tensors, hqq)",
    )
    ex.add_argument("--model", default=None, help="with --weights: the model the plan was made for")
    ex.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="with --weights: a data-aware plan's calibration text (if moved)",
    )
    ex.add_argument("--device", default="auto", help="with --weights: auto, cpu, cuda or cuda:N")
    ex.set_defaults(func=cmd_export)


class _Parser(argparse.ArgumentParser):
    """argparse with bitalloc's error line (``bitalloc: error: ...``, exit 2)."""

    def error(self, message: str):
        self.exit(2, f"bitalloc: error: {message} (see bitalloc {self.prog.split()[-1]} --help)\n")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"bitalloc: warning: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # optional libraries that PEFT imports log their missing GPU kernels: not the user's concern
    logging.getLogger("torchao").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    terminate = _on_sigterm()
    try:
        args.func(args)
    except BitallocError as exc:
        if debug:
            raise
        print(f"bitalloc: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, a directory where a file is expected, a full disk, ...
        if debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"bitalloc: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("bitalloc: interrupted (a rerun of the same command resumes)", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        warnings.showwarning = previous
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it stops as Ctrl-C does (work saved,
    temporary files removed, one line, resumable)."""


def _on_sigterm():
    """Install the SIGTERM handler; the previous one (None outside the main thread)."""

    def handler(signum, frame):
        raise _Terminated

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None


if __name__ == "__main__":
    sys.exit(main())
