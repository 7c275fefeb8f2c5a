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


def test_an_exclusive_transaction_losing_the_race_leaves_none_of_its_files(tmp_path):
    from fxpass.fileio import Transaction

    model, report = tmp_path / "m.onnx", tmp_path / "m.json"

    def racing(fh):
        fh.write(b"my report")
        report.write_bytes(b"their report")  # the other run wrote the report path first

    with pytest.raises(FxpassError, match=f"{report}: already exists"):
        with Transaction(exclusive=True) as tx:
            tx.add_bytes(model, lambda fh: fh.write(b"my model"))
            tx.add_bytes(report, racing)
    # the model this run linked into place is taken back: both or neither, and theirs is untouched
    assert not model.exists() and report.read_bytes() == b"their report"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    with Transaction(exclusive=True) as tx:  # on free paths it writes all of them
        tx.add_bytes(model, lambda fh: fh.write(b"m"))
        tx.add_bytes(tmp_path / "n.json", lambda fh: fh.write(b"n"))
    assert model.read_bytes() == b"m" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx", "n.json"]


def test_two_samples_racing_for_one_new_output_one_fails(tmp_path, monkeypatch, capsys, tiny_onnx):
    """The second run plans its output while it is free, but the first writes it before the second commits."""
    from check_helpers import cli, gray_image_and_half_mask

    import fxpass.fileio as fileio

    img, mask = gray_image_and_half_mask(tmp_path, 32)
    out = tmp_path / "r.png"
    real = fileio.Transaction.commit

    def other_run_first(self, *, exclusive=False):
        out.write_bytes(b"the other run's image")
        return real(self, exclusive=exclusive)

    monkeypatch.setattr(fileio.Transaction, "commit", other_run_first)
    rc, _, err = cli(capsys, "sample", tiny_onnx, "--image", img, "--mask", mask, "-o", out, "--sampler", "ddim",
                     "--steps", 2)
    assert rc == 2 and f"{out}: already exists" in err and out.read_bytes() == b"the other run's image"


def test_sigint_while_the_temp_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    import signal

    real = os.open

    def interrupted(path, *args, **kwargs):
        made = real(path, *args, **kwargs)
        if str(path).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGINT)  # lands while the temp file is being created
        return made

    monkeypatch.setattr(os, "open", interrupted)
    # Python's own SIGINT handler, whatever an earlier test in this worker imported (Ray, LiteRT and OpenVINO
    # install their own): the test is about a KeyboardInterrupt reaching fxpass mid-write
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write_bytes(tmp_path / "out.bin", lambda fh: fh.write(b"data"))
    finally:
        signal.signal(signal.SIGINT, previous)
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


def test_temporaries_of_a_killed_run_are_swept_by_the_next(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.bin.fxpass-{int(dead.stdout)}-abc123.tmp"
    stale.write_bytes(b"left by SIGKILL")
    mine = tmp_path / f".other.fxpass-{os.getpid()}-abc123.tmp"  # a live process's: kept
    mine.write_bytes(b"in use")
    atomic_write_bytes(tmp_path / "out.bin", lambda fh: fh.write(b"new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "out.bin"])


def test_plan_outputs_refuses_inputs_links_duplicates_and_existing(tmp_path):
    from fxpass.fileio import plan_outputs

    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"weights")
    link = tmp_path / "link.pt"
    link.symlink_to(ck)
    hard = tmp_path / "hard.pt"
    os.link(ck, hard)
    for out in (ck, link, hard, tmp_path / "." / "ck.pt"):
        with pytest.raises(FxpassError, match="is the input file"):
            plan_outputs({"-o": out}, inputs=[ck])
    with pytest.raises(FxpassError, match="is the same file as -o"):
        plan_outputs({"-o": tmp_path / "a.onnx", "--report": tmp_path / "a.onnx"})
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"")
    with pytest.raises(FxpassError, match="already exists"):
        plan_outputs({"-o": existing})
    assert plan_outputs({"-o": existing, "--report": None}, force=True) == {"-o": existing}
    with pytest.raises(FxpassError, match="is the input file"):
        plan_outputs({"-o": tmp_path}, inputs=[ck], directories=("-o",), force=True)
