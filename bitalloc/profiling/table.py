"""The profile table on disk: Parquet (metadata in the file) or CSV, and the resume log.

Both formats keep the metadata (settings, objective, fingerprint, calibration record): in
Parquet's schema metadata, and in a CSV as its first line, ``# bitalloc: {json}``, before
the header row. A CSV without that line (written by hand, or by an older bitalloc) reads
with no metadata, and is refused when it holds data-aware columns that would otherwise be
planned as weight-only.

``OUT.partial/`` holds a header (what the profile is of) and one JSONL log per rank, a
line per finished matrix, fsynced; the Parquet table is written atomically at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ..errors import BitallocError, check_path
from ..fileio import WorkFolder, atomic_path, check_output
from .metadata import DIGEST_FORMAT, PROFILE_FORMAT, PROFILE_FORMATS, ProfileMetadata

__all__ = [
    "DIGEST_FORMAT", "PROFILE_FORMAT", "PROFILE_FORMATS", "REQUIRED_COLUMNS", "ProfileMetadata",
    "ProfileStore", "profile_metadata", "read_profile", "write_profile",
]  # fmt: skip

METADATA_KEY = b"bitalloc"
CSV_METADATA = "# bitalloc: "  # a CSV profile's first line: its metadata as one line of JSON
REQUIRED_COLUMNS = (
    "module", "shape", "numel", "config", "method", "bits", "block_size", "bits_per_param",
    "storage_bits", "error", "rel_error", "qlora_error", "rank", "iters",
)  # fmt: skip


def write_profile(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Parquet (or CSV by extension) with the metadata in the file; atomic. The metadata is
    checked first (`ProfileMetadata`): nothing is written that `read_profile` would refuse."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    attrs = profile_metadata(table).to_attrs()
    with atomic_path(path) as temp:
        if str(path).endswith(".csv"):
            with open(temp, "w", encoding="utf-8", newline="") as handle:
                meta = json.dumps(attrs, sort_keys=True, allow_nan=False)
                handle.write(f"{CSV_METADATA}{meta}\n")
                table.to_csv(handle, index=False)
            return
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        metadata = dict(arrow.schema.metadata or {})
        metadata[METADATA_KEY] = json.dumps(attrs, sort_keys=True, allow_nan=False).encode()
        pq.write_table(arrow.replace_schema_metadata(metadata), temp)


def read_profile(path: str | os.PathLike) -> pd.DataFrame:
    """A profile table from Parquet (metadata in ``.attrs``) or CSV; BitallocError if unusable."""
    import pyarrow.parquet as pq

    check_path(path, "profile path")
    path = Path(path)
    if not path.is_file():
        raise BitallocError(f"profile not found: {path}")
    try:
        if path.suffix == ".csv":
            table = _read_csv(path)
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
    meta = ProfileMetadata.from_attrs(table.attrs)
    if "weighted_error" in table.columns and not meta.objective:
        raise BitallocError(
            f"{path} holds data-aware errors (weighted_error) but no metadata saying how they were "
            "measured (a CSV from an older bitalloc?): profile again, or write Parquet"
        )
    table.attrs = meta.to_attrs()
    return table


def profile_metadata(table: pd.DataFrame) -> ProfileMetadata:
    """The typed metadata of a profile table (its ``.attrs``, checked)."""
    return ProfileMetadata.from_attrs(dict(table.attrs))


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV profile and, when its first line is ``# bitalloc: {json}``, its metadata."""
    with open(path, encoding="utf-8", newline="") as handle:
        first = handle.readline()
        attrs = {}
        if first.startswith(CSV_METADATA):
            attrs = json.loads(first[len(CSV_METADATA) :])
            if not isinstance(attrs, dict):
                raise ValueError("metadata line is not a JSON object")
        else:
            handle.seek(0)
        table = pd.read_csv(handle)
    table.attrs.update(attrs)
    return table


_REDO = "use another output, or --overwrite to profile again"


class ProfileStore:
    """The output table plus its side log ``OUT.partial/`` (header + one JSONL per rank)."""

    def __init__(
        self, output: str | os.PathLike, meta: ProfileMetadata | dict, overwrite: bool, inputs: tuple = ()
    ):
        self.output = Path(output)
        check_output(self.output, inputs)
        self.work = WorkFolder(f"{output}.partial", legacy=("header.json",))
        self.partial = self.work.path
        self.meta = meta if isinstance(meta, ProfileMetadata) else ProfileMetadata.from_attrs(meta)
        self.overwrite = overwrite

    def _mismatch(self, other: ProfileMetadata, what: str) -> None:
        mine, theirs = self.meta.identity(), other.identity()
        if theirs["fingerprint"] != mine["fingerprint"]:
            selection = other.selection if other.selection is not None else self.meta.selection
            if selection != self.meta.selection:
                reason = "a profile of other matrices (other --include/--exclude)"
            else:
                reason = f"a profile of another model ({other.source})"
        elif theirs != mine:
            ours, other_settings = mine["settings"] or {}, theirs["settings"] or {}
            changed = sorted(k for k in {*ours, *other_settings} if ours.get(k) != other_settings.get(k))
            reason = f"a profile with other settings ({', '.join(changed) or 'format'})"
        else:
            return
        raise BitallocError(f"{what} holds {reason}: refusing to mix them; use another output or --overwrite")

    def check_weights(
        self, source, records: dict[str, dict] | None, verify: bool, meta: ProfileMetadata | None = None
    ) -> None:
        """BitallocError unless the weights behind ``records`` (finished matrices, or a whole
        table's ``meta``) are the weights ``source`` holds now (see `Source.changed_modules`)."""
        meta = meta if meta is not None else self._header()
        where = str(self.output if records is None else self.partial)
        if meta.digest_format != DIGEST_FORMAT:  # an older bitalloc's sampled digest
            if meta.content_digest not in (None, source.legacy_content_digest()):
                raise BitallocError(f"{where} was made from other weights with the same shapes: {_REDO}")
            return
        digests = meta.tensor_digests if records is None else {
            m: r.get("digest") for m, r in records.items()
        }  # fmt: skip
        changed = source.changed_modules(digests or {}, meta.file_stats or {}, verify)
        if changed:
            raise BitallocError(
                f"{where} was made from other weights: {changed[0]} changed "
                f"({len(changed)} matrices): {_REDO}"
            )

    def prepare(self, source=None, verify: bool = False) -> pd.DataFrame | None:
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
                meta = profile_metadata(existing)
                self._mismatch(meta, str(self.output))
                if source is not None:
                    self.check_weights(source, None, verify, meta)
                return existing
        self.work.open()
        header = self.partial / "header.json"
        if header.exists() and not self.overwrite:
            self._mismatch(self._header(), str(self.partial))
        else:
            self.work.clear()
            with atomic_path(header) as temp:
                temp.write_text(json.dumps(self.meta.to_attrs(), sort_keys=True, indent=1))
        return None

    def _header(self) -> ProfileMetadata:
        """The metadata of the run the side log belongs to (``OUT.partial/header.json``)."""
        header = self.partial / "header.json"
        try:
            return ProfileMetadata.from_attrs(json.loads(header.read_text()))
        except (ValueError, BitallocError):
            raise BitallocError(f"{header} is corrupt: delete {self.partial} to start over") from None

    def done_modules(self) -> dict[str, dict]:
        """Finished matrices: module -> record (rows, digest of the weights they measured)."""
        done: dict[str, dict] = {}
        for log in sorted(self.partial.glob("rank-*.jsonl")):
            with open(log, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        if not line.endswith("\n"):
                            break  # a line cut short by a kill: that matrix is redone
                        record = None
                    if not _is_record(record):
                        raise BitallocError(
                            f"{log} line {number} is not a profile record: "
                            f"delete {self.partial} to start over"
                        )
                    done[record["module"]] = record
        return done

    def append(self, rank: int, record: dict) -> None:
        log = self.partial / f"rank-{rank}.jsonl"
        self._truncate_partial_line(log)
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
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
        self.work.remove()

    def close(self) -> None:
        self.work.close()


def _is_record(record: object) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("module"), str)
        and isinstance(record.get("rows"), list)
        and all(isinstance(row, dict) for row in record["rows"])
    )
