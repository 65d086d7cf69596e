"""Errors a user can fix, shown by the CLI as one line plus a hint (the traceback only with --debug)."""


class UserError(Exception):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class StoreUnreachable(UserError):
    """The job store refused or dropped the connection while it was being opened: the server may be
    down, restarting, or the URL wrong. A long-running worker waits this out; other commands stop."""
