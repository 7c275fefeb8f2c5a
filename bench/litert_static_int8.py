"""Experiment: litert-torch PT2E static int8 vs ai-edge-quantizer dynamic-range int8 on an fxpass lowering."""
import os, sys, time, json
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
import numpy as np, torch
torch.set_num_threads(1)
from fxpass.config import from_dict, load_config
from fxpass.checkpoint import init_model, load_model
from fxpass.pipeline import lower_with_report
from fxpass.write import _tables_merged
from fxpass.formats import tflite
from fxpass.formats._io import compare_module
from fxpass.formats.tflite_file import read_facts

which = sys.argv[1] if len(sys.argv) > 1 else "tiny"
if which == "tiny":
    TINY = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "16", "num_heads": 2,
            "diffusion_steps": 100, "timestep_respacing": "10"}
    cfg = from_dict(TINY); model = init_model(cfg, seed=0)
else:
    cfg = load_config("fxpass/reference/digits.yml"); model = load_model("fxpass/reference/digits.pt", cfg)
model.eval()
t0 = time.time()
lowered = lower_with_report(model, config=cfg)
print("lowered", time.time() - t0, flush=True)
src = _tables_merged(lowered.source).eval()
named = dict(lowered.source_inputs)
rows = len(lowered.timesteps)
print({k: (tuple(v.shape), v.dtype) for k, v in named.items()}, "rows", rows)

# calibration feeds: noised heldout images (like --calibration-data), 4 images x 8 steps
from fxpass.diffusion import Diffusion
from fxpass.precision import calibration
from fxpass.inputs import spread
from fxpass.images import load_image_dir
diffusion = Diffusion.from_config(cfg.to_dict())
steps = spread(diffusion.num_steps, 8)
images = load_image_dir("fxpass/reference/heldout", cfg.image_size, 8)
feeds = [s.feed for s in calibration.noised(images[:4], diffusion, steps, [{}] * 4, 0)]
print("feeds", len(feeds), "steps", steps)

def qrun(data, feed):
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_content=data); it.allocate_tensors()
    r = it.get_signature_runner()
    det = r.get_input_details()
    kw = {}
    for k, v in feed.items():
        v = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        d = det[k]; s, z = d["quantization"]
        if d["dtype"] == np.int8 and s:
            v = np.clip(np.round(v / s) + z, -128, 127)
        kw[k] = v.astype(d["dtype"])
    out = r(**kw)
    od = r.get_output_details()
    res = []
    for k in out:
        o = out[k]; s, z = od[k]["quantization"]
        res.append(((o.astype(np.float32) - z) * s) if o.dtype == np.int8 and s else o)
    return res

def check(data, label):
    facts0 = read_facts(data); print(label, "inputs", facts0.inputs, "outputs", facts0.outputs)
    cases = []
    res = compare_module(lambda case: qrun(data, dict(zip(list(named), case))), src,
                         list(named.values()), rows=rows, where=label)
    # also on calibration-like eval data: images 4..7 noised at 5 steps
    ev = calibration.noised(images[4:8], diffusion, spread(diffusion.num_steps, 5), [{}] * 4, 2)
    worst = 0.0
    for s in ev:
        with torch.no_grad():
            ref = src(torch.from_numpy(s.feed["x"]), torch.from_numpy(s.feed["t_index"])).numpy()
        out = qrun(data, {"x": s.feed["x"], "t_index": s.feed["t_index"]})[0]
        worst = max(worst, float(np.abs(out - ref).max() / np.abs(ref).max()))
    fqw = 0.0
    if label.startswith("static"):
        for s in ev:
            with torch.no_grad():
                ref = src(torch.from_numpy(s.feed["x"]), torch.from_numpy(s.feed["t_index"])).numpy()
                o = FQ(x=torch.from_numpy(s.feed["x"]), t_index=torch.from_numpy(s.feed["t_index"])).numpy()
                l = qrun(data, {"x": s.feed["x"], "t_index": s.feed["t_index"]})[0]
            fqw = max(fqw, float(np.abs(o - ref).max() / np.abs(ref).max()))
            print("   t", s.t_index, "fq %.3g tflite %.3g tflite-vs-fq %.3g" % (np.abs(o - ref).max() / np.abs(ref).max(), np.abs(l - ref).max() / np.abs(ref).max(), np.abs(l - o).max() / np.abs(ref).max()))
    facts = read_facts(data)
    print(f"fq on heldout {fqw:.4g}")
    print(f"{label}: gate-style (seeded x, t_index {res['t_index']}) {res['max_rel_to_scale']:.4g}; "
          f"noised heldout 4..7 x 5 steps {worst:.4g}; bytes {len(data)}; ops {facts.ops}", flush=True)

t0 = time.time(); fp32 = tflite.convert(src, named); print("fp32 convert", time.time() - t0)
check(fp32, "fp32")
t0 = time.time(); dyn = tflite.quantize(fp32, "int8"); print("dyn quantize", time.time() - t0)
check(dyn, "dynamic-range int8")

import litert_torch
from litert_torch.quantize import pt2e_quantizer as pq
from litert_torch.quantize.quant_config import QuantConfig
from torchao.quantization.pt2e import quantize_pt2e
t0 = time.time()
class NoCat(pq.PT2EQuantizer):
    STATIC_OPS = [o for o in pq.PT2EQuantizer.STATIC_OPS if o not in os.environ.get("SKIP_OPS", "cat").split(",")]
    def annotate(self, model):
        from litert_torch.quantize.pt2e_quantizer_utils import propagate_annotation
        self._annotate_for_static_quantization_config(model)
        skip = os.environ.get("FLOAT_STRIDED", "1") == "1"
        if os.environ.get("CAT_EDGES") == "1":
            from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec
            from litert_torch.quantize.pt2e_quantizer_utils import get_input_act_qspec, get_output_act_qspec
            import dataclasses
            from torchao.quantization.pt2e.observer import HistogramObserver
            for n in model.graph.nodes:
                if n.target == torch.ops.aten.cat.default:
                    fresh = dataclasses.replace(get_input_act_qspec(self.global_config), observer_or_fake_quant_ctr=HistogramObserver.with_args(eps=2**-12))
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={a: (fresh if i == 0 else SharedQuantizationSpec((n.args[0][0], n))) for i, a in enumerate(n.args[0])},
                        output_qspec=SharedQuantizationSpec((n.args[0][0], n)), _annotated=True)
        for n in model.graph.nodes:
            if skip and n.target == torch.ops.aten.conv2d.default and len(n.args) > 3 and list(n.args[3]) == [2, 2]:
                n.meta.pop("quantization_annotation", None); print("float:", n.name)
        if os.environ.get("FLOAT_ENDS") == "1":
            convs = [n for n in model.graph.nodes if n.target == torch.ops.aten.conv2d.default]
            for n in (convs[0], convs[-1]):
                n.meta.pop("quantization_annotation", None); print("float end:", n.name)
        propagate_annotation(model)
        return model
print("static ops", NoCat.STATIC_OPS)
q = NoCat().set_global(pq.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
ep = torch.export.export(src, (), kwargs=named)
m = quantize_pt2e.prepare_pt2e(ep.module(), q)
with torch.no_grad():
    for f in feeds:
        m(x=torch.from_numpy(f["x"]), t_index=torch.from_numpy(f["t_index"]))
m = quantize_pt2e.convert_pt2e(m, fold_quantize=False)
open(f"{os.environ.get('PROBE_OUT', '/tmp')}/{which}-conv.py","w").write(m.graph.python_code("self").src)
print("pt2e prepare+calibrate+convert", time.time() - t0, flush=True)
with torch.no_grad():
    fq = m(**named); ref = src(**named)
    print("fake-quant torch model vs float (seeded x):", float((fq - ref).abs().max() / ref.abs().max()))
t0 = time.time()
edge = litert_torch.convert(m, sample_kwargs=named, enable_x64=True, quant_config=QuantConfig(pt2e_quantizer=q))
static = bytes(edge.model_content())
FQ = m
print("static convert", time.time() - t0, flush=True)
open(f"{os.environ.get('PROBE_OUT', '/tmp')}/{which}-static.tflite", "wb").write(static)
check(static, "static int8 (PT2E)")
