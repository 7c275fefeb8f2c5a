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


#: a config file (YAML or JSON) larger than this is not one
MAX_CONFIG_BYTES = 1 << 20

#: what reading a JSON or YAML text can raise on a bad file (JSONDecodeError and UnicodeDecodeError are ValueErrors;
#: a document nested thousands of levels deep exhausts the parser's recursion)
PARSE_ERRORS = (ValueError, RecursionError)


def parse_reason(exc: BaseException) -> str:
    """Why a JSON/YAML text could not be read, for a one-line message."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if hasattr(exc, "msg") and hasattr(exc, "lineno"):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return first_line(exc, 200)


def short_repr(value: object) -> str:
    """``repr(value)`` cut to a few items and levels: a user's value quoted in a message stays short, whatever its
    size (a YAML alias bomb shares one list a billion times over; its full repr would never finish)."""
    import reprlib

    shortener = reprlib.Repr()  # Python 3.11's takes no keyword arguments
    shortener.maxlevel, shortener.maxstring, shortener.maxother, shortener.maxlong = 2, 80, 80, 40
    shortener.maxtuple = shortener.maxlist = shortener.maxdict = shortener.maxset = 4
    return shortener.repr(value)


def ort_reason(exc: BaseException) -> str:
    """ONNX Runtime's error without its "[ONNXRuntimeError] : N : CODE : ... Load model from X failed:" and C++
    source-location prefixes (other errors: their first line)."""
    import re

    text = first_line(exc)
    if "[ONNXRuntimeError]" not in text:
        return text[:200]
    text = text.rsplit(" failed:", 1)[-1].strip() if " failed:" in text else \
        re.sub(r"^.*?\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^\S+\.(?:cc|h|cpp):\d+ .*?\(\)\s*", "", text)
    return text[:200]
