"""bench.libraries' own output: an existing --json file is refused before any work, never replaced."""

from __future__ import annotations

import pytest


def test_an_existing_json_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import bench.libraries as libraries

    existing = tmp_path / "figures.json"
    existing.write_text("mine")
    monkeypatch.setattr(libraries, "cases", lambda directory: pytest.fail("lowered before refusing"))
    with pytest.raises(SystemExit) as exc:
        libraries.main(["--json", str(existing)])
    assert exc.value.code == 2 and "already exists (pass --force" in capsys.readouterr().err
    assert existing.read_text() == "mine"
