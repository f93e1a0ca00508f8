"""One line per failure: how every command reports errors to its user.

A `UserError` (bad input, or a state the user must resolve) is a usage error: its message, exit 2.
An `OSError` (disk full, permission denied, a file vanishing) is the machine's fault: its message
and what to do, exit 1. Anything else is a bug: one line asking for a report, exit 1. The traceback
is printed only when the user asks for it, with `MATS_SAE_DEBUG=1` in the environment.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from shared import interrupts
from shared.errors import Interrupted, UserError

DEBUG_ENV = "MATS_SAE_DEBUG"
USAGE_EXIT = 2
FAILURE_EXIT = 1
INTERRUPT_EXIT = interrupts.INTERRUPT_EXIT


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def os_error_line(e: OSError) -> str:
    """What went wrong with the machine, in one line, with the file it concerns when known."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"the disk is full{where}: free some space, then rerun the same command with --resume"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}: choose a folder you can write to"
    if e.errno == errno.EROFS:
        return f"read-only file system{where}: choose a writable folder"
    return f"{e.strerror or e}{where}"


@contextmanager
def one_line_errors(prog: str, interrupted: str = "interrupted",
                    os_hint: Callable[[OSError], str] = os_error_line) -> Iterator[None]:
    """Run a command's body; turn any exception into one line on stderr and an exit code.

    A Ctrl-C is `interrupted`'s line and exit 130 wherever it comes, even in an import (see
    `shared.interrupts`: it is held until the import is done, and raised here if the body ends
    first, whichever way)."""
    try:
        try:
            yield
        finally:
            if interrupts.interrupted_meanwhile():
                raise KeyboardInterrupt  # replaces whatever the body raised: the user stopped it first
    except Interrupted as e:
        _fail(prog, str(e), INTERRUPT_EXIT, label="")
    except UserError as e:
        _fail(prog, str(e), USAGE_EXIT)
    except KeyboardInterrupt:
        _fail(prog, interrupted, INTERRUPT_EXIT, label="")
    except OSError as e:
        _fail(prog, os_hint(e), FAILURE_EXIT)
    except (click.exceptions.Exit, click.exceptions.ClickException, SystemExit):
        raise
    except Exception as e:  # a bug: say so in one line, keep the traceback for whoever asks
        _fail(prog, f"internal error ({type(e).__name__}: {e}); rerun with {DEBUG_ENV}=1 for the "
                    "traceback and report it", FAILURE_EXIT)
    finally:
        interrupts.finished()


def _fail(prog: str, message: str, code: int, label: str = "error: ") -> None:
    if debugging():
        traceback.print_exc()
    message = " ".join(str(message).split("\n"))  # always one line
    click.echo(f"{prog}: {label}{message}", err=True)
    sys.exit(code)
