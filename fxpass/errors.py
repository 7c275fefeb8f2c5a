"""Errors meant for people: one line naming the file and what is wrong."""


class FxpassError(Exception):
    """A failure the user can act on; the CLI prints ``str(err)`` on one line and exits non-zero."""

    exit_code = 2
    #: the model itself is refused (not the means of one capture route): no other route is tried
    model_refused = False

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), at most ``limit`` chars."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
