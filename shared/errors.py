"""Errors a user can act on: the CLIs print them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or a state the user must resolve; the message says what to do."""


class DumpError(UserError):
    """A dump on disk is missing, incomplete, corrupted or does not match what was asked."""
