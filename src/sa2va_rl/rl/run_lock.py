"""One run per output directory: a lock file naming its owner (pid, host, start time).

A second run on the same ``--output_dir`` refuses to start instead of deleting the first run's ``.staging`` and
mixing checkpoints. A lock left by a process that died on this host is taken over (the create is atomic, so of
two runs taking over the same stale lock only one wins); a lock from another host cannot be checked from here
and is reported with how to clear it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass

from sa2va_rl.jsonio import dumps_strict

logger = logging.getLogger(__name__)

LOCK = ".sa2va-rl.lock"


class OutputDirBusy(RuntimeError):
    """Another run owns the output directory; the message names it and says what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@dataclass
class RunLock:
    output_dir: str
    flag: str = "--output_dir"  # the flag the message tells the user to change
    clash: str = "two runs on one output_dir would mix their checkpoints"  # why two owners are refused

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, LOCK)

    def acquire(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
                    logger.warning("%s: taking over the lock of pid %s, which is no longer running", self.output_dir,
                                   owner.get("pid"))
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                who = ("an unreadable lock" if owner is None else
                       f"pid {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')})")
                raise OutputDirBusy(f"{self.output_dir} is in use by {who}: {self.clash}. Wait for it, or pass "
                                    f"another {self.flag}; if that run is gone (e.g. on another host), delete "
                                    f"{self.path}") from None
            with os.fdopen(fd, "w") as f:
                f.write(dumps_strict(me))
            return
        raise OutputDirBusy(f"{self.output_dir}: another run took over the stale lock first")

    def release(self) -> None:
        owner = self._owner()
        if owner is not None and owner.get("pid") == os.getpid():
            os.remove(self.path)

    def _owner(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None
