"""One run per folder: ``OUT/.zsq-lock`` holds the running command's PID and host.

The lock is an ``flock`` on that file, so the kernel releases it when its holder dies however it
dies (kill -9, OOM): a lock file whose holder is gone is stale and taken over, with a log line
naming the dead holder. The PID and host in the file are for people (the refusal names them) and
for file systems without ``flock``, where a holder on this host is judged alive by its PID and a
holder on another host is always taken as alive (zsq cannot see its processes).

Two commands on one folder would otherwise both write the same checkpoint names and both report
success for a folder that holds only one of them.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

from zsq.errors import ZsqError

logger = logging.getLogger(__name__)

LOCK_FILE = ".zsq-lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        holder = json.loads(raw.decode()) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


class RunLock:
    """``with RunLock(out):`` or ``acquire()``/``release()``: refuse (ZsqError, one line) while another
    zsq command holds ``out``; take over a stale lock with a log line. ``out`` must exist."""

    def __init__(self, out):
        self.path = Path(out) / LOCK_FILE
        self.fd: Optional[int] = None
        self._ino: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        if self.fd is not None:
            return self
        for _ in range(5):  # a holder that removed the file between our open and flock: open it again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise ZsqError(f"cannot lock {self.path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise ZsqError(f"{self.path.parent} is in use by another zsq command ({_describe(holder)}); "
                               "wait for it to finish or use another --out") from None
            except OSError as e:  # no flock on this file system: judge by the PID alone
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise ZsqError(f"cannot lock {self.path}: {e.strerror or e}") from None
                locked = False
            st, now = os.fstat(fd), None
            try:
                now = os.lstat(self.path)
            except FileNotFoundError:
                pass
            if now is None or now.st_ino != st.st_ino:
                os.close(fd)
                continue
            holder = _read_holder(fd)
            if not holder and os.fstat(fd).st_size > 0 or holder and not {"pid", "host"} <= set(holder):
                os.close(fd)  # not a lock zsq wrote (zsq's is empty only between its create and write)
                raise ZsqError(f"{self.path} exists and is not a zsq lock file; zsq needs that name to lock "
                               f"{self.path.parent} (move it, or use another --out)")
            if holder and not locked and (holder.get("host") != socket.gethostname()
                                          or _pid_alive(int(holder.get("pid", 0) or 0))):
                os.close(fd)
                raise ZsqError(f"{self.path.parent} is in use by another zsq command ({_describe(holder)}); "
                               "wait for it to finish or use another --out")
            if holder and holder.get("pid") != os.getpid():
                logger.warning(f"taking over the stale lock {self.path} of {_describe(holder)}, which is no "
                               "longer running")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            self.fd, self._ino = fd, st.st_ino
            return self
        raise ZsqError(f"cannot lock {self.path}: it keeps being replaced by another command")

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the lock."""
        if self.fd is None:
            return
        try:
            if os.lstat(self.path).st_ino == self._ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lock object dropped on an error path still lets the folder go
        try:
            self.release()
        except Exception:
            pass
