"""A run directory's ownership: one trainer at a time, and `--overwrite` that deletes only what a run wrote.

The lock is `RUN/.lock`, held with `flock(LOCK_EX | LOCK_NB)` for the trainer's whole life. The kernel drops a
flock when its holder dies however it dies (SIGKILL, OOM), so a stale lock of a dead process is simply taken
over by the next trainer; no pid-liveness guessing. The file holds the holder's pid (for the message) and is
never deleted (deleting a flocked file lets a third process lock a new inode while the first still runs).
Torch-free: the sweep asks `holder()` before it starts a run.
"""
from __future__ import annotations

import fcntl
import os
import shutil

from pgrpo.errors import UserError

LOCK = ".lock"
# what a run writes into its directory; --overwrite removes exactly these (nothing else a user put there)
RUN_FILES = ("metrics.jsonl", "config.yaml")
RUN_DIRS = ("rollouts", "tensorboard")


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.fd = None

    def acquire(self, what: str = "trainer") -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise UserError(f"run directory {os.path.dirname(self.path)} is in use by another {what} "
                            f"(pid {pid if pid else 'unknown'}); wait for it to finish or stop it first.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing drops the flock
            self.fd = None

    __del__ = release   # a trainer that failed in-process (tests) does not keep the directory locked


def _read_pid(fd) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def holder(run_dir: str) -> int | None:
    """pid of the live process holding run_dir's lock, or None when nobody holds it (never takes it)."""
    path = os.path.join(run_dir, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        return pid or -1
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return None


def clear_run_outputs(run_dir: str) -> None:
    """--overwrite: the files and folders a run writes, never anything else in the directory."""
    for name in os.listdir(run_dir):
        p = os.path.join(run_dir, name)
        if name.startswith("ckpt_") or name in RUN_FILES:
            os.remove(p)
        elif name in RUN_DIRS and os.path.isdir(p):
            shutil.rmtree(p)


def remove_if_only_lock(run_dir: str) -> None:
    """Undo the directory a failed start-up created: only when nothing but our lock file is in it."""
    try:
        if os.listdir(run_dir) == [LOCK]:
            os.remove(os.path.join(run_dir, LOCK))
            os.rmdir(run_dir)
    except OSError:
        pass
