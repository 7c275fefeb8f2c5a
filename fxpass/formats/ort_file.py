"""An fxpass ``.ort`` file (``fxpass lower --format ort``) read for ``fxpass check FILE.ort``: its fxpass metadata,
graph inputs, op types and whether it holds float16 weights.

The op types and weight types come from the file's flatbuffer through ONNX Runtime's own schema bindings
(``onnxruntime.tools.ort_format_model``; the Python API has no call that lists a session's nodes); the metadata
and the inputs from an ONNX Runtime session on the file.  The structure rule of the asked precision
(:func:`fxpass.expected.check_structure`) then applies to it as to an ONNX file.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FxpassError, ort_reason

#: TensorProto element types ONNX Runtime's ``NodeArg.type`` strings name, as numpy dtype names
_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
          "tensor(int64)": "int64", "tensor(int32)": "int32"}
_FLOAT16 = 10  # TensorDataType FLOAT16 in the ORT-format schema (as in onnx.TensorProto)


def graph_facts(data: bytes, where: str) -> tuple[frozenset, bool]:
    """(op types, whether any initializer is float16) of an ORT-format model's main graph."""
    import onnxruntime.tools.ort_format_model  # noqa: F401  (puts its flatbuffer bindings on sys.path)
    from ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

    try:
        if not InferenceSession.InferenceSessionBufferHasIdentifier(data, 0):
            raise ValueError("no ORT-format identifier")
        graph = InferenceSession.GetRootAs(data, 0).Model().Graph()
        ops = frozenset(graph.Nodes(i).OpType().decode() for i in range(graph.NodesLength()))
        half = any(graph.Initializers(i).DataType() == _FLOAT16 for i in range(graph.InitializersLength()))
    except Exception as exc:  # noqa: BLE001 - flatbuffers raises many types on a file that is not one
        raise FxpassError(f"{where}: not an ORT-format model ({type(exc).__name__}: {exc})"[:300]) from None
    return ops, half


def read_ort(path, *, require_modes: tuple[str, ...] = ()):
    """An fxpass ``.ort`` file as :class:`fxpass.metadata.OnnxInfo`; FxpassError (one line) for a file that is not
    an ORT-format model or carries no fxpass metadata."""
    import onnxruntime as ort

    from .. import metadata
    from ..fileio import check_input_file

    path = Path(check_input_file(path, "an ORT-format model"))
    ops, half = graph_facts(path.read_bytes(), str(path))
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types
        raise FxpassError(f"{path}: ONNX Runtime cannot load it ({ort_reason(exc)})") from None
    props = dict(session.get_modelmeta().custom_metadata_map)
    if not metadata.is_fxpass(props):
        raise FxpassError(f"{path}: an ORT-format model without fxpass metadata (not written by fxpass lower "
                          "--format ort)")
    meta = metadata.parse(props, str(path), require=require_modes)
    inputs = {i.name: (_TYPES.get(i.type, i.type), [d if isinstance(d, int) else -1 for d in i.shape])
              for i in session.get_inputs()}
    metadata.check_read(path, meta, inputs, [o.name for o in session.get_outputs()])
    return metadata.OnnxInfo(path, meta, inputs, ops, half)
