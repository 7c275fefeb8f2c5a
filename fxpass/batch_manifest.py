"""``OUTDIR/manifest.json`` of a batch job: what made the outputs, and each image's seed, time and status.

``{"format", "job": {"model": {"path", "sha256"}, "runtime", "seed", "settings"}, "images": {NAME: {"output",
"seed", "seconds", "status": "done"|"failed", "error", "worker"}}}``.  The job part (the model's SHA-256, not
its path; the runtime, the job seed and the sampler settings) is the key: a re-run with the same key skips
each image whose entry is done with the same seed and whose PNG decodes to the model's size; a re-run with
another key is refused unless ``--force`` (then every image is redone).  The manifest is written (atomically)
before the first image, then at most every second and at the end (:data:`fxpass.batch_run.SAVE_EVERY`), so
a crash (``kill -9``) loses at most the last second's entries: a PNG without an entry that decodes, in a
directory whose manifest has the same key, is taken as done and marked ``"recovered"``; a failed image
without its entry is simply run again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import PARSE_ERRORS, FxpassError, parse_reason

FORMAT = "fxpass-batch-manifest/1"
NAME = "manifest.json"


def job_key(job, model_sha: str) -> dict:
    """The part of the manifest that must match for a re-run to keep earlier outputs."""
    return {"model": {"path": str(job.model.resolve()), "sha256": model_sha}, "runtime": job.runtime,
            "seed": job.seed, "settings": dataclasses.asdict(job.settings)}


def _same_key(a: dict, b: dict) -> list[str]:
    """The fields where two job keys differ (the model's path does not count)."""
    differ = [name for name in ("runtime", "seed", "settings") if a.get(name) != b.get(name)]
    if (a.get("model") or {}).get("sha256") != (b.get("model") or {}).get("sha256"):
        differ.insert(0, "model")
    return differ


def png_ok(path: Path, size: int) -> bool:
    """Whether ``path`` is a PNG that decodes to ``size`` x ``size`` pixels."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.format != "PNG" or img.size != (size, size):
                return False
            img.load()
    except Exception:  # noqa: BLE001 - any failure to decode means "not valid"
        return False
    return True


class Manifest:
    """The manifest of one output directory, kept in memory and rewritten atomically by :meth:`save`."""

    def __init__(self, out: Path, key: dict, images: dict | None = None):
        self.path = out / NAME
        self.key = key
        self.images: dict[str, dict] = images or {}

    @classmethod
    def open(cls, out: Path, key: dict, cases, force: bool) -> Manifest:
        """The manifest to continue in ``out``: the existing one when its key matches, a new one with
        ``force`` or where none exists; FxpassError where it is of another job, or where an output exists
        that no manifest accounts for."""
        path = out / NAME
        if force or not path.exists():
            if not force:
                stray = [c.output for c in cases if c.output.exists() or c.output.is_symlink()]
                if stray:
                    raise FxpassError(f"{stray[0]}: already exists and {path} does not say how it was made "
                                      "(pass --force to redo every image)")
            return cls(out, key)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT or not isinstance(doc.get("images"), dict):
                raise ValueError("not a batch manifest")
        except (OSError, *PARSE_ERRORS) as exc:
            raise FxpassError(f"{path}: cannot read it as fxpass's batch manifest ({parse_reason(exc)}); pass --force "
                              "to redo every image") from None
        differ = _same_key(doc.get("job") or {}, key)
        if differ:
            raise FxpassError(f"{path}: made by another job ({', '.join(differ)} differ); use another -o, or pass "
                              "--force to redo every image")
        return cls(out, key, doc["images"])

    def finished(self, case, size: int) -> bool:
        """Whether ``case`` is done and valid: its entry says done with its seed and output, and the PNG
        decodes; a decoding PNG without an entry (a crash between the two writes) is recorded as recovered."""
        entry = self.images.get(case.name)
        if not (case.output.is_file() and png_ok(case.output, size)):
            return False
        if entry is None:
            self.images[case.name] = {"output": case.output.name, "seed": case.seed, "seconds": None,
                                      "status": "done", "error": None, "recovered": True}
            return True
        return entry.get("status") == "done" and entry.get("seed") == case.seed and entry.get("output") == case.output.name

    def record(self, case, result) -> None:
        """Enter one image's outcome (a :class:`fxpass.batch.Result`)."""
        self.images[case.name] = {"output": case.output.name, "seed": case.seed,
                                  "seconds": None if result.seconds is None else round(result.seconds, 3),
                                  "status": "failed" if result.error else "done", "error": result.error,
                                  "worker": result.worker or None}

    def save(self) -> None:
        from .fileio import atomic_write_bytes

        doc = {"format": FORMAT, "job": self.key, "images": dict(sorted(self.images.items()))}
        text = json.dumps(doc, indent=1) + "\n"
        atomic_write_bytes(self.path, lambda fh: fh.write(text.encode("utf-8")))
