"""Storage faults of clusters (#20): full disks, unwritable folders, file systems without locks.

- A real small file system (a 400 KiB tmpfs the test mounts; skipped where it cannot) that the
  run's checkpoints overflow: one clear error line naming the file, ENOSPC, the newest complete
  checkpoint and ``hpcfed resume``; exit 1; the first failed checkpoint skipped with one warning;
  no temporary file left; the older checkpoints and the log's rows intact; after the file system
  is made bigger, ``hpcfed resume`` runs every round exactly once. The same under ``mpirun -n 2``.
- A checkpoint skipped for lack of space is retried (and noted in the log's ``checkpoint_skipped``
  column); a failed final checkpoint is exit 1 naming the newest complete one.
- File locks that fail (an LD_PRELOAD shim, compiled here, makes flock/fcntl locks return
  ENOLCK, which reproduces h5py's "unable to lock file"): the run completes with one warning.
- ``out`` that cannot be created, or is a read-only folder: exit 2, one line naming ``out``.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcfed.io import storage
from hpcfed.io.checkpoint import list_checkpoints, load_checkpoint, write_checkpoint
from hpcfed.io.metrics import COLUMNS, MetricsLog, read_metrics

from .conftest import QUICKSTART, ROOT, cli_env, hpcfed

SMALL = ["data.num_clients=20", "clients_per_round=5", "eval_every=4"]


def _mount(folder: Path, options: str) -> None:
    """Mount a tmpfs at ``folder`` (root only), or skip the test saying why."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs Linux, root and mount(8)")
    folder.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


@pytest.fixture
def small_fs(tmp_path):
    """A 400 KiB file system of its own: about four of the test job's checkpoints."""
    folder = tmp_path / "fs"
    _mount(folder, "size=400k")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _lines(stderr: str, kind: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"hpcfed: {kind}:")]


def _assert_intact(run_dir: Path) -> Path:
    """No temporary file; every checkpoint loads; the log holds rounds 0.. up to the newest
    checkpoint at least, in order. Returns the newest checkpoint."""
    assert not list(run_dir.rglob("*.tmp")), list(run_dir.rglob("*.tmp"))
    found = list_checkpoints(run_dir)
    assert found, "no checkpoint was written"
    for path in found:
        load_checkpoint(path)  # complete, checksums verified
    newest = load_checkpoint(found[0]).round
    _, cols = read_metrics(run_dir / "log.h5")
    assert cols["round"].tolist()[:newest] == list(range(newest))
    assert len({len(c) for c in cols.values()}) == 1
    return found[0]


# ----------------------------------------------------------------------- a disk that fills up


@pytest.mark.parametrize("ranks", [0, 2], ids=["1-process", "mpirun-2"])
def test_checkpoints_that_fill_the_disk_end_in_one_line_and_resume_completes(small_fs, ranks):
    run_dir = small_fs / "quickstart"
    args = [f"out={small_fs}", "rounds=12", "checkpoint_every=1", "checkpoint_keep=12", *SMALL]
    proc = hpcfed("run", QUICKSTART, *args, ranks=ranks, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    errors, warnings = _lines(proc.stderr, "error"), _lines(proc.stderr, "warning")
    assert len(errors) == 1 and len(warnings) == 1, proc.stderr
    newest = _assert_intact(run_dir)
    line = errors[0]
    assert str(run_dir) in line and "No space left on device (ENOSPC)" in line
    assert "second checkpoint in a row" in line and f"hpcfed resume {run_dir}" in line
    assert f"the newest complete checkpoint is {newest}" in line
    assert "skipped" in warnings[0] and "ENOSPC" in warnings[0]
    assert load_checkpoint(newest).round < 12  # it did stop early
    # space freed: the file system grows, and the run resumes to its end, every round once
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    proc = hpcfed("resume", run_dir, ranks=ranks, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _, cols = read_metrics(run_dir / "log.h5")
    assert cols["round"].tolist() == list(range(12))
    assert list_checkpoints(run_dir)[0].name == "round_000012.h5"
    assert not list(run_dir.rglob("*.tmp"))


# A FedAvg that fills the run's file system before training round `fill_at` (once: a marker
# outside it says so) and frees it again before round `free_at`: a disk full at a chosen time.
DISKFILL = """
import os
from hpcfed.algorithms import FedAvg

def fill(path):
    \"""Write zeros to ``path`` until its file system is full.\"""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError:
        pass
    finally:
        os.close(fd)

class Filler(FedAvg):
    def begin_round(self, state, round_index):
        super().begin_round(state, round_index)
        opts = self.options
        if self.comm.Get_rank() != 0:
            return
        if round_index == opts["fill_at"] and not os.path.exists(opts["marker"]):
            open(opts["marker"], "w").close()
            fill(opts["filler"])
        if round_index == opts.get("free_at", -1) and os.path.exists(opts["filler"]):
            os.remove(opts["filler"])
"""


def _filler_job(tmp_path: Path, fs: Path, **opts) -> list[str]:
    """A job file (the quickstart job with the Filler algorithm) and its overrides."""
    (tmp_path / "diskfill.py").write_text(DISKFILL)
    shutil.copy(QUICKSTART, tmp_path / "job.toml")
    opts = {"filler": fs / "filler", "marker": tmp_path / "filled", **opts}
    return [
        str(tmp_path / "job.toml"), f"out={fs}", "algorithm=diskfill:Filler", *SMALL,
        *(f"strategy.{k}={v}" for k, v in opts.items()),
    ]  # fmt: skip


def test_a_checkpoint_skipped_for_lack_of_space_is_retried_and_noted_in_the_log(tmp_path, small_fs):
    job = _filler_job(tmp_path, small_fs, fill_at=2, free_at=3)
    proc = hpcfed("run", *job, "rounds=5", "checkpoint_every=1", "checkpoint_keep=10", timeout=120)
    assert proc.returncode == 0, proc.stderr
    (warning,) = _lines(proc.stderr, "warning")
    assert "checkpoint after round 3 skipped, retried after round 4" in warning and "ENOSPC" in warning
    assert not _lines(proc.stderr, "error") and "Traceback" not in proc.stderr
    run_dir = small_fs / "quickstart"
    assert [p.name for p in list_checkpoints(run_dir)] == [f"round_00000{r}.h5" for r in (5, 4, 2, 1)]
    _, cols = read_metrics(run_dir / "log.h5")
    assert cols["round"].tolist() == list(range(5))
    assert cols["checkpoint_skipped"].tolist() == [0, 0, 1, 0, 0]  # on round index 2's row
    assert not list(run_dir.rglob("*.tmp"))


def test_a_failed_final_checkpoint_is_exit_1_naming_the_newest_and_resume_completes(tmp_path, small_fs):
    job = _filler_job(tmp_path, small_fs, fill_at=3)
    proc = hpcfed("run", *job, "rounds=4", "checkpoint_every=2", timeout=120)
    assert proc.returncode == 1, proc.stderr
    run_dir = small_fs / "quickstart"
    (error,) = _lines(proc.stderr, "error")
    assert not _lines(proc.stderr, "warning") and "Traceback" not in proc.stderr, proc.stderr
    assert "at the final checkpoint" in error and "ENOSPC" in error
    assert f"newest complete checkpoint is {run_dir / 'checkpoints' / 'round_000002.h5'}" in error
    assert _assert_intact(run_dir).name == "round_000002.h5"
    # a run folder that resume cannot write is the user's to fix: exit 2, one line naming it
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    proc = hpcfed("resume", run_dir, timeout=120)
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert proc.returncode == 2, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line.startswith(f"hpcfed: error: {run_dir}: ") and "(EROFS)" in line
    (small_fs / "filler").unlink()  # space freed
    proc = hpcfed("resume", run_dir, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert read_metrics(run_dir / "log.h5")[1]["round"].tolist() == list(range(4))


def test_a_failed_write_leaves_no_temporary_and_hdf5_says_nothing(small_fs, capfd):
    (small_fs / "filler").write_bytes(bytes(380_000))
    final = small_fs / "checkpoints" / "round_000001.h5"
    model = {"w": np.ones(40_000, np.float32)}
    with pytest.raises(OSError) as info:
        write_checkpoint(final, 1, {"algorithm": "fedavg"}, model, {})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(final)
    assert sorted(p.name for p in (small_fs / "checkpoints").iterdir()) == []
    (small_fs / "filler").unlink()
    write_checkpoint(final, 1, {"algorithm": "fedavg"}, model, {})  # the same process writes it fine
    assert load_checkpoint(final).model["w"].sum() == 40_000
    assert capfd.readouterr().err == ""  # no HDF5 error stack, no "Exception ignored"


def test_a_log_append_that_fails_keeps_the_file_and_the_rows(small_fs):
    log = MetricsLog(small_fs / "log.h5", flush_seconds=0)
    log.create({"algorithm": "fedavg"})
    row = {name: 1 for name in COLUMNS}
    log.append({**row, "round": 0})
    helpers: dict = {}
    exec(DISKFILL, helpers)
    helpers["fill"](small_fs / "filler")
    for r in (1, 2):
        log.append({**row, "round": r})  # fails, quietly: the rows stay pending
    assert len(log.pending) == 2 and log.error.errno == errno.ENOSPC
    with pytest.raises(OSError):
        log.flush(strict=True)
    assert read_metrics(small_fs / "log.h5")[1]["round"].tolist() == [0]  # the file as it was
    assert not list(small_fs.glob(".*.tmp"))
    (small_fs / "filler").unlink()
    log.flush()
    assert read_metrics(small_fs / "log.h5")[1]["round"].tolist() == [0, 1, 2]


def test_stale_temporaries_of_a_killed_run_go_at_resume(tmp_path):
    args = [f"out={tmp_path}", "rounds=2", "checkpoint_every=1", *SMALL]
    assert hpcfed("run", QUICKSTART, *args).returncode == 0
    run_dir = tmp_path / "quickstart"
    stale = [run_dir / "checkpoints" / ".round_000003.h5.tmp", run_dir / ".log.h5.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    proc = hpcfed("resume", run_dir, "rounds=3")
    assert proc.returncode == 0, proc.stderr
    assert not any(p.exists() for p in stale) and not list(run_dir.rglob("*.tmp"))


def test_which_failed_checkpoints_are_skipped(tmp_path):
    class Job:
        rounds, checkpoint_every = 10, 2

    def fail(code):
        return OSError(code, os.strerror(code), str(tmp_path / "checkpoints" / "round_000004.h5"))

    writes = storage.CheckpointWrites(tmp_path, Job)
    with pytest.warns(UserWarning, match=r"round 4 skipped, retried after round 6 .*none yet"):
        assert writes.failed(fail(errno.EDQUOT), "writing the checkpoint", 4, stopping=False) is None
    second = writes.failed(fail(errno.ENOSPC), "writing the checkpoint", 6, stopping=False)
    assert isinstance(second, storage.StorageError)
    assert "second checkpoint in a row" in str(second) and "run the job again" in str(second)
    writes.succeeded()
    errors = [second]
    for code, rounds_done, stopping in [
        (errno.EIO, 4, False),
        (errno.ENOSPC, 10, False),
        (errno.ENOSPC, 4, True),
    ]:
        errors.append(writes.failed(fail(code), "writing", rounds_done, stopping))
        assert isinstance(errors[-1], storage.StorageError)
        writes.succeeded()
    bug = ValueError("not a storage error")
    assert writes.failed(bug, "writing", 4, False) is bug
    # each is one line naming the file (the CLI prints it as "hpcfed: error: ..." and exits 1)
    assert all("\n" not in str(e) and "round_000004.h5" in str(e) for e in errors)


# --------------------------------------------------------------------------------- file locks

NOLOCK = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>

/* A file system that refuses locks: flock() and fcntl() record locks fail with ENOLCK. */
int flock(int fd, int op) { (void)fd; (void)op; errno = ENOLCK; return -1; }

static int is_lock(int cmd) {
    return cmd == F_SETLK || cmd == F_SETLKW || cmd == F_GETLK
        || cmd == F_OFD_SETLK || cmd == F_OFD_SETLKW || cmd == F_OFD_GETLK;
}

#define WRAP(name)                                                                 \
    int name(int fd, int cmd, ...) {                                               \
        va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap); \
        if (is_lock(cmd)) { errno = ENOLCK; return -1; }                           \
        static int (*real)(int, int, ...);                                         \
        if (!real) real = (int (*)(int, int, ...))dlsym(RTLD_NEXT, #name);         \
        return real(fd, cmd, arg);                                                 \
    }
WRAP(fcntl)
WRAP(fcntl64)
"""


def test_a_file_system_that_refuses_locks_costs_one_warning(tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None or sys.platform != "linux":
        pytest.skip("the lock-refusing shim needs gcc on Linux")
    (tmp_path / "nolock.c").write_text(NOLOCK)
    shim = tmp_path / "nolock.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", shim, tmp_path / "nolock.c", "-ldl"], check=True)
    env = {**cli_env(), "LD_PRELOAD": str(shim)}

    def run(*args):
        cmd = [sys.executable, *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)

    # the shim reproduces what users meet: h5py's own lock fails
    probe = run("-c", f"import h5py; h5py.File({str(tmp_path / 'probe.h5')!r}, 'w')")
    assert probe.returncode != 0 and "unable to lock file" in probe.stderr and "errno = 37" in probe.stderr
    for command in (["run", QUICKSTART, f"out={tmp_path}", "rounds=4", "checkpoint_every=2", *SMALL],
                    ["resume", tmp_path / "quickstart", "rounds=6"]):  # fmt: skip
        proc = run("-m", "hpcfed", *command)
        assert proc.returncode == 0, proc.stderr
        (warning,) = _lines(proc.stderr, "warning")
        assert "refuses file locks" in warning and "ENOLCK" in warning and "HDF5_USE_FILE_LOCKING" in warning
        assert "Traceback" not in proc.stderr
    assert read_metrics(tmp_path / "quickstart" / "log.h5")[1]["round"].tolist() == list(range(6))


def test_hdf5_use_file_locking_false_takes_no_lock_and_warns_nothing(tmp_path, monkeypatch, recwarn):
    def refuse(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(storage.fcntl, "flock", refuse)
    monkeypatch.setattr(storage, "_locks_refused", False)
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")
    log = MetricsLog(tmp_path / "log.h5", flush_seconds=0)
    log.create({"algorithm": "fedavg"})
    log.append({**dict.fromkeys(COLUMNS, 1), "round": 0})
    assert not recwarn.list and read_metrics(tmp_path / "log.h5")[1]["round"].tolist() == [0]
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING")
    for r in (1, 2):
        log.append({**dict.fromkeys(COLUMNS, 1), "round": r})
    (warning,) = recwarn.list  # two appends, one warning
    assert "refuses file locks" in str(warning.message) and "ENOSYS" in str(warning.message)
    assert read_metrics(tmp_path / "log.h5")[1]["round"].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------ an unusable `out`


@pytest.mark.parametrize("ranks", [0, 2], ids=["1-process", "mpirun-2"])
def test_an_out_that_cannot_be_created_is_exit_2_with_one_line(ranks):
    proc = hpcfed("run", QUICKSTART, "out=/proc/forbidden/x", "rounds=1", ranks=ranks, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if ranks:  # mpirun adds its banner about the exit code: hpcfed's own lines are one
        lines = [line for line in lines if line.startswith("hpcfed:") or "Traceback" in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hpcfed: error: out = '/proc/forbidden/x'") and "(ENOENT)" in lines[0]


def test_an_out_that_is_a_read_only_folder_is_exit_2_with_one_line(tmp_path):
    folder = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount it is
        _mount(folder, "size=64k,ro")
    else:
        folder.mkdir()
        folder.chmod(0o555)
    try:
        proc = hpcfed("run", QUICKSTART, f"out={folder}", "rounds=1")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"hpcfed: error: out = '{folder}'")
    assert "(EROFS)" in lines[0] or "(EACCES)" in lines[0]
