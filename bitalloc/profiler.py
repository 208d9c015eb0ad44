"""Profile: run LoftQ for every selected matrix x every candidate config, one row each.

Streaming (one matrix, or one batch of same-shaped matrices on a GPU, in memory at a
time, the next read overlapping the current compute), resumable (each matrix's rows are
appended to a side log in ``OUT.partial/`` as soon as they are done; the Parquet table
is written atomically at the end) and parallel under torchrun (matrices split across
ranks by estimated cost; rank 0 merges). Randomized steps are seeded from
(module, config), so single, resumed and parallel runs give the same table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import torch

from .calibration import DEFAULT_TOKENS, calibration_settings, prepare_calibration, resolve_objective
from .decomposition import loftq_batch
from .errors import BitallocError
from .fileio import atomic_path
from .quant import QuantConfig
from .sources import Source, open_source

PROFILE_FORMAT = "bitalloc.profile/v1"
METADATA_KEY = b"bitalloc"
DEFAULT_METHODS = ("nf",)
DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_BLOCK_SIZES = (32, 64, 128)
DEFAULT_SCALES = ("8b256",)
REQUIRED_COLUMNS = (
    "module", "shape", "numel", "config", "method", "bits", "block_size", "bits_per_param",
    "storage_bits", "error", "rel_error", "qlora_error", "rank", "iters",
)  # fmt: skip
# GPU batches of same-shaped matrices stay under this many elements (fp32: 4 bytes each,
# LoftQ holds about six copies)
CUDA_BATCH_ELEMENTS = 1 << 27


def config_grid(
    bits: Iterable[int] = DEFAULT_BITS,
    block_sizes: Iterable[int] = DEFAULT_BLOCK_SIZES,
    methods: Iterable[str] = DEFAULT_METHODS,
    scales: Iterable[str] = DEFAULT_SCALES,
) -> list[QuantConfig]:
    """Every combination, e.g. scales ``8b256`` (quantized) or ``fp16``; a leading 's' is ok."""
    grid = []
    for method in methods:
        for b in bits:
            for block in block_sizes:
                for scale in scales:
                    scale = str(scale).removeprefix("s")
                    grid.append(QuantConfig.parse(f"{method}{b}-b{block}-s{scale}"))
    if not grid:
        raise BitallocError("the config grid is empty: give at least one bits, block size and scale")
    return sorted(set(grid), key=lambda c: (c.method, c.bits, c.block_size, str(c)))


def module_seed(module: str, config: QuantConfig | str) -> int:
    """The seed of a matrix's randomized steps: fixed by (module, config), nothing else."""
    digest = hashlib.sha256(f"{module}|{config}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


def profile(
    model: str | os.PathLike | torch.nn.Module | Source | None = None,
    output: str | os.PathLike | None = None,
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    block_sizes: Sequence[int] = DEFAULT_BLOCK_SIZES,
    methods: Sequence[str] = DEFAULT_METHODS,
    scales: Sequence[str] = DEFAULT_SCALES,
    configs: Sequence[str | QuantConfig] | None = None,
    rank: int = 16,
    iters: int = 5,
    lowrank: str = "randomized",
    device: str = "auto",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    stats: dict | None = None,
    objective: str | None = None,
    calibration: str | os.PathLike | None = None,
    calibration_tokens: int = DEFAULT_TOKENS,
    calibration_ids: torch.Tensor | None = None,
    column_weights: dict[str, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Profile ``model`` (a path, an nn.Module, a Source, or None for the demo model).

    With ``output`` the table is also written there as Parquet, and an interrupted run
    resumes where it stopped. ``stats``, if given, receives read/quantize/factorize times.

    Data-aware (``objective="activation"``, implied by any calibration argument; "auto":
    whenever the model can be run): h = per-input-channel activation second moments over
    ``calibration_tokens`` of ``calibration`` (a text file, or "default"/None: the built-in
    text), or over ``calibration_ids``, or given as ``column_weights`` {module: h}; every
    decomposition then minimizes the weighted error, reported as ``weighted_error``, and h
    is saved beside ``output`` (see `bitalloc.calibration`).
    """
    grid = (
        [QuantConfig.parse(c) for c in configs]
        if configs
        else config_grid(bits, block_sizes, methods, scales)
    )
    if rank < 0 or iters < 0:
        raise BitallocError(f"rank and iters must be >= 0, got rank={rank}, iters={iters}")
    source = open_source(model, include, exclude)
    dist = _Distributed.from_env(device)
    if dist.world > 1 and output is None:
        raise BitallocError("a torchrun profile needs an output file (-o) to merge the ranks into")
    device = dist.device or resolve_device(device)
    settings = {
        "configs": [str(c) for c in grid], "rank": rank, "iters": iters, "lowrank": lowrank,
    }  # fmt: skip
    meta = {
        "format": PROFILE_FORMAT,
        "source": source.name,
        "fingerprint": source.fingerprint(),
        "content_digest": source.content_digest(),
        "objective": "weight",
        "settings": settings,
        "modules": len(source.modules()),
    }
    objective = resolve_objective(model, objective, calibration, calibration_ids, column_weights)
    if objective != "weight":
        settings["calibration"] = calibration_settings(
            calibration, calibration_tokens, calibration_ids, column_weights
        )
        meta["objective"] = objective
    for module in source.modules():
        if rank > min(source.shape(module)):
            raise BitallocError(f"rank {rank} exceeds the size of {module} {source.shape(module)}")
    store = _ProfileStore(output, meta, overwrite) if output is not None else None
    if store is not None:
        finished = dist.first(store.prepare)
        if finished is not None:
            if not quiet and dist.rank == 0:
                print(f"profile {output} is up to date ({len(finished)} rows)")
            return finished
    weights_by_module = None
    if objective != "weight":
        start = time.perf_counter()
        shapes = {m: source.shape(m) for m in source.modules()}
        identity = {k: meta[k] for k in ("fingerprint", "content_digest")}
        calibrated = dist.first(
            lambda: prepare_calibration(
                model, shapes, output, identity, text=calibration, tokens=calibration_tokens,
                input_ids=calibration_ids, column_weights=column_weights, quiet=quiet,
            )
        )  # fmt: skip
        meta["calibration"] = calibrated.info
        weights_by_module = calibrated.column_weights
        if stats is not None:
            stats["calibration"] = stats.get("calibration", 0.0) + time.perf_counter() - start
    done = store.done_modules() if store is not None else {}
    todo = [m for m in source.modules() if m not in done]
    mine = split_by_cost(todo, source, len(grid), dist.world)[dist.rank]
    timings = stats if stats is not None else {}
    new_rows = _run(source, mine, grid, settings, device, store, dist.rank, quiet, timings, weights_by_module)
    dist.barrier()  # every rank's matrices are in the logs
    table = None
    if dist.rank == 0:
        rows = store.done_modules() if store is not None else new_rows
        table = _assemble(source.modules(), rows, meta)
        if store is not None:
            store.finish(table)
    dist.barrier()
    return table if table is not None else read_profile(output)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' is CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise BitallocError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BitallocError(f"device {device} requested but CUDA is not available")
    return resolved


def split_by_cost(modules: list[str], source: Source, n_configs: int, world: int) -> list[list[str]]:
    """Split matrices across ``world`` ranks, largest first to the least-loaded rank (LPT)."""
    loads = [0] * world
    parts: list[list[str]] = [[] for _ in range(world)]
    by_cost = sorted(modules, key=lambda m: (-math.prod(source.shape(m)), m))
    for module in by_cost:
        target = loads.index(min(loads))
        parts[target].append(module)
        loads[target] += math.prod(source.shape(module)) * n_configs
    order = {m: i for i, m in enumerate(modules)}
    return [sorted(part, key=order.get) for part in parts]


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


def _run(source, modules, grid, settings, device, store, rank, quiet, timings, column_weights=None):
    from tqdm.auto import tqdm

    results: dict[str, list[dict]] = {}
    batches = _batches(modules, source, device)
    if not batches:
        return results

    def read(batch: list[str]) -> torch.Tensor:
        start = time.perf_counter()
        weights = torch.stack([source.read(m) for m in batch])
        if device.type == "cuda":
            weights = weights.pin_memory().to(device, non_blocking=True)
        timings["read"] = timings.get("read", 0.0) + time.perf_counter() - start
        return weights

    bar = tqdm(total=len(modules), unit="matrix", disable=quiet or rank != 0, dynamic_ncols=True)
    started = time.perf_counter()
    configs_done = 0
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, batches[0])
        for index, batch in enumerate(batches):
            weights = pending.result()
            if index + 1 < len(batches):
                pending = reader.submit(read, batches[index + 1])
            rows = {m: [] for m in batch}
            h = torch.stack([column_weights[m] for m in batch]) if column_weights is not None else None
            for config in grid:
                seeds = [module_seed(m, config) for m in batch]
                outcome = loftq_batch(
                    weights, config, settings["rank"], settings["iters"], lowrank=settings["lowrank"],
                    seeds=seeds, column_weights=h, keep_q=False, device=device, timings=timings,
                )  # fmt: skip
                for module, result in zip(batch, outcome):
                    rows[module].append(_row(module, tuple(weights.shape[1:]), config, result, settings))
            for module in batch:
                if store is not None:
                    store.append(rank, module, rows[module])
                results[module] = rows[module]
            configs_done += len(batch) * len(grid)
            bar.set_postfix_str(f"{configs_done / (time.perf_counter() - started):.2f} configs/s")
            bar.update(len(batch))
            del weights
    bar.close()
    return results


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


def _assemble(modules: list[str], rows: dict[str, list[dict]], meta: dict) -> pd.DataFrame:
    missing = [m for m in modules if m not in rows]
    if missing:
        raise BitallocError(f"profile incomplete: {len(missing)} matrices missing, e.g. {missing[0]}")
    table = pd.DataFrame([row for m in modules for row in rows[m]])
    table.attrs.update(meta)
    return table


# ---- reading and writing tables --------------------------------------------------------


def write_profile(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Parquet (or CSV by extension) with the metadata in the file; atomic."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as temp:
        if str(path).endswith(".csv"):
            table.to_csv(temp, index=False)
            return
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        metadata = dict(arrow.schema.metadata or {})
        metadata[METADATA_KEY] = json.dumps(dict(table.attrs), sort_keys=True).encode()
        pq.write_table(arrow.replace_schema_metadata(metadata), temp)


def read_profile(path: str | os.PathLike) -> pd.DataFrame:
    """A profile table from Parquet (metadata in ``.attrs``) or CSV; BitallocError if unusable."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise BitallocError(f"profile not found: {path}")
    try:
        if path.suffix == ".csv":
            table = pd.read_csv(path)
        else:
            arrow = pq.read_table(path)
            table = arrow.to_pandas()
            raw = (arrow.schema.metadata or {}).get(METADATA_KEY)
            table.attrs.update(json.loads(raw) if raw else {})
    except Exception as exc:  # pyarrow/pandas raise many types for a bad file
        raise BitallocError(f"{path} is not a readable profile table ({type(exc).__name__})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise BitallocError(f"{path} is not a bitalloc profile: missing columns {', '.join(missing)}")
    return table


class _ProfileStore:
    """The output table plus its side log ``OUT.partial/`` (header + one JSONL per rank)."""

    def __init__(self, output: str | os.PathLike, meta: dict, overwrite: bool):
        self.output = Path(output)
        self.partial = Path(f"{output}.partial")
        self.meta = meta
        self.overwrite = overwrite

    def _identity(self, meta: dict) -> dict:
        return {k: meta.get(k) for k in ("format", "fingerprint", "content_digest", "settings")}

    def _mismatch(self, other: dict, what: str) -> None:
        mine = self._identity(self.meta)
        theirs = self._identity(other)
        if theirs["fingerprint"] != mine["fingerprint"]:
            reason = f"a profile of another model ({other.get('source')})"
        elif theirs["content_digest"] != mine["content_digest"]:
            reason = "a profile of other weights with the same shapes"
        elif theirs != mine:
            other = theirs["settings"] or {}
            changed = sorted(
                k for k in {*mine["settings"], *other} if mine["settings"].get(k) != other.get(k)
            )
            reason = f"a profile with other settings ({', '.join(changed) or 'format'})"
        else:
            return
        raise BitallocError(f"{what} holds {reason}: refusing to mix them; use another output or --overwrite")

    def prepare(self) -> pd.DataFrame | None:
        """Check or create the side log; return the finished table if it is up to date."""
        if self.output.exists():
            try:
                existing = read_profile(self.output)
            except BitallocError:
                if not self.overwrite:
                    raise BitallocError(
                        f"{self.output} exists and is not a bitalloc profile: not overwriting it"
                    ) from None
                existing = None
            if existing is not None and not self.overwrite:
                self._mismatch(existing.attrs, str(self.output))
                return existing
        header = self.partial / "header.json"
        if header.exists() and not self.overwrite:
            try:
                other = json.loads(header.read_text())
            except json.JSONDecodeError:
                raise BitallocError(f"{header} is corrupt: delete {self.partial} to start over") from None
            self._mismatch(other, str(self.partial))
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            with atomic_path(header) as temp:
                temp.write_text(json.dumps(self.meta, sort_keys=True, indent=1))
        return None

    def done_modules(self) -> dict[str, list[dict]]:
        done: dict[str, list[dict]] = {}
        for log in sorted(self.partial.glob("rank-*.jsonl")):
            with open(log, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a line cut short by a kill: that matrix is redone
                    done[record["module"]] = record["rows"]
        return done

    def append(self, rank: int, module: str, rows: list[dict]) -> None:
        log = self.partial / f"rank-{rank}.jsonl"
        self._truncate_partial_line(log)
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"module": module, "rows": rows}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    @staticmethod
    def _truncate_partial_line(log: Path) -> None:
        """After a kill mid-write the log may end without a newline: drop that fragment."""
        if not log.exists() or log.stat().st_size == 0:
            return
        data = log.read_bytes()
        if not data.endswith(b"\n"):
            with open(log, "rb+") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def finish(self, table: pd.DataFrame) -> None:
        write_profile(table, self.output)
        shutil.rmtree(self.partial, ignore_errors=True)


class _Distributed:
    """torchrun detection (RANK in the environment); the single-process path needs nothing."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world, self.device = rank, world, device

    @classmethod
    def from_env(cls, device: str) -> _Distributed:
        if int(os.environ.get("RANK", -1)) == -1:
            return cls()
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and str(device) != "cpu"
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", 0))
        chosen = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(chosen)
        return cls(dist.get_rank(), dist.get_world_size(), chosen)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def first(self, fn):
        """Run ``fn`` on rank 0, then share its result (or its error) with every rank."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except BitallocError as exc:
                box[0] = ("error", str(exc))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise BitallocError(value)
        return value
