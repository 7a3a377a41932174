"""Errors a user can cause: shown as one line that says what to do, never a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, with its remedy in the message."""
