"""The ``fxpass`` command: ``main``, the error mapping, and one module per command.

Each command module has ``add_parser(sub, common)`` and ``run(args)``; it parses arguments and calls
library functions (pipeline, verify, golden, sampler), holding no lowering, checking or format logic.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from .. import __version__
from ..errors import FxpassError, first_line, short_repr
from . import check, evaluate, golden, init, inspect, lower, sample

COMMANDS = (init, inspect, lower, check, golden, sample, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxpass",
        description="Lower guided-diffusion / RePaint U-Nets to ONNX through torch.fx rewrites.",
    )
    parser.add_argument("--version", action="version", version=f"fxpass {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    names = ",".join(command.__name__.rsplit(".", 1)[-1] for command in COMMANDS)
    sub = parser.add_subparsers(dest="command", metavar="{" + names + "}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


class Terminated(BaseException):
    """SIGTERM as an exception, so that ``finally``/cleanup code runs (temporary files are removed)."""


def _on_sigterm(signum, frame):
    raise Terminated()


class ProcessExit(SystemExit):
    """``os._exit`` called by code a command runs (a user's model): raised instead of ending the process at once,
    so that the command says so in one line and its temporary files are removed."""


def _refusing_os_exit(real_exit, pid: int):
    def refuse(code: int = 0):
        if os.getpid() != pid:  # a forked child ends as it asked: only this process's own command is guarded
            real_exit(code)
        raise ProcessExit(code)

    return refuse


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    else:
        previous = None
    from ..scratch import scratch_folder

    real_exit, os._exit = os._exit, _refusing_os_exit(os._exit, os.getpid())
    try:
        with scratch_folder():
            return _run(args)
    finally:
        os._exit = real_exit
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


#: OSErrors that are about the path a user gave, not fxpass: said as one line naming the path
_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EACCES, errno.EROFS})


#: an error line longer than this loses its middle (a message quoting long names or values); its start says what
#: failed and its end what to do; --debug raises it whole
MAX_ERROR_CHARS = 800


def _shortened(message: str) -> str:
    if len(message) <= MAX_ERROR_CHARS:
        return message
    cut = f" … ({len(message) - MAX_ERROR_CHARS:,} characters left out; --debug shows all) … "
    return message[:MAX_ERROR_CHARS // 2] + cut + message[-(MAX_ERROR_CHARS // 2 - len(cut)):]


def _run(args) -> int:
    try:
        return int(args.func(args) or 0)
    except FxpassError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"fxpass: error: {_shortened(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fxpass: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # no command of fxpass's exits this way: the model's code (or a library it runs) did
        if getattr(args, "debug", False):
            raise
        call = "os._exit" if isinstance(exc, ProcessExit) else "sys.exit"
        print(f"fxpass: error: code run for {args.command or 'this command'} called {call}({short_repr(exc.code)}) "
              "(the model's own code, or a library it calls); stopped there, nothing written", file=sys.stderr)
        return 2
    except Terminated:
        print("fxpass: terminated", file=sys.stderr)
        return 143
    except OSError as exc:
        if getattr(args, "debug", False) or exc.errno not in _PATH_ERRNOS:
            raise
        # a path the file system refuses (a name over 255 bytes, a loop of links): the path and why, shortened
        name = str(exc.filename or "a path")
        shown = name if len(name) <= 120 else f"{name[:60]}…{name[-40:]} ({len(name)} characters)"
        print(f"fxpass: error: {shown}: {exc.strerror}", file=sys.stderr)
        return 2
    except MemoryError:
        if getattr(args, "debug", False):
            raise
        print("fxpass: error: out of memory (the model or its inputs are too large for this machine)",
              file=sys.stderr)
        return 2
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if getattr(args, "debug", False):
            raise
        print(f"fxpass: internal error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
