"""An exclusive lock on a folder that several processes may write (an edit history).

A history folder is a shared, long-lived artifact: two `factedit history edit` runs on one folder
would both compute batch N on the same base and the second file would replace the first. The writer
holds this lock across "check the folder, edit, save"; a second writer is refused at once with a
message naming the holder, never made to overwrite its work.

The lock is an operating-system lock on a file in the folder (flock on POSIX, msvcrt.locking on
Windows): the kernel drops it when its process dies, so a killed run never leaves the folder locked.
The file also records who holds it (process id, host, command), for the message. As with any file
lock, this relies on the file system honouring locks (local disks do; some network file systems
do not).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import FacteditError


class FolderBusyError(FacteditError):
    """Another process (or another object in this one) holds the folder's lock."""


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


class FolderLock:
    """The lock file `name` in `folder`; `acquire` never waits: it takes the lock or raises
    FolderBusyError naming the holder. Re-entrant for its owner (acquiring a held lock is a no-op)."""

    def __init__(self, folder: str | Path, name: str = ".lock", what: str = "folder"):
        self.path = Path(folder) / name
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = self._holder(fd)
            os.close(fd)
            raise FolderBusyError(f"the {self.what} {self.path.parent} is in use by another process{holder}; "
                                  "wait until it finishes (or stop it), then run this again")
        os.ftruncate(fd, 0)  # who holds it, for the message another process shows
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "command": " ".join(sys.argv)[:500]}).encode())
        self._fd = fd

    def wait(self, poll: float = 0.2) -> "FolderLock":
        """Take the lock, waiting for as long as another process holds it (for work that the holder is
        doing for both, e.g. filling a cache entry: the waiter then finds it done)."""
        while True:
            try:
                self.acquire()
                return self
            except FolderBusyError:
                time.sleep(poll)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            _unlock(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            holder = json.loads(os.read(fd, 4096).decode())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
            return f" (process {int(holder['pid'])} on {holder['host']}, since {since}: {holder['command']})"
        except Exception:  # noqa: BLE001 - only the message's detail; the lock itself is what counts
            return ""

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # an object dropped without release() must not keep the folder locked
        self.release()
