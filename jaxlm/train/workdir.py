"""Who may write a workdir: one process at a time, and nothing left behind by a run that fails
before it starts.

`lock(directory)` takes an exclusive `flock` on `directory/.lock` and writes the holder's pid,
host and command into it. The kernel drops the lock when its process dies, even by kill -9, so
a lock file that is still there but no longer held is stale: the next writer takes it over and
says whose it was. A held lock is an error naming its holder. Only process 0 of a multi-process
run takes it (all processes of a run write the same workdir).

`claim(workdir)` is the lock plus a promise: if the folder did not exist (or was empty) and the
run fails before `started()`, the folder is removed, so a run that fails validation leaves no
half-made workdir (a tokenizer without a config) behind.
"""

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time

import jax

log = logging.getLogger("jaxlm")
LOCK_FILE = ".lock"


class WorkdirLocked(RuntimeError):
    """Another live process writes this workdir."""


@contextlib.contextmanager
def lock(directory: str):
    """Holds `directory`'s lock (creating the folder) for the duration of the block."""
    os.makedirs(directory, exist_ok=True)
    if jax.process_index() != 0:
        yield
        return
    handle = _acquire(os.path.join(directory, LOCK_FILE))
    try:
        yield
    finally:
        # Unlinked while still held (a process that opened it meanwhile sees another inode and
        # retries); gone already if the block renamed the folder (an export's last step).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        handle.close()


def _acquire(path: str):
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise WorkdirLocked(
                f"{os.path.dirname(path)} is in use by {holder}: two runs writing one workdir would "
                "mix their checkpoints and metrics. Wait for it to finish, stop it, or use another "
                "workdir.") from None
        if _same_file(handle, path):  # not unlinked by its last holder between open and flock
            break
        handle.close()
    stale = _holder(handle)
    if stale != "an unknown process":
        log.warning("%s: took over the lock of %s, which ended without releasing it (killed?)",
                    os.path.dirname(path), stale)
    handle.seek(0)
    handle.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
               "command": " ".join(sys.argv)}, handle)
    handle.flush()
    return handle


def _holder(handle) -> str:
    handle.seek(0)
    try:
        info = json.loads(handle.read())
    except ValueError:
        return "an unknown process"
    return f"pid {info['pid']} on {info['host']} (since {info['since']}: {info['command']})"


def _same_file(handle, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


class Claim:
    """A locked workdir whose contents are removed again if the run fails before `started()` and
    the folder was new (missing or empty)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.existed = os.path.isdir(workdir)
        self.new = not self.existed or not os.listdir(workdir)
        self.is_started = False

    def started(self) -> None:
        """From here on the workdir holds the run's work: a failure leaves it in place."""
        self.is_started = True

    def undo(self) -> None:
        if not self.existed:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        for name in os.listdir(self.workdir):  # a folder the user made stays, empty
            path = os.path.join(self.workdir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


@contextlib.contextmanager
def claim(workdir: str):
    state = Claim(workdir)
    try:
        with lock(workdir):
            yield state
    except BaseException:
        if state.new and not state.is_started and jax.process_index() == 0:
            state.undo()
        raise
