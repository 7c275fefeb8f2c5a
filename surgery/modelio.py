"""Model I/O for the surgery stage and its neighbours: the 2 GiB rule, saving, metadata, small facts.

protobuf cannot serialize a message of 2 GiB or more, so a model at least ``LARGE_MODEL_BYTES``
big (``is_large``) never goes through ``SerializeToString``: its initializers go to external data
instead.  That is the one rule here, and every function below applies it the same way:

* ``serialized(model)``: the bytes, or None when the model is large;
* ``staged_path(model)``: the model written to a fresh temporary folder with its tensors in
  ``model.onnx.data`` beside ``model.onnx``, for tools that take a path (ONNX Runtime);
* ``light_call(model, fn)``: ``fn`` (the version converter, shape inference) run on a copy whose
  large tensors live in a temporary folder, the result loaded back;
* ``save_model(model, path)``: atomic; a large model's tensors go to ``<name>.data`` beside it.

``io_metadata`` / ``restore_metadata`` carry the model-level and graph input/output
``metadata_props`` (and doc string, domain, model version) across tools that drop them.
This module does not import torch.
"""

from __future__ import annotations

import collections
import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

#: protobuf refuses messages of 2 GiB or more; models of this size or larger (64 MiB clear of that
#: limit) are never serialized in one piece but written with external data
LARGE_MODEL_BYTES = 2**31 - 2**26

#: tensors of at least this many bytes go to external data when a large model is written out
EXTERNAL_THRESHOLD = 1024


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's serialized size; over the limit when protobuf refuses to size it."""
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 - some protobuf builds refuse to size huge messages
        return LARGE_MODEL_BYTES + 1


def is_large(model: onnx.ModelProto) -> bool:
    """True when ``model`` is too big to serialize as one protobuf message (``LARGE_MODEL_BYTES``)."""
    return model_bytes(model) >= LARGE_MODEL_BYTES


def serialized(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None when it is large (write it with ``staged_path``/``save_model``)."""
    return None if is_large(model) else model.SerializeToString()


def _save_external(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    # onnx.save_model moves the tensors of the proto it writes out of it: work on a copy
    onnx.save_model(copy.deepcopy(model), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=EXTERNAL_THRESHOLD)


def staged_path(model: onnx.ModelProto, *, prefix: str = "surgery-") -> tuple[str, tempfile.TemporaryDirectory]:
    """Write ``model`` to a new temporary folder, tensors as external data; return (path, folder).

    The files live as long as the returned ``TemporaryDirectory`` (keep a reference, or use it
    as a context manager: ``path, tmp = staged_path(m)`` then ``with tmp: ...``).  Any model can be
    staged; call it when ``serialized(model)`` is None.
    """
    folder = tempfile.TemporaryDirectory(prefix=prefix)
    path = Path(folder.name) / "model.onnx"
    try:
        _save_external(model, path, "model.onnx.data")
    except BaseException:
        folder.cleanup()
        raise
    return str(path), folder


def light_call(model: onnx.ModelProto, fn: Callable[[onnx.ModelProto], onnx.ModelProto]) -> onnx.ModelProto:
    """``fn(model)``; for a large model, on a copy whose big tensors live in a temporary folder.

    The tensors are loaded back into ``fn``'s result, so it must keep the external-data
    references it was given (the version converter and shape inference do).
    """
    if not is_large(model):
        return fn(model)
    with tempfile.TemporaryDirectory(prefix="surgery-") as tmp:
        light = copy.deepcopy(model)
        onnx.external_data_helper.convert_model_to_external_data(
            light, all_tensors_to_one_file=True, location="weights.bin", size_threshold=EXTERNAL_THRESHOLD
        )
        onnx.external_data_helper.write_external_data_tensors(light, tmp)
        result = fn(light)
        onnx.external_data_helper.load_external_data_for_model(result, tmp)
        return result


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically; a large model's tensors go to ``<name>.data`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        if is_large(model):
            data_name = path.name + ".data"
            _save_external(model, staged, data_name)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, staged)
        os.replace(staged, path)


def io_metadata(model: onnx.ModelProto) -> dict:
    """What ``restore_metadata`` puts back: metadata_props of the model and its graph inputs/outputs, etc."""
    return {
        "inputs": [(v.name, [(p.key, p.value) for p in v.metadata_props]) for v in model.graph.input],
        "outputs": [(v.name, [(p.key, p.value) for p in v.metadata_props]) for v in model.graph.output],
        "model": [(p.key, p.value) for p in model.metadata_props],
        "doc_string": model.doc_string,
        "domain": model.domain,
        "model_version": model.model_version,
    }


def restore_metadata(model: onnx.ModelProto, saved: dict) -> None:
    """Put back into ``model`` what ``io_metadata`` saved and a tool dropped (present values win)."""
    for values, kept in ((model.graph.input, saved["inputs"]), (model.graph.output, saved["outputs"])):
        by_name = dict(kept)
        for v in values:
            if v.name in by_name and not len(v.metadata_props):
                for key, value in by_name[v.name]:
                    v.metadata_props.add(key=key, value=value)
    present = {p.key for p in model.metadata_props}
    for key, value in saved["model"]:
        if key not in present:
            model.metadata_props.add(key=key, value=value)
    model.doc_string = model.doc_string or saved["doc_string"]
    model.domain = model.domain or saved["domain"]
    model.model_version = model.model_version or saved["model_version"]


def graph_io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(graph input names that are not initializers, graph output names)."""
    inits = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits], [v.name for v in model.graph.output]


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Op-type counts of the model's main graph, most frequent first."""
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain ("" / "ai.onnx") opset, 0 when it imports none."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0
