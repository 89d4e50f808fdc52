"""Worker processes that end with the process that started them.

img2dataset runs its download pool (and a logger process) as `spawn` children of the caller. When
the caller is killed with SIGKILL nothing in it runs, and those workers would keep writing shards
into the output for minutes. `end_with_parent()` marks every process started inside it with a
random token in its environment and starts a small watchdog process; the watchdog waits on a pipe
from the caller, which the kernel closes when the caller exits for any reason. If the caller did
not say "done" first (it was killed), the watchdog kills every process that carries the token.
Linux only (it reads /proc); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from typing import Iterator

TOKEN_ENV = "MEISSONIC_WORKER_TOKEN"

_WATCHDOG = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
token, parent = sys.argv[1], int(sys.argv[2])
if sys.stdin.buffer.read() == b"done":  # EOF: the parent closed the pipe (done) or died (nothing written)
    sys.exit(0)
marker = ("%s=" + token).encode()
me = os.getpid()
for _ in range(5):
    hits = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (me, parent):
            continue
        try:
            with open("/proc/%%s/environ" %% name, "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker in env:
            try:
                os.kill(int(name), signal.SIGKILL)
                hits += 1
            except OSError:
                pass
    if not hits:
        break
    time.sleep(0.2)
""" % TOKEN_ENV


def marked_processes(token: str) -> list[int]:
    """Pids of the processes whose environment carries `token` (for tests and diagnostics)."""
    marker = f"{TOKEN_ENV}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


@contextlib.contextmanager
def end_with_parent() -> Iterator[str]:
    """Within the block, processes started (with the inherited environment) end when this process
    ends, even by SIGKILL; yields the token (empty when unsupported)."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc"):
        yield ""
        return
    token = secrets.token_hex(8)
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, token, str(os.getpid())], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    previous = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = token
    try:
        yield token
    finally:
        if previous is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = previous
        assert watchdog.stdin is not None
        try:  # a normal end: the processes started inside (multiprocessing's helpers too) are left alone
            watchdog.stdin.write(b"done")
            watchdog.stdin.close()
        except OSError:
            pass
        try:
            watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watchdog.kill()


__all__ = ["TOKEN_ENV", "end_with_parent", "marked_processes"]
