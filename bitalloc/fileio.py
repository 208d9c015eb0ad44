"""Writing files so that a failed run never damages earlier output."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import BitallocError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    target = check_output(path)  # a symlink's target is written, the link kept
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        # mkstemp makes 0600 files: keep an existing file's mode, else the usual 0644
        os.chmod(temp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        yield Path(temp)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, then rename)."""
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, with its I/O failures (a full disk, a quota, a read-only
    folder) raised as the OSError they are: safetensors reports them as a SafetensorError
    carrying only the OS error's text, which would otherwise escape as a traceback."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, os.fspath(path), metadata=metadata)
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None and "I/O error" not in str(exc):
            raise
        code = int(found.group(1)) if found else 5  # EIO
        raise OSError(code, os.strerror(code), os.fspath(path)) from None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def input_files(paths: Iterable[str | os.PathLike | None]) -> set[tuple[int, int]]:
    """(device, inode) of every input file: a file itself, or every file in a folder (an
    applied folder's parts), symlinks followed. A model counts as the files its reader
    reads (`bitalloc.checkpoints.model_input_files`), not its whole folder, so that outputs
    bitalloc wrote into a model folder earlier never block the next run."""
    found = set()
    for path in paths:
        if path is None or not isinstance(path, (str, os.PathLike)):
            continue
        path = Path(path)
        files = [path] if not path.is_dir() else [f for f in path.rglob("*") if f.is_file()]
        found.update(ident for ident in map(_identity, files) if ident is not None)
    return found


def check_name(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` as a Path; BitallocError when its name is not valid UTF-8 (bytes Python keeps
    as surrogate escapes): such a name cannot be recorded in JSON or Parquet metadata, so it
    is refused before any work rather than after it."""
    text = os.fspath(path)
    text = os.fsdecode(text) if isinstance(text, bytes) else text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise BitallocError(f"{what} name {shown} is not valid UTF-8: choose a UTF-8 name") from None
    return Path(text)


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The real file an output path names (symlinks followed); BitallocError when it is one
    of the command's inputs, exists and is not a regular file (a folder, FIFO, device), or
    its name is not UTF-8 (`check_name`)."""
    check_name(path)
    target = Path(path).resolve()
    if target.exists() or target.is_symlink():
        mode = target.stat().st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise BitallocError(f"output {path} is {kind}: give a file path")
        if _identity(target) in input_files(inputs):
            raise BitallocError(f"output {path} is an input of this command: refusing to overwrite it")
    if target.parent.exists() and not target.parent.is_dir():
        raise BitallocError(f"output {path}: {target.parent} is not a folder")
    return target


class WorkFolder:
    """A folder bitalloc made for resumable work (``OUT.partial/``): marked, locked while in
    use, and never adopted or deleted unless it carries the mark (or an older bitalloc's
    ``legacy`` file), so a user's folder of the same name is never touched."""

    MARKER = ".bitalloc-work"

    def __init__(self, path: str | os.PathLike, legacy: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.legacy = legacy
        self._lock = None

    def open(self) -> WorkFolder:
        """Create (atomically) or adopt the folder, and lock it; BitallocError when it is not
        bitalloc's or another process holds it."""
        check_name(self.path)
        self.sweep(self.path)
        if not self.path.exists() and not self.path.is_symlink():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
            (temp / self.MARKER).write_text("bitalloc work folder: safe to delete when no run is going on\n")
            try:
                os.rename(temp, self.path)
            except OSError:  # another process made it first: adopt theirs below
                shutil.rmtree(temp, ignore_errors=True)
        self._check_ours()
        marker = self.path / self.MARKER
        if not marker.exists():  # an older bitalloc's folder: mark it now
            marker.write_text("bitalloc work folder\n")
        handle = open(marker, "a+")  # noqa: SIM115 (kept open: it holds the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise BitallocError(
                f"another bitalloc process is working in {self.path}: "
                "wait for it to finish, or use another output"
            ) from None
        self._lock = handle
        return self

    def _check_ours(self) -> None:
        if self.path.is_symlink() or not self.path.is_dir():
            raise BitallocError(f"{self.path} exists and is not a folder bitalloc made: move it away")
        if not any((self.path / name).exists() for name in (self.MARKER, *self.legacy)):
            raise BitallocError(
                f"{self.path} exists but was not made by bitalloc: "
                "refusing to use or delete it (move it away)"
            )

    def clear(self) -> None:
        """Empty the folder (keeping the mark and the lock)."""
        self._check_ours()
        for entry in self.path.iterdir():
            if entry.name != self.MARKER:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def remove(self) -> None:
        """Delete the folder (it is ours: checked) and release the lock. Crash-safe: the
        folder is first renamed away (atomic) to `trash_path`, then emptied with its mark
        last, so a kill at any point leaves either the whole marked folder or a trash folder
        that `sweep` (called by `open` and here) can still recognise and finish deleting."""
        self._check_ours()
        self.sweep(self.path)
        trash = self.trash_path(self.path)
        if trash.exists() or trash.is_symlink():  # someone else's folder of that name: in place
            self.close()
            _delete_marked(self.path, self.MARKER)
            return
        os.rename(self.path, trash)
        self.close()
        self.sweep(self.path)

    @classmethod
    def trash_path(cls, path: str | os.PathLike) -> Path:
        """Where `remove` moves a work folder before deleting it: ``.NAME.removing``."""
        path = Path(path)
        return path.with_name(f".{path.name}.removing")

    @classmethod
    def sweep(cls, path: str | os.PathLike) -> None:
        """Finish deleting the trash of a work folder whose removal was cut short: only a
        folder carrying the mark (deleted last), or an empty one; anything else is left."""
        _delete_marked(cls.trash_path(path), cls.MARKER)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _delete_marked(folder: Path, marker: str) -> None:
    """Delete ``folder`` if it carries ``marker`` (deleted last, so that a kill midway leaves
    it recognisable) or is empty; leave anything else."""
    if folder.is_symlink() or not folder.is_dir():
        return
    mark = folder / marker
    if mark.is_file():
        for entry in folder.iterdir():
            if entry.name == marker:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        mark.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: not ours to delete
        folder.rmdir()


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """BitallocError when the file system that will hold ``path`` has fewer than ``needed``
    bytes free (checked before long work, so that it does not fail hours in)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise BitallocError(
            f"not enough disk space for {what}: it needs about {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free on {where}"
        )
