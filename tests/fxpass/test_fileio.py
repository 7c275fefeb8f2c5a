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
