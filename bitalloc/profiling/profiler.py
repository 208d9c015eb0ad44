"""Profile: run LoftQ for every selected matrix x every candidate config, one row each.

Streaming (one matrix, or one batch of same-shaped matrices on a GPU, in memory at a
time, the next read overlapping the current compute), resumable (each matrix's rows are
appended to a side log in ``OUT.partial/`` as soon as they are done; the Parquet table
is written atomically at the end) and parallel under torchrun (matrices split across
ranks by estimated cost; rank 0 merges). Randomized steps are seeded from
(module, config), so single, resumed and parallel runs give the same table.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import torch

from ..checkpoints import Source, open_source
from ..checkpoints.base import combine_digests
from ..checkpoints.runnable import runnable
from ..devices import resolve_device
from ..errors import BitallocError
from ..fileio import check_output
from ..lora import loftq_batch, module_seed
from ..lora.decomposition import check_rank, whitening_factor
from ..quant import QuantConfig
from .calibration import calibration_settings, calibrator_for, check_given, given_digest, resolve_objective
from .distributed import Distributed, split_by_cost
from .layer_weights import layer_weights_path, layer_weights_spec, prepare_layer_weights
from .settings import MAX_ITERS, CalibrationSettings, ProfileSettings, build_settings
from .table import DIGEST_FORMAT, ProfileMetadata, ProfileStore, read_profile

# GPU batches of same-shaped matrices stay under this many elements (fp32: 4 bytes each,
# LoftQ holds about six copies)
CUDA_BATCH_ELEMENTS = 1 << 27


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
    profile_settings = {
        "configs": [str(c) for c in grid], "rank": rank, "iters": iters, "lowrank": settings.lowrank,
    }  # fmt: skip
    meta = ProfileMetadata(
        source=source.name, fingerprint=source.fingerprint(), digest_format=DIGEST_FORMAT,
        file_stats=source.file_stats(), objective="weight", settings=profile_settings,
        modules=len(source.modules()),
        selection={"include": _listed(settings.include), "exclude": _listed(settings.exclude)},
    )  # fmt: skip
    objective = resolve_objective(model, calibration)
    if objective != "weight":
        meta.settings["calibration"] = calibration_settings(calibration, objective)
        meta.objective = objective
        if calibration.column_weights is None and not isinstance(model, torch.nn.Module):
            with runnable(model):  # the model can be built from its config: before any work
                pass
    if objective == "output":
        meta.settings["damping"] = float(calibration.damping)
    if calibration.layer_weights:
        if objective == "weight":
            raise BitallocError(
                "layer weights need a data-aware objective (activation or output), not 'weight'"
            )
        meta.settings["layer_weights"] = layer_weights_spec(calibration, grid)
    for module in source.modules():
        if rank > min(source.shape(module)):
            raise BitallocError(f"rank {rank} exceeds the size of {module} {source.shape(module)}")
    inputs = (*source.input_files(), calibration.text)
    store = ProfileStore(output, meta, overwrite, inputs) if output is not None else None
    if output is not None:
        check_output(layer_weights_path(output), inputs)
    try:
        return _profile(model, output, source, grid, meta, objective, calibration, store, dist, device,
                        quiet, stats, verify)  # fmt: skip
    finally:
        if store is not None:
            store.close()


def _listed(patterns) -> list[str] | None:
    return None if patterns is None else list(patterns)


def _profile(model, output, source, grid, meta, objective, calibration, store, dist, device, quiet, stats,
             verify):  # fmt: skip
    """The run itself (profile's arguments checked and its output folder claimed)."""
    profile_settings = meta.settings
    if store is not None:
        finished = dist.first(lambda: store.prepare(source, verify))
        if finished is not None:
            if not quiet and dist.rank == 0:
                print(f"profile {output} is up to date ({len(finished)} rows)")
            return finished
    given, calibrator = None, None
    if objective != "weight":
        start = time.perf_counter()
        shapes = {m: source.shape(m) for m in source.modules()}
        if calibration.column_weights is not None:
            given = check_given(calibration.column_weights, shapes)
            meta.calibration = {"text": "column_weights", "digest": given_digest(given)}
        else:  # every rank tokenizes and runs the calibration itself: nothing to share
            calibrator = calibrator_for(model, calibration, objective)
            meta.calibration = dict(calibrator.record)
        if objective == "output":
            meta.calibration["lambda"] = float(calibration.damping)
        if calibration.layer_weights:
            identity = {
                "fingerprint": meta.fingerprint,
                "weights": meta.file_stats or source.content_digest(),
            }
            meta.layer_weights = dist.first(
                lambda: prepare_layer_weights(
                    model, source, source.modules(), output, identity, calibration, grid, quiet=quiet
                )
            )
        if stats is not None:
            stats["calibration"] = stats.get("calibration", 0.0) + time.perf_counter() - start
    timings = stats if stats is not None else {}

    def work():
        done = store.done_modules() if store is not None else {}
        if store is not None:
            store.check_weights(source, done, verify)
        todo = [m for m in source.modules() if m not in done]
        if calibrator is None:
            mine = split_by_cost(todo, source, len(grid), dist.world)[dist.rank]
            return _run(source, mine, grid, profile_settings, device, store, dist.rank, quiet, timings, given)
        return _run_by_block(source, todo, grid, profile_settings, device, store, dist, quiet, timings,
                             model, calibrator, float(calibration.damping))  # fmt: skip

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


def _run_by_block(source, todo, grid, settings, device, store, dist, quiet, timings, model, calibrator,
                  damping):  # fmt: skip
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
        mine += split_by_cost(names, source, len(grid), dist.world)[dist.rank]
    results: dict[str, dict] = {}
    bar = tqdm(total=len(mine), unit="matrix", disable=quiet or dist.rank != 0, dynamic_ncols=True)

    def consume(names: list[str], statistics: dict[str, torch.Tensor]) -> None:
        results.update(_run(source, names, grid, settings, device, store, dist.rank, True, timings,
                            statistics, damping=damping, bar=bar))  # fmt: skip

    try:
        calibrator.stream(model, mine, consume, timings=timings)
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


def _run(source, modules, grid, settings, device, store, rank, quiet, timings, column_weights=None, *,
         damping: float = 0.0, bar=None):  # fmt: skip
    """Profile ``modules``; ``column_weights``: their h (1-D) or H (2-D) by module, or None."""
    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    batches = _batches(modules, source, device)
    if not batches:
        return results
    own_bar = bar is None

    def read(batch: list[str]) -> tuple[torch.Tensor, list[str]]:
        start = time.perf_counter()
        pairs = [source.read_with_digest(m) for m in batch]  # every stored byte hashed as it is read
        weights = torch.stack([weight for weight, _ in pairs])
        if device.type == "cuda":
            weights = weights.pin_memory().to(device, non_blocking=True)
        timings["read"] = timings.get("read", 0.0) + time.perf_counter() - start
        return weights, [digest for _, digest in pairs]

    if own_bar:
        bar = tqdm(total=len(modules), unit="matrix", disable=quiet or rank != 0, dynamic_ncols=True)
    started = time.perf_counter()
    configs_done = 0
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, batches[0])
        for index, batch in enumerate(batches):
            weights, digests = pending.result()
            if index + 1 < len(batches):
                pending = reader.submit(read, batches[index + 1])
            rows = {m: [] for m in batch}
            weighting = {}
            if column_weights is not None and column_weights[batch[0]].dim() == 2:
                h = torch.stack([column_weights[m] for m in batch]).to(device)
                # factored once for every config (loftq_batch would do the same per call)
                weighting = {"whitening": whitening_factor(h, damping).to(torch.float32)}
                del h
            elif column_weights is not None:
                weighting = {"column_weights": torch.stack([column_weights[m] for m in batch])}
            for config in grid:
                outcome = _loftq_fitting(weights, batch, config, settings, device, timings, weighting)
                for module, result in zip(batch, outcome):
                    rows[module].append(_row(module, tuple(weights.shape[1:]), config, result, settings))
            for module, digest in zip(batch, digests):
                if rows[module] and rows[module][0]["weight_norm_sq"] == 0.0:
                    warnings.warn(f"{module} is all zeros: its error is 0 for every config", stacklevel=2)
                record = {"module": module, "rows": rows[module], "digest": digest}
                if store is not None:
                    store.append(rank, record)
                results[module] = record
            configs_done += len(batch) * len(grid)
            bar.set_postfix_str(f"{configs_done / (time.perf_counter() - started):.2f} configs/s")
            bar.update(len(batch))
            del weights
            release_freed_memory()
    if own_bar:
        bar.close()
    return results


def _loftq_fitting(weights, batch, config, settings, device, timings, weighting) -> list:
    """`loftq_batch` for ``batch`` (names of ``weights``' matrices); when the GPU runs out of
    memory, the batch again in halves, down to one matrix. A single matrix that does not fit
    stops the run with one line: the matrices already finished are kept for a resume."""
    try:
        return loftq_batch(
            weights, config, settings["rank"], settings["iters"], lowrank=settings["lowrank"],
            seeds=[module_seed(m, config) for m in batch], keep_q=False, device=device,
            timings=timings, **weighting,
        )  # fmt: skip
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
        halved = {key: value[part] for key, value in weighting.items()}
        results += _loftq_fitting(weights[part], batch[part], config, settings, device, timings, halved)
    return results


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc): without it, the fragments of each
    matrix's temporaries pile up and peak RSS grows with the number of layers."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _row(module: str, shape: tuple[int, int], config: QuantConfig, result, settings: dict) -> dict:
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
        row["weighted_error"] = result.weighted_error
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
