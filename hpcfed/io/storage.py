"""Storage faults of clusters: full disks and quotas, unwritable folders, file systems without locks.

Every failure to create or write the run folder, ``log.h5`` or a checkpoint becomes ONE line that
names the file, what failed and what to do (README, "Storage on clusters"):

- the user's input is the cause (``out`` cannot be created or is not writable: no such path, no
  permission, a read-only mount) -> :class:`hpcfed.UserError`, exit 2;
- the environment is (no space, quota exceeded, an I/O error, mid-run) -> :class:`StorageError`,
  exit 1, naming the newest complete checkpoint and ``hpcfed resume RUN_DIR``.

How the files stay intact. HDF5 itself never sees a failed write: a write that fails inside
libhdf5 leaves its library state broken (the close fails too, every later close prints a
traceback, and reopening the file in the same process crashed it in our tests). So checkpoints
are written through :class:`GuardedFile` (h5py's Python file-object driver): the first failed
``pwrite`` is recorded, later writes are dropped, HDF5 closes cleanly, and the caller removes the
temporary file and raises the recorded ``OSError`` with its errno. The log is small and is
rewritten whole: an in-memory copy is changed and then replaces ``log.h5`` atomically
(:func:`replace_file`), so a failed append leaves the old file as it was, and a reader never sees
a half-written one.

Locks. hpcfed's own HDF5 opens take no HDF5 lock (checkpoints are immutable once renamed into
place; the log writer locks with ``flock`` itself, :func:`lock_exclusive`). Where the file system
refuses locks (``ENOSYS``, ``ENOLCK``: some Lustre and NFS mounts) the writer goes on without one
after one warning; ``HDF5_USE_FILE_LOCKING=FALSE`` turns the lock off without a warning.
"""

from __future__ import annotations

import errno
import fcntl
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcfed.errors import StorageError, UserError

SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})  # a checkpoint that fails for these is skipped once
# errnos that mean "this path cannot be used": the user's input, when it is the folder they chose
USER_CAUSED = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
     errno.ENAMETOOLONG, errno.ELOOP}
)  # fmt: skip
LOCKS_REFUSED = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})


# StorageError (hpcfed/errors.py) is raised on the rank that writes files (rank 0); the other
# ranks raise RankFailed with exit code 1. The CLI prints its one line and exits 1.


def why(exc: OSError) -> str:
    """``"No space left on device (ENOSPC)"``: the OS's words and the errno's name."""
    code = errno.errorcode.get(exc.errno, str(exc.errno))
    text = (exc.strerror or os.strerror(exc.errno or 0) or str(exc)).replace("\n", " ")
    return f"{text} ({code})"


def is_storage(exc: BaseException) -> bool:
    """An OSError of the operating system (it has an errno), not a corrupt file's or a bug's."""
    return isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, BlockingIOError)


def newest_checkpoint(run_dir: Path) -> Path | None:
    from hpcfed.io.checkpoint import list_checkpoints  # (checkpoint imports this module)

    found = list_checkpoints(run_dir)
    return found[0] if found else None


def advice(exc: OSError, run_dir: Path) -> str:
    """What to do, and the newest complete checkpoint, for a failure of the environment."""
    fix = "free space (or raise the quota)" if exc.errno in SPACE else "fix the file system"
    newest = newest_checkpoint(run_dir)
    if newest is None:
        return f"no checkpoint was completed: {fix}, remove {run_dir} and run the job again"
    return f"{fix} and continue with 'hpcfed resume {run_dir}'; the newest complete checkpoint is {newest}"


def environment_error(message: str) -> StorageError:
    """A :class:`StorageError` with ``message`` (the CLI prints it as one line, exit 1)."""
    return StorageError(message)


def failed(exc: OSError, path: Path, doing: str, run_dir: Path, when: str = "") -> StorageError:
    """One line for a file operation of a running job that failed: ``{path}: {doing} failed: ...``."""
    when = f" {when}" if when else ""
    return environment_error(f"{path}: {doing} failed{when}: {why(exc)}; {advice(exc, run_dir)}")


@contextmanager
def writing_run_folder(
    run_dir: Path,
    doing: str,
    key: str,
    fix: str = "choose a folder you can create and write",
    fresh: bool = False,
) -> Iterator[None]:
    """OSErrors of the block become one line. A path the user chose that cannot be used (no such
    path, no permission, read-only) is a UserError naming ``key`` (``out = '...'``, or the run
    folder on resume) and saying ``fix``; the environment's (no space, I/O error) a StorageError.
    ``fresh``: nothing of the run is written yet, so the advice is to run the job again."""
    try:
        yield
    except OSError as exc:
        if not is_storage(exc):
            raise
        path = exc.filename or run_dir
        if exc.errno in USER_CAUSED:
            raise UserError(f"{key}: {doing} failed at {path}: {why(exc)}; {fix}") from None
        if fresh:
            again = "free space (or raise the quota)" if exc.errno in SPACE else "fix the file system"
            message = f"{path}: {doing} failed: {why(exc)}; {again} and run the job again"
            raise environment_error(message) from None
        raise failed(exc, path, doing, run_dir) from None


class CheckpointWrites:
    """Rank 0's record of failed checkpoint writes. A write that fails for lack of space (ENOSPC,
    EDQUOT) is skipped with a warning and retried at the next checkpoint, since the older
    checkpoints stand; a second failure in a row, any other failure, and a failed final checkpoint
    (after the last round or on a stop signal) end the run with a :class:`StorageError`."""

    def __init__(self, run_dir: Path, job):
        self.run_dir, self.rounds, self.every = Path(run_dir), job.rounds, job.checkpoint_every
        self.in_a_row = 0

    def succeeded(self) -> None:
        self.in_a_row = 0

    def failed(
        self, exc: BaseException, doing: str, rounds_done: int, stopping: bool
    ) -> BaseException | None:
        """What every rank raises for ``exc`` (rank 0's failure while ``doing``, say "writing the
        checkpoint"), or None: the checkpoint is skipped, with a warning. Not a storage error: ``exc``."""
        if not is_storage(exc):
            return exc
        self.in_a_row += 1
        path = exc.filename or self.run_dir
        final = rounds_done >= self.rounds or stopping
        if exc.errno in SPACE and self.in_a_row == 1 and not final:
            retry = min(rounds_done - rounds_done % self.every + self.every, self.rounds)
            newest = newest_checkpoint(self.run_dir)
            warnings.warn(
                f"{path}: {doing} failed: {why(exc)}; checkpoint after round {rounds_done} skipped, "
                f"retried after round {retry} (the newest complete checkpoint is {newest or 'none yet'}); "
                "free space soon",
                stacklevel=3,
            )
            return None
        when = "for the second checkpoint in a row" if self.in_a_row > 1 else "at the final checkpoint"
        if exc.errno not in SPACE:
            when = f"after round {rounds_done}"
        return failed(exc, path, doing, self.run_dir, when)


# -- files that are written whole --------------------------------------------------------------------
def temporary(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def remove_stale_temps(run_dir: Path) -> None:
    """Remove what a killed run left half-written: ``.log.h5.tmp``, ``.config.toml.tmp``,
    ``checkpoints/.round_NNNNNN.h5.tmp`` (never a complete file)."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a folder; the rename stands anyway
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def replace_file(path: Path, data, durable: bool = True) -> None:
    """Write ``data`` (bytes-like) to ``path`` atomically: a temporary file, fsynced (``durable``),
    renamed into place. On failure the temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)
        raise
    if durable:
        fsync_dir(path.parent)


class GuardedFile:
    """A file for h5py's ``fileobj`` driver whose failed writes HDF5 never sees (module docstring).

    Unbuffered: every HDF5 write is one ``pwrite`` loop at its offset. The first ``OSError`` is
    kept in :attr:`error` (with the file's name) and every later write is dropped; :meth:`check`
    raises it. h5py calls ``seek``, ``tell``, ``read``/``readinto``, ``write``, ``truncate``, ``flush``."""

    def __init__(self, path: Path, name: Path | None = None):
        self.name = str(name or path)  # the name errors give (the final file, not the temporary)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.pos = self.eof = 0
        self.error: OSError | None = None

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            exc.filename = self.name
            self.error = exc

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.eof + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.pos + done)
            except OSError as exc:
                self._fail(exc)
        self.pos += len(view)
        self.eof = max(self.eof, self.pos)
        return len(view)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = os.pread(self.fd, len(view), self.pos)
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        data = os.pread(self.fd, size if size >= 0 else max(self.eof - self.pos, 0), self.pos)
        self.pos += len(data)
        return data

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self._fail(exc)
        self.eof = size
        return size

    def flush(self) -> None:
        pass

    def check(self) -> None:
        """Raise the first failed write, if any."""
        if self.error is not None:
            raise self.error

    def sync(self) -> None:
        self.check()
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self._fail(exc)
            self.check()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextmanager
def atomic_hdf5(final: Path) -> Iterator[tuple[object, GuardedFile]]:
    """``(h5py.File, GuardedFile)`` writing ``final`` under its temporary name; on success the file
    is fsynced and renamed into place (and the folder fsynced), so a crash never leaves a
    half-written ``final``. Any failure removes the temporary file and raises (an OSError of a
    failed write with its errno, named after ``final``)."""
    import h5py

    final = Path(final)
    tmp = temporary(final)
    sink = GuardedFile(tmp, name=final)
    try:
        with h5py.File(sink, "w") as f:
            yield f, sink
        sink.sync()
        sink.close()
        os.replace(tmp, final)
    except BaseException:
        sink.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


# -- locks -----------------------------------------------------------------------------------------
_locks_refused = False  # once per process: the file system said no, and we said so


def locking_disabled() -> bool:
    """``HDF5_USE_FILE_LOCKING=FALSE`` (HDF5's own switch, also hpcfed's): take no locks at all."""
    return os.environ.get("HDF5_USE_FILE_LOCKING", "").strip().upper() in ("FALSE", "0", "NO", "OFF")


def lock_exclusive(fd: int, path: Path) -> None:
    """An exclusive, non-blocking ``flock`` on an open file, the lock HDF5 readers take a shared
    one of: ``BlockingIOError`` while a reader holds it. A file system that refuses locks gets one
    warning per process, and the writer goes on without the lock."""
    global _locks_refused
    if _locks_refused or locking_disabled():
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as exc:
        if exc.errno not in LOCKS_REFUSED:
            raise
        _locks_refused = True
        warnings.warn(
            f"{path}: the file system refuses file locks ({why(exc)}); hpcfed goes on without them "
            "(its files are replaced by renames, so readers still see whole files); set "
            "HDF5_USE_FILE_LOCKING=FALSE to silence this, and for your own h5py readers",
            stacklevel=4,
        )
