"""Errors a user can act on: the CLIs print them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or a state the user must resolve; the message says what to do."""


class DumpError(UserError):
    """A dump on disk is missing, incomplete, corrupted or does not match what was asked."""


class Interrupted(UserError):
    """The user stopped the command (Ctrl-C) and it stopped cleanly: its message says how to go on
    (exit 130, the shell's code for a SIGINT, like a Ctrl-C anywhere else)."""
