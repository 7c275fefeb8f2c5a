"""fxpass.fileio: input files are regular files; outputs are written atomically."""

from __future__ import annotations

import os

import pytest

from fxpass.errors import FxpassError
from fxpass.fileio import atomic_write_bytes, check_input_file, write_dir_atomically


def test_input_must_be_a_regular_file(tmp_path):
    with pytest.raises(FxpassError, match="no such file"):
        check_input_file(tmp_path / "missing.onnx")
    with pytest.raises(FxpassError, match="is a directory"):
        check_input_file(tmp_path)
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    with pytest.raises(FxpassError, match="not a regular file"):  # and it does not block
        check_input_file(fifo)
    ok = tmp_path / "ok.onnx"
    ok.write_bytes(b"x")
    assert check_input_file(ok) == ok


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")

    def fail(fh):
        fh.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(out, fail)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    atomic_write_bytes(out, lambda fh: fh.write(b"new"))
    assert out.read_bytes() == b"new"


def test_write_dir_atomically_replaces_only_with_force(tmp_path):
    out = tmp_path / "set"
    write_dir_atomically(out, lambda d: (d / "a.json").write_text("1"), force=False)
    with pytest.raises(FxpassError, match="already exists"):
        write_dir_atomically(out, lambda d: (d / "a.json").write_text("2"), force=False)
    write_dir_atomically(out, lambda d: (d / "a.json").write_text("2"), force=True)
    assert (out / "a.json").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_exclusive_write_fails_when_the_path_appears_meanwhile(tmp_path):
    out = tmp_path / "new.pt"

    def racing(fh):
        fh.write(b"mine")
        out.write_bytes(b"theirs")  # another run got there first

    with pytest.raises(FxpassError, match="already exists"):
        atomic_write_bytes(out, racing, exclusive=True)
    assert out.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == ["new.pt"]


def test_sigint_while_the_temp_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    import signal
    import tempfile

    real = tempfile.mkstemp

    def interrupted(*args, **kwargs):
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # lands while the temp file is being created
        return made

    monkeypatch.setattr(tempfile, "mkstemp", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "out.bin", lambda fh: fh.write(b"data"))
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_write_leaves_no_partial_file(tmp_path):
    import subprocess
    import sys

    script = (
        "import os, signal, sys, time\n"
        "from fxpass.cli import Terminated, _on_sigterm\n"
        "from fxpass.fileio import atomic_write_bytes\n"
        "signal.signal(signal.SIGTERM, _on_sigterm)\n"
        "def write(fh):\n"
        "    fh.write(b'x' * 100000); fh.flush(); os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n"
        "try:\n"
        "    atomic_write_bytes(sys.argv[1], write)\n"
        "except Terminated:\n"
        "    print('terminated')\n"
    )
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "terminated", result.stderr
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
