"""``fxpass init`` / ``fxpass inspect`` and the CLI's error contract.

Bad input gives one line on stderr (``fxpass: error: <file>: <what is wrong>``), a non-zero exit, no
traceback unless ``--debug``, nothing written and nothing executed.  Most runs are in-process
(``fxpass.cli.main``); two subprocess runs prove the real exit code and stderr.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxpass.checkpoint import init_model, load_model
from fxpass.cli import main
from fxpass.errors import FxpassError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at 80 columns otherwise


class CodePayload:
    """Unpickling this calls ``open(marker, "w")``: the marker appears if the pickle's code runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def listing(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def fails(capsys, argv) -> str:
    """Run ``fxpass argv`` in-process; assert the error contract and return the one stderr line."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc != 0
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fxpass: error: ")
    return lines[0]


# ---- help ----------------------------------------------------------------------------------------
def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("init", "inspect", "lower", "check"):
        assert command in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: fxpass" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("fxpass ")


# ---- init ----------------------------------------------------------------------------------------
def test_init_is_deterministic_per_seed(tmp_path, capsys, small_yaml, small_cfg):
    for name, seed in (("a.pt", 1), ("b.pt", 1), ("c.pt", 2)):
        assert main(["init", str(tmp_path / name), "--config", str(small_yaml), "--seed", str(seed)]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"wrote {tmp_path / name}: seeded random U-Net (seed {seed}), 1,679,782 parameters")
    a, b, c = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pt", "b.pt", "c.pt"))
    assert list(a) == list(b) == list(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a if a[k].ndim > 1)
    expected = init_model(small_cfg, seed=1).state_dict()
    assert all(torch.equal(a[k], expected[k]) for k in a)


def test_init_output_is_far_from_zero(tmp_path, capsys, small_yaml):
    path = tmp_path / "m.pt"
    assert main(["init", str(path), "--config", str(small_yaml)]) == 0  # seed 0 by default
    model = load_model(path, small_yaml)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 999]))
    assert out.std() > 1e-2, f"output std {out.std():.3g}"  # guided-diffusion's zero init would give 0


def test_init_refuses_an_existing_output_unless_forced(tmp_path, capsys, small_yaml, small_cfg):
    path = tmp_path / "m.pt"
    path.write_bytes(b"precious")
    line = fails(capsys, ["init", path, "--config", small_yaml])
    assert line == f"fxpass: error: {path}: already exists (pass --force to overwrite)"
    assert path.read_bytes() == b"precious"
    assert main(["init", str(path), "--config", str(small_yaml), "--force"]) == 0
    written, expected = load_model(path, small_yaml).state_dict(), init_model(small_cfg, seed=0).state_dict()
    assert list(written) == list(expected) and all(torch.equal(written[k], expected[k]) for k in expected)


def test_init_and_inspect_camus(tmp_path, capsys):
    path = tmp_path / "camus.pt"
    assert main(["init", str(path), "--seed", "0"]) == 0
    assert "41,125,062 parameters" in capsys.readouterr().out
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "built-in CAMUS default" in out and "41,125,062" in out
    assert "float32 (612 tensors)" in out and "156.9 MiB" in out


# ---- inspect -------------------------------------------------------------------------------------
def test_inspect_prints_config_count_dtypes_size(capsys, small_ckpt, small_yaml):
    assert main(["inspect", str(small_ckpt), "--config", str(small_yaml)]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    assert rows["config"] == str(small_yaml)
    assert rows["model"] == "fxpass.models.unet.UNetModel"
    assert rows["parameters"] == "1,679,782"
    assert rows["dtypes"].startswith("float32 (")
    assert rows["size in memory"] == f"{1_679_782 * 4 / 2**20:.1f} MiB"
    assert rows["file size"].endswith(" MiB") and rows["load time"].endswith(" s")
    assert rows["image_size"] == "32" and rows["num_channels"] == "32" and rows["attention_resolutions"] == "'16,8'"
    assert rows["learn_sigma"] == "True" and rows["timestep_respacing"] == "'50'"


def test_inspect_trusted_pickled_module(tmp_path, capsys, small_ckpt, small_yaml):
    path = tmp_path / "module.pt"
    torch.save(load_model(small_ckpt, small_yaml), path)
    line = fails(capsys, ["inspect", path, "--config", small_yaml])
    assert "refused" in line and "--trust-pickle" in line
    assert main(["inspect", str(path), "--config", str(small_yaml), "--trust-pickle"]) == 0
    assert "1,679,782" in capsys.readouterr().out


# ---- bad input: one line, non-zero exit, nothing written, nothing executed ---------------------------
def test_missing_checkpoint(tmp_path, capsys, small_yaml):
    path = tmp_path / "nope.pt"
    assert fails(capsys, ["inspect", path, "--config", small_yaml]) == f"fxpass: error: {path}: no such file"


def test_empty_checkpoint(tmp_path, capsys, small_yaml):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    assert fails(capsys, ["inspect", path, "--config", small_yaml]) == f"fxpass: error: {path}: file is empty"


def test_random_bytes(tmp_path, capsys, small_yaml):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes((i * 37 + 11) % 256 for i in range(4096)))  # starts with 0x0b: no pickle, no zip
    before = listing(tmp_path)
    line = fails(capsys, ["inspect", path, "--config", small_yaml])
    assert line == f"fxpass: error: {path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    assert listing(tmp_path) == before


def test_truncated_checkpoint(tmp_path, capsys, small_ckpt, small_yaml):
    path = tmp_path / "cut.pt"
    data = small_ckpt.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = fails(capsys, ["inspect", path, "--config", small_yaml])
    assert line == f"fxpass: error: {path}: truncated or corrupt checkpoint (the zip archive has no central directory)"


def test_pickle_that_would_run_code(tmp_path, capsys, small_yaml):
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "evil.pt"
    torch.save({"weights": CodePayload(marker)}, path)
    before = listing(tmp_path)
    line = fails(capsys, ["inspect", path, "--config", small_yaml])
    assert line == (
        f"fxpass: error: {path}: refused: loading this pickle would import and run code (it references io.open); "
        "fxpass loads weights only. If you trust the file, pass --trust-pickle"
    )
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(CodePayload(marker), protocol=2))
    assert "refused" in fails(capsys, ["inspect", raw, "--config", small_yaml])
    assert not marker.exists()
    assert listing(tmp_path).keys() == before.keys() | {"evil.pkl"}


def test_checkpoint_of_another_config(capsys, small_ckpt):
    line = fails(capsys, ["inspect", small_ckpt])  # the small checkpoint against the built-in CAMUS config
    assert line.startswith(f"fxpass: error: {small_ckpt}: checkpoint does not match the config: shape mismatch "
                           "time_embed.0.weight (128, 32) vs (256, 64)")
    assert "; probably: num_channels: checkpoint has 32, config says 64; " in line


def test_yaml_with_a_bad_value(tmp_path, capsys, write_yaml, small_values):
    config = write_yaml(tmp_path / "bad.yml", {**small_values, "num_channels": "lots"})
    out = tmp_path / "m.pt"
    line = fails(capsys, ["init", out, "--config", config])
    assert line == f"fxpass: error: {config}: num_channels: must be an integer (got 'lots')"
    assert not out.exists()


def test_yaml_with_an_unknown_key(tmp_path, capsys, write_yaml, small_values):
    config = write_yaml(tmp_path / "typo.yml", {**small_values, "num_res_block": 2})
    out = tmp_path / "m.pt"
    line = fails(capsys, ["init", out, "--config", config])
    assert line.startswith(f"fxpass: error: {config}: unknown model key 'num_res_block' (known: ")
    assert not out.exists()


def test_missing_yaml(tmp_path, capsys, small_ckpt):
    config = tmp_path / "nope.yml"
    line = fails(capsys, ["inspect", small_ckpt, "--config", config])
    assert line == f"fxpass: error: {config}: config file not found"


def test_output_under_a_regular_file(tmp_path, capsys, small_yaml):
    # chmod does not stop root, so "unwritable" here is a path whose parent is a file
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    out = regular / "m.pt"
    line = fails(capsys, ["init", out, "--config", small_yaml])
    assert line == f"fxpass: error: {out}: directory {regular} is not a directory"
    assert listing(tmp_path) == {"file.txt": b"x"}


def test_output_in_a_missing_directory(tmp_path, capsys, small_yaml):
    out = tmp_path / "nodir" / "m.pt"
    line = fails(capsys, ["init", out, "--config", small_yaml])
    assert line == f"fxpass: error: {out}: directory {tmp_path / 'nodir'} does not exist"
    assert not (tmp_path / "nodir").exists()


def test_unwritable_output_fails_before_building_the_model(tmp_path, capsys, monkeypatch):
    import fxpass.checkpoint

    def must_not_run(*args, **kwargs):
        raise AssertionError("init_model ran although the output cannot be written")

    monkeypatch.setattr(fxpass.checkpoint, "init_model", must_not_run)
    out = tmp_path / "nodir" / "camus.pt"
    assert "does not exist" in fails(capsys, ["init", out])


def test_failed_run_does_not_clobber_an_existing_output(tmp_path, capsys, small_yaml, write_yaml, small_values,
                                                       monkeypatch):
    out = tmp_path / "m.pt"
    out.write_bytes(b"precious")
    bad = write_yaml(tmp_path / "bad.yml", {**small_values, "dropout": 2})
    fails(capsys, ["init", out, "--force", "--config", bad])
    assert out.read_bytes() == b"precious"

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    line = fails(capsys, ["init", out, "--force", "--config", small_yaml])
    assert line == f"fxpass: error: {out}: cannot write (No space left on device)"
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yml", "m.pt"]  # no temp file left


def test_debug_shows_the_traceback(tmp_path, capsys, small_yaml):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(FxpassError, match="file is empty"):
        main(["--debug", "inspect", str(path), "--config", str(small_yaml)])
    with pytest.raises(FxpassError, match="file is empty"):
        main(["inspect", str(path), "--config", str(small_yaml), "--debug"])


def test_unexpected_failure_is_one_line_too(tmp_path, capsys, small_ckpt, small_yaml, monkeypatch):
    import fxpass.checkpoint

    def boom(*args, **kwargs):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(fxpass.checkpoint, "load_model", boom)
    rc = main(["inspect", str(small_ckpt), "--config", str(small_yaml)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == "fxpass: internal error: ValueError: boom (rerun with --debug for the traceback)\n"
    with pytest.raises(ValueError):
        main(["--debug", "inspect", str(small_ckpt), "--config", str(small_yaml)])


# ---- the real process ----------------------------------------------------------------------------
def _run(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fxpass", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_process_exit_code_and_single_line(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"")
    before = listing(tmp_path)
    quiet = _run("inspect", "broken.pt", cwd=tmp_path)
    assert quiet.returncode == 2
    assert quiet.stdout == ""
    assert quiet.stderr == "fxpass: error: broken.pt: file is empty\n"

    loud = _run("--debug", "inspect", "broken.pt", cwd=tmp_path)
    assert loud.returncode != 0
    assert "Traceback (most recent call last)" in loud.stderr
    assert "fxpass.errors.FxpassError: broken.pt: file is empty" in loud.stderr
    assert listing(tmp_path) == before

