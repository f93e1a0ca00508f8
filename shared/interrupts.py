"""Ctrl-C at any moment of a command, its imports included: one line and exit 130, never a traceback.

A KeyboardInterrupt raised inside some imports cannot be caught: inside `import torch` it escapes
C++ code and aborts the process (pybind11), inside `import numpy` it leaves numpy half-imported.
So a console script calls `exit_while_starting` first thing, and until the command calls `started`
(right after its own heavy imports, before it writes anything) a Ctrl-C prints
"PROG: interrupted while starting; nothing was written" and ends the process at once. From
`started` on, a Ctrl-C raises KeyboardInterrupt as usual (the command's `one_line_errors` turns it
into its own line), except while an import is running: then it waits for the import to finish.

Only the console scripts (and `python -m PACKAGE`) install this: importing a command's module (a
test, the Python API) changes no signal handling, and `started` then does nothing.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

STARTING = "interrupted while starting; nothing was written"
INTERRUPT_EXIT = 130
_RETRY_S = 0.05  # how soon a Ctrl-C that came during an import is looked at again
_IMPORTING = ("importlib._bootstrap", "importlib._bootstrap_external", "_frozen_importlib",
              "_frozen_importlib_external")
_prog: str | None = None
_pending = False
_timer: threading.Timer | None = None


def run_as_command(*names: str) -> bool:
    """The process is the console script `names[0]`, or `python -m` of one of `names` (packages)."""
    main = sys.modules.get("__main__")
    file = getattr(main, "__file__", None) or ""
    base = os.path.basename(file)
    if base in (names[0], f"{names[0]}.exe", f"{names[0]}-script.py"):
        return True
    return base == "__main__.py" and os.path.basename(os.path.dirname(file)) in names


def exit_while_starting(prog: str, *packages: str) -> None:
    """From now until `started`, Ctrl-C prints one line and exits 130 at once (see the module
    docstring). Nothing is installed where Ctrl-C is ignored (a job started with `&`) or already
    handled by someone else, nor when this is not the process of the command."""
    global _prog
    if threading.current_thread() is not threading.main_thread() or not run_as_command(prog, *packages):
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    _prog = prog
    signal.signal(signal.SIGINT, _exit_now)


def started() -> None:
    """The command's heavy imports are done and it is about to write: from now on Ctrl-C is a
    KeyboardInterrupt (outside imports). Does nothing where `exit_while_starting` installed nothing."""
    if _prog is not None and signal.getsignal(signal.SIGINT) is _exit_now:
        signal.signal(signal.SIGINT, _interrupt_outside_imports)


def interrupted_meanwhile() -> bool:
    """Whether a Ctrl-C came during an import and has not been raised yet (the command ended
    first, or is ending): it is then raised by the caller, `one_line_errors`. Clears it."""
    global _pending
    was, _pending = _pending, False
    if _timer is not None:
        _timer.cancel()
    return was


def finished() -> None:
    """The command's body is over and its outcome printed: a Ctrl-C now (a slow exit) ends the
    process at once with exit 130, printing nothing more."""
    if _prog is not None:
        signal.signal(signal.SIGINT, _exit_quietly)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    _flush()
    try:
        os.write(2, f"\n{_prog}: {STARTING}\n".encode())
    except OSError:
        pass
    os._exit(INTERRUPT_EXIT)


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    _flush()
    os._exit(INTERRUPT_EXIT)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the signal came in the middle of a write to it: its bytes are lost
            pass


def importing(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside an import (the import machinery is among its callers)."""
    while frame is not None:
        if frame.f_globals.get("__name__") in _IMPORTING:
            return True
        frame = frame.f_back
    return False


def _interrupt_outside_imports(signum: int, frame: FrameType | None) -> None:
    global _pending, _timer
    if importing(frame):  # look again shortly, until the import is done
        _pending = True
        _timer = threading.Timer(_RETRY_S, os.kill, (os.getpid(), signal.SIGINT))
        _timer.daemon = True
        _timer.start()
        return
    _pending = False
    raise KeyboardInterrupt
