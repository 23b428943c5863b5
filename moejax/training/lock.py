"""One trainer per ``MODEL_DIR``: an advisory ``flock`` on ``MODEL_DIR/.moejax_train.lock``.

The lock is the kernel's, so it goes away with the process however that ends (SIGKILL included):
a rerun after a crash never finds a stale lock. The file records who holds it (host, pid, start
time) for the message a second trainer gets. Evaluation and inference do not take it (they may run
beside a training job, as T5X's eval jobs do). On file systems without ``flock`` (some network
mounts) the lock is skipped with a warning.
"""

from __future__ import annotations

import os
import socket
import time

try:
    import fcntl
except ImportError:          # pragma: no cover  (Windows)
    fcntl = None

LOCK_FILE = ".moejax_train.lock"


class RunLock:
    """``with RunLock(model_dir):`` holds the lock or raises ValueError naming its holder."""

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._f = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise ValueError(f"MODEL_DIR {os.path.dirname(self.path)!r} is in use by another moejax train "
                                 f"({holder}); wait for it to finish or use another MODEL_DIR") from None
            except OSError as e:
                print(f"warning: cannot lock {self.path} ({e}); not guarding against a second trainer", flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc):
        if self._f is not None:
            self._f.seek(0)
            self._f.truncate()
            self._f.close()                # closing the descriptor releases the flock
            self._f = None
        return False
