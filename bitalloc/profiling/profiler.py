"""Profile: run LoftQ for every selected matrix x every candidate config, one row each.

Streaming (one matrix, or one batch of same-shaped matrices on a GPU, in memory at a
time, the next read overlapping the current compute), resumable (each matrix's rows are
appended to a side log in ``OUT.partial/`` as soon as they are done; the Parquet table
is written atomically at the end) and parallel under torchrun (matrices split across
ranks by estimated cost; rank 0 merges). Randomized steps are seeded from
(module, config), so single, resumed and parallel runs give the same table.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pandas as pd
import torch

from ..checkpoints import Source, open_source
from ..checkpoints.base import combine_digests
from ..devices import resolve_device
from ..errors import BitallocError
from ..fileio import check_output
from ..lora import Assignment, decompose
from ..lora.decomposition import check_rank
from ..lora.weighting import IDENTITY, Weighting
from ..quant import QuantConfig
from .calibrator import Calibrator
from .distributed import Distributed, split_by_cost
from .layer_weights import layer_weights_path, layer_weights_spec, prepare_layer_weights
from .memory import release_freed_memory
from .objectives import Objective, resolve_objective
from .settings import MAX_ITERS, CalibrationSettings, ProfileSettings, build_settings
from .table import DIGEST_FORMAT, ProfileMetadata, ProfileStore, read_profile

# GPU batches of same-shaped matrices stay under this many elements (fp32: 4 bytes each,
# LoftQ holds about six copies)
CUDA_BATCH_ELEMENTS = 1 << 27


# shape: the public function's documented options; most of its length is the docstring
def profile(
    model: str | os.PathLike | torch.nn.Module | Source | None = None,
    output: str | os.PathLike | None = None,
    settings: ProfileSettings | None = None,
    calibration: CalibrationSettings | str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    verify: bool = False,
    quiet: bool = False,
    stats: dict | None = None,
    **options,
) -> pd.DataFrame:
    """Profile ``model`` (a path, an nn.Module, a Source, or None for the demo model).

    ``settings`` (`ProfileSettings`) says what to measure and ``calibration``
    (`CalibrationSettings`, or a text file / "default") on which data; keyword ``options``
    override single fields (``rank=8``, ``configs=[...]``, ``include=REGEX``,
    ``objective="auto"``, ``calibration_tokens=4096``, ``calibration_ids=ids``,
    ``column_weights={module: h}``).

    With ``output`` the table is also written there as Parquet, and an interrupted run
    resumes where it stopped. Every stored weight byte is hashed while it is read; a resume
    or a reuse of a finished table re-hashes the matrices whose files changed since (all of
    them with ``verify``) and refuses other weights. ``stats``, if given, receives
    read/quantize/factorize times.

    Data-aware (objective "output": the full input covariance H; "activation": its diagonal
    h; implied by any calibration data; "auto": whenever the model can be run): every
    decomposition minimizes the output error on the calibration tokens, reported as
    ``weighted_error``. The statistics are computed one transformer block at a time and the
    block's matrices measured while they are in memory; nothing is stored (the metadata
    records what they are computed from: see `bitalloc.profiling.calibration`).
    """
    settings, calibration = build_settings(settings, calibration, options)
    grid = settings.grid()
    rank, iters = settings.rank, settings.iters
    check_rank(rank)
    if isinstance(iters, bool) or not isinstance(iters, int) or not 0 <= iters <= MAX_ITERS:
        raise BitallocError(f"iters must be a whole number from 0 to {MAX_ITERS}, got {iters!r}")
    source = open_source(model, settings.include, settings.exclude)
    device = settings.device
    dist = Distributed.from_env(device)
    if dist.world > 1 and output is None:
        raise BitallocError("a torchrun profile needs an output file (-o) to merge the ranks into")
    device = dist.device or resolve_device(device)
    objective = resolve_objective(model, calibration)
    meta = _metadata(model, source, settings, grid, objective, calibration)
    for module in source.modules():
        if rank > min(source.shape(module)):
            raise BitallocError(f"rank {rank} exceeds the size of {module} {source.shape(module)}")
        if not any(config.fits(source.shape(module)) for config in grid):
            raise BitallocError(
                f"no config of the grid fits {module} {source.shape(module)}: rows of "
                f"{source.shape(module)[1]} are not whole blocks of {', '.join(map(str, grid))}"
            )
    inputs = (*source.input_files(), calibration.text)
    store = ProfileStore(output, meta, overwrite, inputs) if output is not None else None
    if output is not None:
        check_output(layer_weights_path(output), inputs)
    run = _Run(source, grid, meta.settings, device, store, dist, quiet, stats if stats is not None else {},
               objective, float(calibration.damping))  # fmt: skip
    release_freed_memory()  # from here on, large temporaries are unmapped when freed (`memory`)
    try:
        return _profile(run, model, output, meta, calibration, verify)
    finally:
        if store is not None:
            store.close()


@dataclass
class _Run:
    """One profile run's context, shared by its steps: what is measured (``grid`` and the
    LoftQ ``settings``: rank, iters, lowrank) where, logged to which ``store``, on which
    rank of ``dist``; the ``objective`` and its damping λ; ``timings`` accumulates seconds."""

    source: Source
    grid: list[QuantConfig]
    settings: dict
    device: torch.device
    store: ProfileStore | None
    dist: Distributed
    quiet: bool
    timings: dict
    objective: Objective
    damping: float

    def assignment(self, config: QuantConfig) -> Assignment:
        settings = self.settings
        return Assignment(config, settings["rank"], settings["iters"], lowrank=settings["lowrank"])


# shape: the profile's inputs that its metadata records, each once
def _metadata(model, source: Source, settings: ProfileSettings, grid: list[QuantConfig], objective: Objective,
              calibration: CalibrationSettings) -> ProfileMetadata:  # fmt: skip
    """The profile's metadata before the run: what is measured, on which model, for which
    objective (its settings are the resume identity)."""
    profile_settings = {
        "configs": [str(c) for c in grid], "rank": settings.rank, "iters": settings.iters,
        "lowrank": settings.lowrank,
    }  # fmt: skip
    profile_settings.update(objective.profile_settings(model, calibration))
    rounded = [str(c) for c in grid if c.gptq]
    if rounded and not getattr(objective, "covariance", False):
        raise BitallocError(
            f"{rounded[0]}: -gptq rounding feeds errors back through the layer's input covariance, which "
            f"the {objective.name} objective does not have (it would be nearest rounding): profile with "
            "calibration data and the output objective, or drop -gptq"
        )
    if calibration.layer_weights:
        if not objective.data_aware:
            raise BitallocError(
                f"layer weights need a data-aware objective (activation or output), not {objective.name!r}"
            )
        profile_settings["layer_weights"] = layer_weights_spec(calibration, grid)
    return ProfileMetadata(
        source=source.name,
        fingerprint=source.fingerprint(),
        digest_format=DIGEST_FORMAT,
        file_stats=source.file_stats(),
        objective=objective.name,
        settings=profile_settings,
        modules=len(source.modules()),
        selection={"include": _listed(settings.include), "exclude": _listed(settings.exclude)},
    )


def _listed(patterns) -> list[str] | None:
    return None if patterns is None else list(patterns)


def _profile(run: _Run, model, output, meta: ProfileMetadata, calibration: CalibrationSettings, verify: bool):
    """The run itself (profile's arguments checked and its output folder claimed)."""
    source, store, dist, stats = run.source, run.store, run.dist, run.timings
    if store is not None:
        finished = dist.first(lambda: store.prepare(source, verify))
        if finished is not None:
            if not run.quiet and dist.rank == 0:
                print(f"profile {output} is up to date ({len(finished)} rows)")
            return finished
    statistics = None
    if run.objective.data_aware:
        start = time.perf_counter()
        shapes = {m: source.shape(m) for m in source.modules()}
        meta.calibration, statistics = run.objective.profile_statistics(model, calibration, shapes)
        if calibration.layer_weights:
            weights = meta.file_stats or source.content_digest()
            identity = {"fingerprint": meta.fingerprint, "weights": weights}
            meta.layer_weights = dist.first(
                lambda: prepare_layer_weights(
                    model, source, source.modules(), output, identity, calibration, run.grid, quiet=run.quiet
                )
            )
        stats["calibration"] = stats.get("calibration", 0.0) + time.perf_counter() - start

    def work():
        done = store.done_modules() if store is not None else {}
        if store is not None:
            store.check_weights(source, done, verify)
        todo = [m for m in source.modules() if m not in done]
        if isinstance(statistics, Calibrator):
            return _run_by_block(run, todo, model, statistics)
        mine = split_by_cost(todo, source, len(run.grid), dist.world)[dist.rank]
        return _run_modules(run, mine, statistics)

    # each guarded step ends every rank with the same error when any rank fails (no rank
    # waits forever in a collective); `each` also waits until every rank's matrices are logged
    new_rows = dist.each(work)

    def merge():
        rows = store.done_modules() if store is not None else new_rows
        table = _assemble(source.modules(), rows, meta)
        if store is not None:
            store.finish(table)
        return table

    table = dist.first(merge, share=False)
    return table if table is not None else read_profile(output)


def _run_by_block(run: _Run, todo: list[str], model, calibrator: Calibrator) -> dict:
    """The data-aware profile: the calibration runs one block at a time, and each block's
    matrices (this rank's share of them) are profiled while that block's statistics are in
    memory, then dropped. A resumed run hooks only the blocks with unfinished matrices and
    stops after the last of them."""
    from tqdm.auto import tqdm

    runner_blocks: dict[str, list[str]] = {}
    for module in todo:
        runner_blocks.setdefault(_block_prefix(module), []).append(module)
    mine = []
    for names in runner_blocks.values():
        mine += split_by_cost(names, run.source, len(run.grid), run.dist.world)[run.dist.rank]
    results: dict[str, dict] = {}
    bar = tqdm(total=len(mine), unit="matrix", disable=run.quiet or run.dist.rank != 0, dynamic_ncols=True)

    def consume(names: list[str], statistics: dict[str, torch.Tensor]) -> None:
        results.update(_run_modules(run, names, statistics, bar=bar))

    try:
        calibrator.stream(model, mine, consume, timings=run.timings)
    finally:
        bar.close()
    return results


def _block_prefix(module: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3.`` (the text up to the first number)."""
    parts = module.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)
    return ".".join(parts[: index + 1]) + "."


def _batches(modules: list[str], source: Source, device: torch.device) -> list[list[str]]:
    """Same-shaped matrices together on CUDA (bounded memory); one at a time on the CPU."""
    if device.type != "cuda":
        return [[m] for m in modules]
    by_shape: dict[tuple[int, int], list[str]] = {}
    for module in modules:
        by_shape.setdefault(source.shape(module), []).append(module)
    batches = []
    for shape, names in by_shape.items():
        size = max(1, CUDA_BATCH_ELEMENTS // math.prod(shape))
        batches += [names[i : i + size] for i in range(0, len(names), size)]
    return batches


def _run_modules(run: _Run, modules: list[str], statistics=None, *, bar=None) -> dict:
    """Profile ``modules``; ``statistics``: their statistic by module, or None."""
    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    batches = _batches(modules, run.source, run.device)
    if not batches:
        return results
    own_bar = bar is None
    if own_bar:
        quiet = run.quiet or run.dist.rank != 0
        bar = tqdm(total=len(modules), unit="matrix", disable=quiet, dynamic_ncols=True)
    started = time.perf_counter()
    configs_done = 0
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(_read, run, batches[0])
        for index, batch in enumerate(batches):
            weights, digests = pending.result()
            if index + 1 < len(batches):
                pending = reader.submit(_read, run, batches[index + 1])
            results.update(_measure(run, batch, weights, digests, statistics))
            configs_done += len(batch) * len(run.grid)
            bar.set_postfix_str(f"{configs_done / (time.perf_counter() - started):.2f} configs/s")
            bar.update(len(batch))
            del weights
            release_freed_memory()
    if own_bar:
        bar.close()
    return results


def _read(run: _Run, batch: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The weights of ``batch`` stacked (on the run's GPU), every stored byte hashed as it is read."""
    start = time.perf_counter()
    pairs = [run.source.read_with_digest(m) for m in batch]
    weights = torch.stack([weight for weight, _ in pairs])
    if run.device.type == "cuda":
        weights = weights.pin_memory().to(run.device, non_blocking=True)
    run.timings["read"] = run.timings.get("read", 0.0) + time.perf_counter() - start
    return weights, [digest for _, digest in pairs]


def _measure(run: _Run, batch: list[str], weights: torch.Tensor, digests: list[str], statistics) -> dict:
    """Every config of the grid on the same-shaped matrices ``batch``; their logged records."""
    rows: dict[str, list[dict]] = {m: [] for m in batch}
    weighting = IDENTITY
    if statistics is not None:
        stacked = torch.stack([statistics[m] for m in batch])
        # prepared once for every config (a whitened weighting's factor: one Cholesky per matrix)
        weighting = run.objective.weighting(stacked, run.damping).for_configs(run.device)
        del stacked
    shape = tuple(weights.shape[1:])
    for config in run.grid:
        if not config.fits(shape):  # not a candidate for this shape (a ggml block that splits the row)
            continue
        outcome = _loftq_fitting(run, weights, batch, config, weighting)
        for module, result in zip(batch, outcome):
            rows[module].append(_row(module, shape, config, result, run))
    results = {}
    for module, digest in zip(batch, digests):
        if rows[module] and rows[module][0]["weight_norm_sq"] == 0.0:
            warnings.warn(f"{module} is all zeros: its error is 0 for every config", stacklevel=3)
        record = {"module": module, "rows": rows[module], "digest": digest}
        if run.store is not None:
            run.store.append(run.dist.rank, record)
        results[module] = record
    return results


def _loftq_fitting(run: _Run, weights, batch: list[str], config: QuantConfig, weighting: Weighting) -> list:
    """`decompose` for ``batch`` (names of ``weights``' matrices); when the GPU runs out of
    memory, the batch again in halves, down to one matrix. A single matrix that does not fit
    stops the run with one line: the matrices already finished are kept for a resume."""
    device = run.device
    try:
        return decompose(weights, batch, run.assignment(config), weighting, keep_q=False, device=device,
                         timings=run.timings)  # fmt: skip
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) == 1:
            shape = "x".join(map(str, weights.shape[1:]))
            raise BitallocError(
                f"{device} ran out of memory on {batch[0]} ({shape}, {config}): finished matrices are "
                "kept when profiling to a file; run the same command again to resume, on a GPU with more "
                "free memory or with --device cpu"
            ) from None
    half = len(batch) // 2
    results = []
    for part in (slice(0, half), slice(half, len(batch))):
        results += _loftq_fitting(run, weights[part], batch[part], config, weighting.select(part))
    return results


def _row(module: str, shape: tuple[int, int], config: QuantConfig, result, run: _Run) -> dict:
    settings = run.settings
    row = {
        "module": module,
        "shape": f"{shape[0]}x{shape[1]}",
        "numel": shape[0] * shape[1],
        "config": str(config),
        "method": config.method,
        "bits": config.bits,
        "block_size": config.block_size,
        "bits_per_param": config.bits_per_param,
        "storage_bits": config.storage_bits(shape),
        "error": result.error,
        "rel_error": result.rel_error,
        "qlora_error": result.qlora_error,
        "weight_norm_sq": result.weight_norm_sq,
        "best_iter": result.best_iter,
        "rank": settings["rank"],
        "iters": settings["iters"],
    }
    if result.weighted_error is not None:
        row[run.objective.column] = result.weighted_error
    return row


def _assemble(modules: list[str], records: dict[str, dict], meta: ProfileMetadata) -> pd.DataFrame:
    missing = [m for m in modules if m not in records]
    if missing:
        raise BitallocError(f"profile incomplete: {len(missing)} matrices missing, e.g. {missing[0]}")
    table = pd.DataFrame([row for m in modules for row in records[m]["rows"]])
    digests = {m: records[m].get("digest") for m in modules}
    if all(digests.values()):
        meta = dataclasses.replace(meta, tensor_digests=digests, content_digest=combine_digests(digests))
    table.attrs.update(meta.to_attrs())
    return table
