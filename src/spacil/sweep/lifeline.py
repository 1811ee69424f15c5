"""A sweep worker ends when its sweep process ends, however the sweep ends (kill -9 included).

The local engine starts each worker with SWEEP_PARENT_ENV set to its own pid; `spacil run` calls `follow_parent()`, which
on Linux asks the kernel for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG) and elsewhere starts a thread that
watches the parent. Either way the worker stops as Ctrl-C stops it (KeyboardInterrupt: every finished task is kept) and
releases its run folder, so a rerun of the sweep never finds two writers on one folder.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

SWEEP_PARENT_ENV = "SPACIL_SWEEP_PARENT"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _watch(parent: int, poll_seconds: float) -> None:
    import _thread

    while os.getppid() == parent:
        time.sleep(poll_seconds)
    _thread.interrupt_main()


def follow_parent(poll_seconds: float = 1.0) -> bool:
    """When this process is a sweep worker, make it end with its sweep; True when it is one."""
    value = os.environ.get(SWEEP_PARENT_ENV, "")
    if not value.isdigit():
        return False
    parent = int(value)
    # SIGTERM, not SIGINT: a sweep started in the background of a script hands its workers an ignored SIGINT
    signal.signal(signal.SIGTERM, _interrupt)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent:  # the sweep died before the request was made
                raise KeyboardInterrupt
            return True
    threading.Thread(target=_watch, args=(parent, poll_seconds), name="spacil-sweep-lifeline", daemon=True).start()
    return True
