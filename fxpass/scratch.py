"""One scratch folder per command, so that a killed run leaves nothing behind for good.

Int8 calibration, the ``.ort`` and ``.mlpackage`` writers and the converters fxpass calls (coremltools,
ExecuTorch, LiteRT) make temporary folders through :mod:`tempfile`.  ``finally`` blocks remove them when a
command ends, fails or is interrupted (SIGINT, SIGTERM), but not after SIGKILL or a power cut.  While a
command runs, :func:`scratch_folder` points :mod:`tempfile` at ``fxpass-run-<pid>-XXXXXXXX`` in the system's
temporary directory, so every temporary file of the run, the converters' included, lies in that one folder;
the next command removes the folders of runs whose process is gone (only its own user's, only that name).

Only Python's :mod:`tempfile` is redirected, not the ``TMPDIR`` environment variable: subprocesses (Ray's
raylet and its sockets, whose paths have a length limit) keep the system's directory.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .fileio import process_alive

PREFIX = "fxpass-run-"
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)-[A-Za-z0-9_]+$")


def sweep(base: str | Path) -> list[Path]:
    """Remove the scratch folders in ``base`` that runs now gone left behind (this user's only); the removed."""
    removed = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        match = _NAME.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or process_alive(int(match.group(1))):
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


@contextmanager
def scratch_folder():
    """While the block runs, :mod:`tempfile` makes everything inside this process's own scratch folder (yielded;
    None where the temporary directory cannot be written), which is removed at the end; the folders of killed
    runs are removed first."""
    base = tempfile.gettempdir()
    sweep(base)
    try:
        folder = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base)
    except OSError:  # a temporary directory fxpass cannot write to: the command says so where it needs one
        yield None
        return
    previous = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield Path(folder)
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)
