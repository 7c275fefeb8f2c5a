"""Files in and out, torch-free (``fxpass sample`` must not import torch).

Inputs: :func:`check_input_file` (a regular, readable file: not a directory, pipe or device).
Outputs: :func:`check_writable_target` before long work; :func:`atomic_write_bytes` and
:func:`write_dir_atomically` write to a temporary beside the target and rename it into place, so a
failed run never leaves a half-written output.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import FxpassError


def check_input_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path when it is a regular file; one-line errors otherwise (never blocks on a pipe)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FxpassError(f"{path}: no such file") from None
    except OSError as exc:
        raise FxpassError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise FxpassError(f"{path}: is a directory, expected {what}")
    if not stat.S_ISREG(st.st_mode):
        raise FxpassError(f"{path}: not a regular file (a pipe, socket or device), expected {what}")
    return path


def check_model_file(path: str | os.PathLike) -> Path:
    return check_input_file(path, "an ONNX model")


def check_writable_target(path: str | os.PathLike) -> Path:
    """Fail early, before long work, when ``path`` cannot be an output file."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise FxpassError(f"{path}: directory {parent} {why}")
    if path.is_dir():
        raise FxpassError(f"{path}: is a directory")
    return path


def _umask_mode(bits: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return bits & ~mask


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _HeldSignals:
    """SIGINT/SIGTERM recorded instead of handled until :meth:`release`, which restores the handlers and
    replays what arrived.  Used around creating a temporary: the release happens inside the ``try``
    that removes it, so an interrupt lands either before the temporary exists or where its cleanup
    runs.  Python-level handlers, so it holds whichever thread the OS delivers the signal to (only the
    main thread may install handlers; elsewhere it does nothing)."""

    def __init__(self):
        self.pending: list[int] = []
        self.saved: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self.saved[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        self.pending.append(signum)

    def release(self) -> None:
        saved, self.saved = self.saved, {}
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in self.pending:
            handler = saved[sig]
            if callable(handler):
                handler(sig, None)
            elif handler != signal.SIG_IGN:
                signal.raise_signal(sig)


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                       exclusive: bool = False) -> None:
    """Call ``write(fh)`` on a temp file beside ``path``, then rename it into place.

    On any failure or interrupt (SIGINT; SIGTERM once :func:`fxpass.cli.main` turns it into an
    exception) the temp file is removed and ``path`` is left as it was.  ``exclusive``: the file is
    created only if ``path`` does not exist at that moment (of two runs racing for one new path, one
    fails with "already exists").  A SIGKILL can leave a ``.NAME.*.tmp`` file beside ``path``.
    """
    path = check_writable_target(path)
    held = _HeldSignals()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        held.release()
        raise FxpassError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        held.release()
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, _umask_mode(0o666))  # mkstemp makes 0600; give the usual umask-based mode
        if exclusive:
            os.link(tmp, path)  # fails if path appeared meanwhile
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except FileExistsError:
        Path(tmp).unlink(missing_ok=True)
        raise FxpassError(f"{path}: already exists (pass --force to overwrite)") from None
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise FxpassError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dir_atomically(out: Path, fill: Callable[[Path], None], force: bool) -> None:
    """``fill(tmpdir)`` writes the files; then the temp dir becomes ``out`` (replacing it with ``force``)."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FxpassError(f"{out}: directory {parent} does not exist")
    if out.exists() and not force:
        raise FxpassError(f"{out}: already exists (pass --force to overwrite)")
    if out.exists() and not out.is_dir():
        raise FxpassError(f"{out}: exists and is not a directory")
    held = _HeldSignals()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        held.release()
        raise FxpassError(f"{out}: cannot write ({exc.strerror or exc})") from None
    old = None
    try:
        held.release()
        fill(tmp)
        os.chmod(tmp, _umask_mode(0o777))
        if out.exists():
            old = parent / f".{out.name}.{os.getpid()}.old"
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise FxpassError(f"{out}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
