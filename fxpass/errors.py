"""Errors meant for people: one line naming the file and what is wrong."""


class FxpassError(Exception):
    """A failure the user can act on; the CLI prints ``str(err)`` on one line and exits non-zero."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code
