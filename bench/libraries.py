"""``python -m bench.libraries``: other libraries' U-Nets through ``fxpass lower`` as their users save them (issue #27).

    python -m bench.libraries               # the table docs/lowering.md quotes
    python -m bench.libraries --json OUT    # ... and every figure as JSON (not over an existing file without --force)

Each case is a small model of the library's own class, built here with seeded weights (every weight drawn
anew: MONAI zero-initialises its output convolution, which would make any graph match), saved as the
library saves it, lowered by the CLI with no wrapper written (``--model-factory bench.libraries:NAME``, or
the diffusers folder itself), then ONNX Runtime on the written file is compared with the library model
called by its own parameter names, at the first, middle and last t_index and three seeded ones:
max|ORT - eager| / max|eager|.  It also reports the capture route the lowering took and the graph's
inputs.  It measures; it never asserts (tests/fxpass/test_library_models.py does).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

SCHEDULE = ("--diffusion-steps", "1000", "--timestep-respacing", "50")


# ---- the library models, as their users build them (also --model-factory targets) ---------------------
def ddpm(**kwargs):
    """diffusers' UNet2DModel, DDPM-style with attention blocks."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, **kwargs)


def ddpm_classes(**kwargs):
    """diffusers' UNet2DModel, class-conditional (``class_labels``, 5 classes)."""
    return ddpm(num_class_embeds=5, **kwargs)


def text_conditioned(**kwargs):
    """diffusers' UNet2DConditionModel (cross-attention on ``encoder_hidden_states`` of width 32)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=8, **kwargs)


def monai_context(**kwargs):
    """MONAI's DiffusionModelUNet with cross-attention on ``context`` (width 24)."""
    return monai_ddpm(with_conditioning=True, cross_attention_dim=24, **kwargs)


def monai_ddpm(**kwargs):
    """MONAI's DiffusionModelUNet, 2-D, attention at the lower level (einops inside)."""
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32),
                              attention_levels=(False, True), num_res_blocks=1, num_head_channels=16,
                              norm_num_groups=8, **kwargs)


def monai_segmentation(**kwargs):
    """MONAI's segmentation UNet: no timestep at all."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1,
                **kwargs)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn anew (N(0, 0.2^2)): a zero-initialised layer would make any graph pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


# ---- measuring ------------------------------------------------------------------------------------------
def _lower(argv: list[str], report: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "fxpass", "lower", *argv, "--report", str(report)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fxpass lower {' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(report.read_text())


def _worst(path: Path, call) -> float:
    import onnx
    import onnxruntime as ort

    from fxpass.metadata import parse, read_props

    proto = onnx.load(str(path))
    meta = parse(read_props(proto))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(5)
    feeds = {}
    for i in proto.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.name == "t_index":
            continue
        labels = i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        feeds[i.name] = torch.randint(0, 5, shape, generator=gen) if labels else torch.randn(shape, generator=gen)
    n = len(meta.timesteps)
    indices = [0, n // 2, n - 1, *np.random.default_rng(11).integers(0, n, 3).tolist()] if n else [None]
    worst = 0.0
    for k in indices:
        run = {name: v.numpy() for name, v in feeds.items()}
        if k is not None:
            run["t_index"] = np.array([k])
        got = sess.run(None, run)[0]
        t = None if k is None else torch.tensor([meta.model_timesteps[k]], dtype=torch.int64)
        with torch.no_grad():
            ref = call(feeds, t).numpy()
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    return worst


def cases(directory: Path) -> list[dict]:
    """Each case lowered and measured: name, class, route, mode, inputs, worst relative error."""
    from diffusers import DDPMScheduler

    from fxpass.checkpoint import save_checkpoint

    rows = []

    def factory_case(name: str, label: str, model, call, *flags: str) -> None:
        stem = f"{name}-{len(rows)}"
        ckpt, out = directory / f"{stem}.pt", directory / f"{stem}.onnx"
        save_checkpoint(model, ckpt)
        report = _lower([str(ckpt), "-o", str(out), "--model-factory", f"bench.libraries:{name}", *flags],
                        directory / f"{stem}.json")
        rows.append(_row(label, report, out, call))

    torch.manual_seed(0)
    m = ddpm().eval()
    factory_case("ddpm", "diffusers UNet2DModel (DDPM, attention)", m, lambda f, t: m(f["x"], t).sample, *SCHEDULE)
    c = ddpm_classes().eval()
    factory_case("ddpm_classes", "diffusers UNet2DModel (class-conditional)", c,
                 lambda f, t: c(f["x"], t, class_labels=f["class_labels"]).sample, *SCHEDULE)
    d = randomized(monai_ddpm())
    factory_case("monai_ddpm", "MONAI DiffusionModelUNet (2-D)", d, lambda f, t: d(f["x"], t), *SCHEDULE,
                 "--image-size", "16")
    factory_case("ddpm", "diffusers UNet2DModel (DDPM, attention), --capture export", m,
                 lambda f, t: m(f["x"], t).sample, *SCHEDULE, "--capture", "export")
    factory_case("monai_ddpm", "MONAI DiffusionModelUNet (2-D), --capture export", d, lambda f, t: d(f["x"], t),
                 *SCHEDULE, "--image-size", "16", "--capture", "export")
    e = text_conditioned().eval()
    factory_case("text_conditioned", "diffusers UNet2DConditionModel (cross-attention)", e,
                 lambda f, t: e(f["x"], t, encoder_hidden_states=f["encoder_hidden_states"]).sample, *SCHEDULE,
                 "--input", "encoder_hidden_states=1,7,32")
    k = randomized(monai_context(), seed=3)
    factory_case("monai_context", "MONAI DiffusionModelUNet (cross-attention)", k,
                 lambda f, t: k(f["x"], t, context=f["context"]), *SCHEDULE, "--image-size", "16",
                 "--input", "context=1,1,24")
    s = randomized(monai_segmentation(), seed=1)
    factory_case("monai_segmentation", "MONAI UNet (segmentation, no timestep)", s, lambda f, t: s(f["x"]),
                 "--image-size", "16")
    torch.manual_seed(2)
    v = ddpm().eval()
    folder = directory / "unet"
    v.save_pretrained(str(folder))
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0002, beta_end=0.015,
                  prediction_type="v_prediction").save_pretrained(str(folder))
    out = directory / "folder.onnx"
    report = _lower([str(folder), "-o", str(out), "--timestep-respacing", "50"], directory / "folder.json")
    rows.append(_row("diffusers model folder (+ scheduler config: scaled_linear, v_prediction)", report, out,
                     lambda f, t: v(f["x"], t).sample))
    return rows


def _row(label: str, report: dict, out: Path, call) -> dict:
    import onnx

    route = (report.get("capture_route") or {}).get("route", "trace")
    inputs = [i.name for i in onnx.load(str(out)).graph.input]
    return {"case": label, "route": route, "mode": report.get("mode"), "inputs": inputs,
            "gate": report.get("check", {}).get("max_rel_to_scale"), "worst": _worst(out, call)}


def table(rows: list[dict]) -> str:
    lines = ["| case | capture route | mode | graph inputs | ORT vs eager, worst of 6 t_index (·max\\|ref\\|) |",
             "|---|---|---|---|---:|"]
    for r in rows:
        route = "torch.export (2)" if r["route"] == "export" else "tracer (1)"
        lines.append(f"| {r['case']} | {route} | {r['mode']} | {', '.join(r['inputs'])} | {r['worst']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    parser.add_argument("--force", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    if args.json and args.json.exists() and not args.force:  # before a minute of work
        parser.error(f"{args.json}: already exists (pass --force to replace it)")
    with tempfile.TemporaryDirectory(prefix="fxpass-libraries-") as tmp:
        rows = cases(Path(tmp))
    print(table(rows))
    if args.json:
        from fxpass.fileio import atomic_write_bytes

        text = json.dumps(rows, indent=2) + "\n"
        atomic_write_bytes(args.json, lambda fh: fh.write(text.encode()), exclusive=not args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
