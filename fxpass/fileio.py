"""Files in and out, torch-free (``fxpass sample`` must not import torch): fxpass's output policy.

Inputs: :func:`check_input_file` (a regular, readable file: not a directory, pipe or device).

Outputs, the same rules for every command: :func:`plan_outputs` checks them all before any long work
(the directory exists and is writable; not the same file as any input, symlinks and hard links
resolved; not the same as another output; an existing one needs ``--force``).  :class:`Transaction`
then writes them together or not at all: each is staged as an unnamed temporary file in its own
directory as ``.NAME.fxpass-PID-*.tmp`` and all are renamed into place only at commit; a failure or
an interrupt (SIGINT, and SIGTERM once :func:`fxpass.cli.main` turns it into an exception) removes
what this run staged and leaves existing files as they were.  A SIGKILL cannot be caught: its
temporaries are removed by the next fxpass run that writes into that directory
(:func:`sweep_stale_temps`).  :func:`atomic_write_bytes` is a one-file
transaction; :func:`write_dir_atomically` does the same for a directory.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import shutil
import signal
import stat
import threading
from collections.abc import Callable
from contextlib import contextmanager
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


#: protobuf cannot parse a message over 2 GiB: a bigger .onnx file is not one (large weights go to external data)
MAX_ONNX_BYTES = 2**31


def check_model_file(path: str | os.PathLike) -> Path:
    path = check_input_file(path, "an ONNX model")
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES and path.suffix.lower() == ".onnx":
        raise FxpassError(f"{path}: {size / 2**30:,.1f} GiB, not an ONNX file (protobuf reads at most 2 GiB; "
                          "larger models keep their weights as external data)")
    return path


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


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file: the same resolved path, or (both existing) one inode."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def plan_outputs(outputs: dict[str, str | os.PathLike | None], *, inputs=(), force: bool = False,
                 directories: tuple[str, ...] = ()) -> dict[str, Path]:
    """Check every output before work starts; returns ``{option: Path}`` for the given ones.

    ``outputs`` maps an option name (for messages, e.g. ``"-o"``) to a path or None; ``inputs`` are
    the run's input paths (None entries ignored); options in ``directories`` are output directories.
    """
    planned: dict[str, Path] = {}
    sources = [Path(p) for p in inputs if p is not None]
    for option, value in outputs.items():
        if value is None:
            continue
        path = Path(value)
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            why = "is not a directory" if parent.exists() else "does not exist"
            raise FxpassError(f"{path}: directory {parent} {why}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise FxpassError(f"{path}: directory {parent} is not writable")
        for source in sources:
            if _same_file(path, source) or (option in directories and source.resolve().is_relative_to(path.resolve())):
                raise FxpassError(f"{path}: {option} is the input file {source}; refusing to overwrite an input")
            if source.is_dir() and path.resolve().is_relative_to(source.resolve()):
                raise FxpassError(f"{path}: {option} is inside the input directory {source}; refusing to write "
                                  "among the inputs")
        for other, taken in planned.items():
            if _same_file(path, taken):
                raise FxpassError(f"{path}: {option} is the same file as {other}")
        if option in directories:
            if path.exists() and not path.is_dir():
                raise FxpassError(f"{path}: exists and is not a directory")
        elif path.is_dir():
            raise FxpassError(f"{path}: is a directory")
        if (path.exists() or path.is_symlink()) and not force:
            raise FxpassError(f"{path}: already exists (pass --force to overwrite)")
        planned[option] = path
    return planned


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


TEMP_MARK = ".fxpass-"


def _temp_name(final: Path) -> Path:
    return final.parent / f".{final.name}{TEMP_MARK}{os.getpid()}-{os.urandom(3).hex()}.tmp"


def sweep_stale_temps(directory: Path) -> list[Path]:
    """Remove temporaries that an fxpass run killed with SIGKILL left in ``directory`` (their process is
    gone); returns what was removed.  Called before every write, so such leftovers live only until
    the next run."""
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp") and TEMP_MARK in name):
            continue
        try:
            pid = int(name.rsplit(TEMP_MARK, 1)[1].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid() or process_alive(pid):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (another user's counts as existing)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    except OSError:
        return True
    return True


class Transaction:
    """Outputs written together or not at all (see the module docstring).

    ``with Transaction() as tx: tx.add_bytes(path, write)`` …; the files appear when the block ends
    without an exception, each renamed from a temporary beside it.
    """

    def __init__(self, *, exclusive: bool = False):
        self._staged: list[tuple[Path, Path]] = []  # (final, temporary)
        self.exclusive = exclusive

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.commit(exclusive=self.exclusive)
        else:
            self.abort()

    def add_bytes(self, path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
        """Stage ``path``: ``write(fh)`` fills its temporary."""
        path = check_writable_target(path)
        sweep_stale_temps(path.parent)
        held = _HeldSignals()
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _umask_mode(0o666))
        except OSError as exc:
            held.release()
            raise FxpassError(f"{path}: cannot write ({exc.strerror or exc})") from None
        self._staged.append((path, tmp))
        with self._undone_on_failure(lambda: path):
            held.release()
            with os.fdopen(fd, "wb") as fh:
                write(fh)

    def commit(self, *, exclusive: bool = False) -> None:
        """Rename every staged file into place (``exclusive``: only where no path exists yet, all or none: of
        two runs racing for the same new outputs, one fails with "already exists" and leaves nothing)."""
        current, linked = [None], []
        with self._undone_on_failure(lambda: current[0], linked):
            for final, tmp in self._staged:
                current[0] = final
                if exclusive:
                    os.link(tmp, final)  # fails if the path appeared meanwhile
                    linked.append(final)
                else:
                    os.replace(tmp, final)
            for final, tmp in self._staged if exclusive else ():
                os.unlink(tmp)
        self._staged = []

    @contextmanager
    def _undone_on_failure(self, where: Callable[[], Path | None], linked: list[Path] = ()):
        """Any failure or interrupt inside removes everything staged and every path ``linked`` into place by
        this exclusive commit (none existed before it); OS errors become one line naming the file."""
        try:
            yield
        except BaseException as exc:
            for final in linked:
                final.unlink(missing_ok=True)
            self.abort()
            if isinstance(exc, FileExistsError):
                raise FxpassError(f"{where()}: already exists (pass --force to overwrite)") from None
            if isinstance(exc, OSError):
                raise FxpassError(f"{where()}: cannot write ({exc.strerror or exc})") from None
            raise

    def abort(self) -> None:
        for _, tmp in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                       exclusive: bool = False) -> None:
    """Write one file as a :class:`Transaction`: on any failure or interrupt ``path`` is left as it was.

    ``exclusive``: created only if ``path`` does not exist at that moment (of two runs racing for one
    new path, one fails with "already exists").
    """
    tx = Transaction()
    tx.add_bytes(path, write)
    tx.commit(exclusive=exclusive)


def write_dir_atomically(out: Path, fill: Callable[[Path], None], force: bool) -> None:
    """``fill(tmpdir)`` writes the files; then the temp dir becomes ``out`` (replacing it with ``force``)."""
    if out.exists() and not force:
        raise FxpassError(f"{out}: already exists (pass --force to overwrite)")
    if out.exists() and not out.is_dir():
        raise FxpassError(f"{out}: exists and is not a directory")
    with staged_path(out) as staged:
        staged.mkdir()
        fill(staged)
        os.chmod(staged, _umask_mode(0o777))


def _replace(src: Path, out: Path) -> None:
    """Rename ``src`` onto ``out``.  A directory replacing an existing ``out`` moves it aside first and removes it
    after; on failure the old one is put back."""
    old = None
    try:
        if src.is_dir() and out.exists():
            old = out.parent / f".{out.name}{TEMP_MARK}{os.getpid()}-old.tmp"
            os.replace(out, old)
        os.replace(src, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


#: whether :func:`staged_path` creates its output only where nothing exists yet (:func:`exclusive_outputs`)
_EXCLUSIVE = contextvars.ContextVar("fxpass_exclusive_outputs", default=False)


@contextmanager
def exclusive_outputs(exclusive: bool = True):
    """Inside the block, :func:`staged_path` puts its output in place only if the path does not exist at that
    moment: of two runs racing for one new ``.ort``/``.pte``/``.tflite``/``.mlpackage``, one fails with
    "already exists" (the mobile-format writers take a path, not a flag, so the write stage sets it here)."""
    token = _EXCLUSIVE.set(exclusive)
    try:
        yield
    finally:
        _EXCLUSIVE.reset(token)


def _claim(staged: Path, out: Path) -> None:
    """Put ``staged`` at ``out`` only where no path exists: a file by hard link; a directory by creating ``out``
    (which fails if it exists) and renaming onto that empty directory of its own."""
    try:
        if not staged.is_dir():
            os.link(staged, out)
            return
        os.mkdir(out)
    except FileExistsError:
        raise FxpassError(f"{out}: already exists (pass --force to overwrite)") from None
    try:
        os.replace(staged, out)
    except BaseException:  # the empty directory claimed for it is not left behind
        os.rmdir(out)
        raise


@contextmanager
def staged_path(out: str | os.PathLike):
    """A path to write ``out`` (a file or a directory) to, inside a temporary directory beside it; renamed onto
    ``out`` when the block ends without an exception, removed otherwise (for writers that need a path, such
    as the mobile-format converters).  Refusing an existing ``out`` is :func:`plan_outputs`'s business; inside
    :func:`exclusive_outputs`, one that appeared meanwhile is refused too."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FxpassError(f"{out}: directory {parent} does not exist")
    held = _HeldSignals()
    try:
        sweep_stale_temps(parent)
        tmp = _temp_name(out)
        tmp.mkdir()
    except OSError as exc:
        held.release()
        raise FxpassError(f"{out}: cannot write ({exc.strerror or exc})") from None
    try:
        held.release()
        staged = tmp / out.name
        yield staged
        if not staged.exists():
            raise FxpassError(f"{out}: nothing was written")
        _claim(staged, out) if _EXCLUSIVE.get() else _replace(staged, out)
    except OSError as exc:
        raise FxpassError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
