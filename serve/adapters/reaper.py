"""`python -m nvfp4.serve.adapters.reaper CMD...`: run an engine server so that it never outlives us.

The engine runs in a process group of its own (vLLM forks an EngineCore, llama.cpp threads, ...).
This reaper asks the kernel for SIGTERM when its parent (our server) dies, even by SIGKILL
(PR_SET_PDEATHSIG), and on SIGTERM/SIGINT/SIGHUP, or when the engine exits, it ends the whole
group: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
GRACE_S = float(os.environ.get("NVFP4_ENGINE_GRACE_S", "10"))


def die_with_parent(parent: int) -> None:
    """Linux only: the kernel signals us when the thread that forked us exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's close() still stops us on a clean shutdown
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)


def end_group(pgid: int, child: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            child.poll()
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def main(argv: list[str]) -> int:
    parent = int(os.environ.get("NVFP4_REAPER_PARENT", os.getppid()))
    die_with_parent(parent)
    if not argv:
        print("usage: python -m nvfp4.serve.adapters.reaper CMD [ARGS...]", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    child = subprocess.Popen(argv, start_new_session=True)  # its own group: we can end all of it
    while child.poll() is None and not stop.wait(0.2):
        pass
    end_group(child.pid, child)  # also reaps what the engine left behind when it exited by itself
    code = child.wait()
    return 128 + signal.SIGTERM if stop.is_set() else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
