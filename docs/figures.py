"""Print the figures the docs quote, each as the markdown that sits in a page's figure block.

Every measured figure in README.md and docs/*.md sits between ``<!-- figures: COMMAND -->`` and
``<!-- /figures -->``, where COMMAND prints it.  This script is the COMMAND for the figures that do not
come from ``python -m bench`` (whose tables live in docs/performance.md):

    python docs/figures.py golden-sets         # golden/*/manifest.json: the committed sets (instant)
    python docs/figures.py golden-tolerances   # golden/camus-seed0/manifest.json: the regression command
    python docs/figures.py reference           # fxpass/reference/*.json: the trained reference (instant)
    python docs/figures.py precision           # the latest bench results' int8 / bf16 findings (instant)
    python docs/figures.py sampling-time       # the latest bench/results/*-sampling.json: s and MiB per image (instant)
    python docs/figures.py fidelity            # lowers the trained reference fp32 + fp16, check --data, evaluate
    python docs/figures.py sample-runtimes     # tiny config: fxpass sample on OpenVINO against ONNX Runtime
    python docs/figures.py deep-cache          # the reference cut at levels 1..3: shallow graph sizes, latencies
    python docs/figures.py formats             # every mobile route of CAMUS (heavy: several minutes per route)
    python docs/figures.py presets             # --preset paper/balanced/fast on the trained reference (minutes)
    python docs/figures.py defects             # wrong models at every precision: error and structural verdict (minutes)
    python docs/figures.py libraries           # diffusers and MONAI U-Nets through fxpass lower (a minute)

``--write`` (anywhere on the line) also replaces the body of every figure block whose command is this
command line without ``--write``, in README.md, docs/*.md, bench/README.md and golden/README.md.  The
first five read committed files only; tests/test_docs.py checks that their blocks equal this output.
The others run fxpass (``python -m fxpass``, so the working tree's code) and say which machine measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "docs/figures.py"
DOC_FILES = ("README.md", "docs/*.md", "bench/README.md", "golden/README.md")
BLOCK = re.compile(r"(<!-- figures: (?P<cmd>.+?) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)
#: the tests' tiny config (tests/fxpass/conftest.py TINY): every kind of block, 32 px, 10 respaced steps
TINY = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "16", "num_heads": 2,
        "diffusion_steps": 100, "timestep_respacing": "10"}
REFERENCE = REPO / "fxpass" / "reference"
COMMAND_LINE = f"python {SCRIPT}"  # set by main(): the command being run, for the provenance line


# ---- helpers ------------------------------------------------------------------------------------
def _load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _rel(path: Path | str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions(*modules: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in modules:
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} missing")
    return ", ".join(out)


def _machine_line() -> str:
    return (f"Measured by `{COMMAND_LINE}` on {_cpu_model()} ({os.cpu_count()} cores), {date.today().isoformat()}; "
            + _versions("fxpass", "torch", "onnxruntime") + ".")


def _fxpass(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m fxpass ARGS`` from the working tree, its output kept for the error message."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-m", "fxpass", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"figures: `fxpass {' '.join(args)}` exited {proc.returncode}:\n{tail}")
    return proc


def _progress(message: str) -> None:
    print(f"figures: {message}", file=sys.stderr, flush=True)


# ---- committed data: golden sets, the trained reference, the bench results ----------------------
def golden_sets(_args) -> str:
    lines = ["| set | config | iterations | files |", "|---|---|---|---:|"]
    for manifest_path in sorted((REPO / "golden").glob("*/manifest.json")):
        m = _load(manifest_path)
        cfg = m["config"]
        size = sum(p.stat().st_size for p in manifest_path.parent.iterdir() if p.is_file())
        its = ", ".join(str(i) for i in m["t_index"])
        ts = ", ".join(str(t) for t in m["timesteps"])
        lines.append(f"| `{m['name']}` | {cfg['image_size']} px, {cfg['timestep_respacing']} respaced steps of "
                     f"{cfg['diffusion_steps']}, seed-{m['seed']} inputs | `t_index` {its} (timesteps {ts}), "
                     f"batch {m['batch']} | {_mib(size)} |")
    return "\n".join(lines)


def golden_tolerances(_args) -> str:
    m = _load(REPO / "golden" / "camus-seed0" / "manifest.json")
    tol = m["tolerances"]
    command = m["regression"]["commands"]["fp32"].replace(m["regression"]["onnx"], "camus.onnx")
    return "\n".join([
        "```bash",
        "fxpass init camus.pt --seed 0 && fxpass lower camus.pt -o camus.onnx",
        command,
        "```",
        "",
        f"`--atol {tol['fp32']['atol']:g}` is fxpass's fp32 tolerance ({tol['fp32']['atol_scale']:g} × the largest "
        f"|output| of the set, {m['outputs']['max_abs']:.3g}); use `--atol {tol['fp16']['atol']:g}` for an fp16 "
        f"lowering ({tol['fp16']['atol_scale']:g} ×). Both come from `golden/camus-seed0/manifest.json`.",
    ])


def reference(_args) -> str:
    train = _load(REFERENCE / "digits.train.json")
    ev = _load(REFERENCE / "evaluation.json")
    means = ev["eps_mse_mean_over_steps"]
    threads = {p["args"].get("threads") for p in train["phases"]}
    thread_text = f"{threads.pop()} thread" if len(threads) == 1 else "varying threads"
    steps = len(ev["eps_mse"])
    return "\n".join([
        "| the trained digits reference | |",
        "|---|---|",
        f"| parameters | {train['parameters']:,} |",
        f"| training | {train['steps']:,} steps in {len(train['phases'])} phases, {train['seconds_total'] / 60:.1f} min "
        f"on one CPU ({thread_text}; `digits.train.json`) |",
        f"| held-out eps-MSE, mean over the {steps} steps ({ev['num_heldout']} images) | model {means['model']:.4f}; "
        f"the trivial predictor √(1−ᾱ)·x_t {means['shrink']:.3f}; ε̂ = 0 {means['zero']:.3f} (`evaluation.json`) |",
    ])


def _latest_bench() -> tuple[Path, dict[str, Any]]:
    sys.path.insert(0, str(REPO))
    from bench.report import latest_results

    path = latest_results()
    return path, _load(path)


def precision(_args) -> str:
    path, results = _latest_bench()
    section = results.get("precision") or {}
    if "rows" not in section:
        return f"(no precision section in `{_rel(path)}`)"
    rows = {r["key"]: r for r in section["rows"]}
    fid = section["fidelity"]
    per_t = fid["per_t"]

    def ratios(key: str) -> list[tuple[int, float]]:
        return [(r["t_index"], r["eps_mse"][key] / r["eps_mse"]["eager"]) for r in per_t if key in r["eps_mse"]]

    def worst(key: str) -> str:
        f = rows[key]["fidelity"]
        return f"{f['worst_ratio']:.3f}× at t_index {f['t_index']}"

    def elsewhere(key: str) -> str:
        f = rows[key]["fidelity"]
        rest = [v for t, v in ratios(key) if t != f["t_index"]]
        return f"{min(rest):.2f}–{max(rest):.2f}× elsewhere"

    digits = section["fxpass_int8"]["digits"]
    plan, info = digits["plan"], digits["info"]
    lines = []
    lo, hi = fid["image_range"]
    lines.append(f"- eps-MSE against float32 on the trained reference, worst over its {fid['steps']} steps, "
                 f"{fid['images']} held-out images (numbers {lo}..{hi - 1}; the int8 plan calibrates on the ones "
                 f"before them):")
    if "ort_int8_default" in rows:
        lines.append(f"  - ONNX Runtime's `quantize_static` alone (everything int8, calibrated on random inputs): "
                     f"{worst('ort_int8_default')} ({elsewhere('ort_int8_default')});")
    lines.append(f"  - fxpass int8 with its plan: {worst('ort_int8')} on ONNX Runtime (mean over t "
                 f"{rows['ort_int8']['fidelity']['mean_ratio']:.4f})"
                 + (f", {worst('openvino_int8')} on OpenVINO;" if "openvino_int8" in rows else ";"))
    if "openvino_bf16" in rows:
        lines.append(f"  - bf16 on OpenVINO: {worst('openvino_bf16')} ({elsewhere('openvino_bf16')}).")
    lines.append(f"- The plan: {info['plan_lines'][0]}; {info['variants_tried']} variants tried, "
                 f"{digits['quantize_s']:.1f} s for the int8 stage (calibration, search, quantization).")
    bench_plan = section["fxpass_int8"].get("bench")
    if bench_plan:
        b = bench_plan["plan"]
        worst_b = max(b["measured"]["ratios"], key=lambda r: abs(r["ratio"] - 1))
        lines.append(f"- CAMUS at seed 0 (random weights, no images): {len(b['float_layers'])} of {b['layers']} "
                     f"layers kept in float; its ratio farthest from 1 is {worst_b['ratio']:.4f}, at t_index "
                     f"{worst_b['t_index']}.")
    m = results["machine"]
    lines += ["", f"From `{_rel(path)}` (`python -m bench` on {m['cpu_model']}, {m['cores']} cores, "
                  f"{results['date'][:10]}; fxpass {m['versions']['fxpass']}, ONNX Runtime "
                  f"{m['versions']['onnxruntime']}, OpenVINO {m['versions'].get('openvino')})."]
    return "\n".join(lines)


def sampling_time(_args) -> str:
    """The table of the latest CAMUS ``python -m bench.sampling_time`` results (bench/results/*-sampling.json)."""
    sys.path.insert(0, str(REPO))
    from bench.sampling_report import latest_sampling_results, render

    try:
        path = latest_sampling_results()
    except FileNotFoundError as exc:
        raise SystemExit(f"figures: sampling-time: {exc}") from None
    return render(_load(path), _rel(path))


# ---- measured here: the trained reference fp32 / fp16, the tiny config, mobile formats ----------
def fidelity(args) -> str:
    data = REFERENCE / "heldout"
    rows = []
    trivial = None
    settings = None
    with tempfile.TemporaryDirectory(prefix="fxpass-figures-") as tmp:
        tmp = Path(tmp)
        for prec in args.precisions.split(","):
            onnx_path = tmp / f"digits-{prec}.onnx"
            extra = ["--calibration-data", str(data)] if prec == "int8" else []
            _progress(f"lower the reference, {prec}")
            _fxpass("lower", str(REFERENCE / "digits.pt"), "--config", str(REFERENCE / "digits.yml"), "-o",
                    str(onnx_path), "--precision", prec, *extra, cwd=tmp)
            _progress(f"check --data, {prec}")
            _fxpass("check", str(onnx_path), "--model", str(REFERENCE / "digits.pt"), "--data", str(data),
                    "--precision", prec, "--data-count", str(args.images), "--report", str(tmp / f"check-{prec}.json"), cwd=tmp)
            check = _load(tmp / f"check-{prec}.json")["data"]
            ratios = [v for r in check["rows"] for v in r["ratio"].values()]
            _progress(f"evaluate, {prec}")
            _fxpass("evaluate", str(onnx_path), "--data", str(data), "--count", str(args.count), "--jump-length",
                    str(args.jump_length), "--jump-n-sample", str(args.jump_n_sample), "-o",
                    str(tmp / f"eval-{prec}.json"), cwd=tmp)
            ev = _load(tmp / f"eval-{prec}.json")
            o = ev["overall"]
            settings = ev["settings"]
            trivial = o
            rows.append(f"| {prec} | {min(ratios):.5f}–{max(ratios):.5f} | {o['repaint']['psnr']:.2f} dB / "
                        f"{o['repaint']['ssim']:.3f} |")
    rows.append(f"| nearest known pixel (no model) | — | {trivial['nearest_fill']['psnr']:.2f} dB / "
                f"{trivial['nearest_fill']['ssim']:.3f} |")
    rows.append(f"| mean colour (no model) | — | {trivial['mean_fill']['psnr']:.2f} dB / "
                f"{trivial['mean_fill']['ssim']:.3f} |")
    masks = ", ".join(sorted({c["mask"] for c in ev["cases"]})) if ev.get("cases") else "box, half, strokes"
    return "\n".join([
        f"| lowering | eps-MSE ratio to eager, range over the {len(check['rows'])} steps ({check['images']} images) "
        f"| RePaint PSNR / SSIM in the hole ({settings['images']} images × {masks}) |",
        "|---|---|---|",
        *rows,
        "",
        f"RePaint at t_T {settings['t_T']}, jump_length {settings['jump_length']}, jump_n_sample "
        f"{settings['jump_n_sample']} ({settings['model_calls_per_case']} model calls per case). " + _machine_line(),
    ])


def sample_runtimes(args) -> str:
    import numpy as np
    from PIL import Image, ImageDraw

    runtimes = args.runtimes.split(",")
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory(prefix="fxpass-figures-") as tmp:
        tmp = Path(tmp)
        (tmp / "tiny.yml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in TINY.items()), encoding="utf-8")
        _fxpass("init", "tiny.pt", "--config", "tiny.yml", "--seed", "0", cwd=tmp)
        _progress("lower the tiny config")
        _fxpass("lower", "tiny.pt", "--config", "tiny.yml", "-o", "tiny.onnx", cwd=tmp)
        size = TINY["image_size"]
        Image.radial_gradient("L").resize((size, size)).convert("RGB").save(tmp / "img.png")
        mask = Image.new("L", (size, size), 255)
        ImageDraw.Draw(mask).rectangle([size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1], fill=0)
        mask.save(tmp / "mask.png")

        def model_for(runtime: str) -> tuple[str, str]:
            """(the file, the --runtime) of a row: litert[-fp16|-int8] samples the .tflite of that precision."""
            if not runtime.startswith("litert"):
                return "tiny.onnx", runtime
            precision = runtime.partition("-")[2] or "fp32"
            path = f"tiny-{precision}.tflite"
            if not (tmp / path).exists():
                _progress(f"lower the tiny config --format tflite --precision {precision}")
                _fxpass("lower", "tiny.pt", "--config", "tiny.yml", "-o", path, "--format", "tflite",
                        "--precision", precision, cwd=tmp)
            return path, "litert"

        def run(runtime: str, seed: int) -> np.ndarray | str:
            out = tmp / f"{runtime}-{seed}.png"
            path, flag = model_for(runtime)
            proc = _fxpass("sample", path, "--image", "img.png", "--mask", "mask.png", "-o", out.name,
                           "--seed", str(seed), "--jump-length", "3", "--jump-n-sample", "2", "--runtime", flag,
                           cwd=tmp, check=False)
            if proc.returncode == 3:
                return (proc.stdout + proc.stderr).strip().splitlines()[-1]
            if proc.returncode != 0:
                raise SystemExit(f"figures: fxpass sample --runtime {runtime} exited {proc.returncode}")
            return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64) / 127.5 - 1.0

        lines = ["| runtime | largest pixel difference from ONNX Runtime's image, per seed (images in [-1, 1]) |",
                 "|---|---|"]
        reference_images = {s: run("ort", s) for s in seeds}
        for runtime in runtimes:
            _progress(f"sample on {runtime}")
            diffs = []
            for s in seeds:
                img = run(runtime, s)
                if isinstance(img, str):
                    diffs = [img]
                    break
                diffs.append(f"{np.abs(img - reference_images[s]).max():.3f}")
            lines.append(f"| `{runtime}` | {', '.join(diffs)} |")
    return "\n".join([*lines, "", f"The tests' tiny config (32 px, 10 respaced steps), random weights, seeds "
                                   f"{seeds[0]}..{seeds[-1]}, `--jump-length 3 --jump-n-sample 2`; PNG output "
                                   f"(8-bit). " + _machine_line()])


FORMAT_ROUTES = (
    ("--format ort", ["--format", "ort"], "ort"),
    ("--format ort --precision fp16", ["--format", "ort", "--precision", "fp16"], "ort"),
    ("--format ort --step-graph", ["--format", "ort", "--step-graph"], "ort"),
    ("--format pte --step-graph", ["--format", "pte", "--step-graph"], "pte"),
    ("--format mlpackage --step-graph", ["--format", "mlpackage", "--step-graph"], "mlpackage"),
    ("--format tflite", ["--format", "tflite"], "tflite"),
    ("--format tflite --precision fp16", ["--format", "tflite", "--precision", "fp16"], "tflite"),
    ("--format tflite --precision int8", ["--format", "tflite", "--precision", "int8"], "tflite"),
)
#: the last column's heading: ORT's CoreML coverage, or (a table of LiteRT routes alone) LiteRT's own figures
COVERAGE_HEADING = "CoreML ML Program EP (ORT's checker)"
LITERT_HEADING = "LiteRT: table gathers; interpreter vs ONNX Runtime (CPU, same inputs and threads)"


def format_row(label: str, ext: str, report: dict[str, Any]) -> str:
    """One row of the formats table from a ``fxpass lower --format … --report`` report."""
    fmt = report["format"]
    gate = (report.get("check") or {}).get("max_rel_to_scale")
    own = (fmt.get("check") or {}).get("max_rel_to_scale")
    eager = f"eager {gate:.2g}" if gate is not None else "eager not checked"
    if ext == "ort":
        against = f"ONNX {own:.2g}, {eager}" if own is not None else eager
        ep = fmt["coverage"]["eps"]["CoreML MLProgram"]
        missing = ", ".join(o.split(":")[-1] for o in ep["unsupported_ops"]) or "none"
        coreml = f"{ep['nodes_supported']:,} / {ep['nodes']:,} nodes, {ep['partitions']} partitions; not taken: {missing}"
    elif ext == "tflite":
        against = f"rewritten graph {own:.2g}"
        coreml = (f"{fmt['gather_ops']} GATHER_ND; {fmt['latency_ms']:,.0f} ms vs {fmt['ort_latency_ms']:,.0f} ms "
                  f"({fmt['ort_precision']} ONNX)")
    elif ext == "pte":
        against = f"rewritten graph {own:.2g}" if own is not None else "not run here"
        coreml = f"— (XNNPACK: {fmt.get('delegated_nodes')} of {fmt.get('nodes')} nodes delegated)"
    else:
        against = f"PyTorch {own:.2g}" if own is not None else "structure only (no macOS)"
        coreml = "—"
    return f"| `{label}` | {_mib(report['file_bytes'])} | {against} | {coreml} |"


def formats(args) -> str:
    picked = [r for k, r in enumerate(FORMAT_ROUTES) if not args.routes or str(k) in args.routes.split(",")]
    heading = LITERT_HEADING if all(ext == "tflite" for _, _, ext in picked) else COVERAGE_HEADING
    lines = [f"| lowering | file | against | {heading} |", "|---|---:|---|---|"]
    with tempfile.TemporaryDirectory(prefix="fxpass-figures-") as tmp:
        tmp = Path(tmp)
        config = ["--config", str(Path(args.config).resolve())] if args.config else []
        _fxpass("init", "model.pt", *config, "--seed", "0", cwd=tmp)
        for k, (label, flags, ext) in enumerate(FORMAT_ROUTES):
            if args.routes and str(k) not in args.routes.split(","):
                continue
            _progress(f"fxpass lower {label}")
            out, rep = tmp / f"route{k}.{ext}", tmp / f"route{k}.json"
            _fxpass("lower", "model.pt", *config, "-o", str(out), *flags, "--report", str(rep), cwd=tmp)
            lines.append(format_row(label, ext, _load(rep)))
    what = f"`{_rel(args.config)}`" if args.config else "CAMUS (the built-in config)"
    litert = (" LiteRT: " + _versions("litert-torch", "ai-edge-litert", "ai-edge-quantizer") + "."
              if any(ext == "tflite" for _, _, ext in picked) else "")
    return "\n".join([*lines, "", f"{what}, seeded weights (`fxpass init --seed 0`); errors as ·max|ref|. "
                                  + _machine_line() + litert])


# ---- the command line ------------------------------------------------------------------------------
def presets(args) -> str:
    """``fxpass evaluate --run paper --run balanced --run fast`` on held-out images ``first``..``first+count-1``
    (sorted by name) of the trained reference, fp32: quality against model time, paired to paper."""
    import shutil

    names = ("paper", "balanced", "fast")
    with tempfile.TemporaryDirectory(prefix="fxpass-figures-") as tmp:
        tmp = Path(tmp)
        data = tmp / "images"
        data.mkdir()
        for path in sorted((REFERENCE / "heldout").glob("*.png"))[args.first:args.first + args.count]:
            shutil.copy(path, data / path.name)
        _progress("lower the reference")
        _fxpass("lower", str(REFERENCE / "digits.pt"), "--config", str(REFERENCE / "digits.yml"), "-o",
                str(tmp / "digits.onnx"), cwd=tmp)
        _progress("evaluate the presets")
        _fxpass("evaluate", str(tmp / "digits.onnx"), "--data", str(data), "--seed", str(args.seed), "-o",
                str(tmp / "runs.json"), *[a for n in names for a in ("--run", n)], cwd=tmp)
        report = _load(tmp / "runs.json")
    rows = ["| preset | sampler | model calls / image | model s / image | speed-up | PSNR | SSIM | Δ PSNR vs paper "
            "| Δ SSIM vs paper |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    paper_s = report["summary"][0]["seconds_per_case"]
    for run, summary in zip(report["runs"], report["summary"]):
        label = run["settings"]["label"].split(": ", 1)
        diff = summary.get("diff_to_first")
        delta = (f"{diff['psnr']['mean']:+.2f} ± {diff['psnr']['se']:.2f} dB | {diff['ssim']['mean']:+.3f} ± "
                 f"{diff['ssim']['se']:.3f}") if diff else "— | —"
        rows.append(f"| {label[0]} | {label[-1]} | {summary['calls_per_case']:.0f} | {summary['seconds_per_case']:.3f} "
                    f"| {paper_s / summary['seconds_per_case']:.1f}× | {summary['psnr']:.2f} dB | "
                    f"{summary['ssim']:.3f} | {delta} |")
    cases = report["summary"][0]["cases"]
    return "\n".join([*rows, "", f"{cases} cases: held-out images {args.first}..{args.first + args.count - 1} "
                                  f"(sorted) × box, half, strokes, seed {args.seed}; Δ is the mean of the paired "
                                  "per-case differences ± its standard error. " + _machine_line()])


def deep_cache(args) -> str:
    """The reference lowered at fp32 and cut at each of the first ``levels`` skip connections (fxpass.deep_cache.cut):
    what the shallow graph keeps, its multiply-adds and ONNX Runtime latency against the full graph's."""
    import onnx

    sys.path.insert(0, str(REPO))
    from fxpass.deep_cache import cut

    rows = ["| level | cached feature (shape) | shallow / full nodes | shallow / full GFLOP | shallow / full latency "
            "| identity error |", "|---:|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="fxpass-figures-") as tmp:
        tmp = Path(tmp)
        _progress("lower the reference")
        _fxpass("lower", str(REFERENCE / "digits.pt"), "--config", str(REFERENCE / "digits.yml"), "-o",
                str(tmp / "digits.onnx"), cwd=tmp)
        proto = onnx.load(str(tmp / "digits.onnx"))
        for level in range(1, args.levels + 1):
            _progress(f"cut at level {level}")
            full, _, r = cut(proto, level)
            shape = next(list(d.dim_value for d in o.type.tensor_type.shape.dim) for o in full.graph.output
                         if o.name == "cache")
            lat = r["latency"]
            rows.append(f"| {level} | `{r['feature']}` {'×'.join(map(str, shape))} | {r['nodes']['shallow']} / "
                        f"{r['nodes']['full']} | {r['gflop']['shallow']:.3f} / {r['gflop']['full']:.3f} "
                        f"({100 * r['gflop_ratio']:.0f}%) | {lat['shallow_s'] * 1e3:.2f} / {lat['full_s'] * 1e3:.2f} ms "
                        f"({100 * r['latency_ratio']:.0f}%) | {r['check']['max_rel_to_scale']:.1g}·max\\|ref\\| |")
    return "\n".join([*rows, "", "The trained reference (32 px, fp32), `fxpass lower --deep-cache LEVEL`; latency: ONNX "
                                 "Runtime CPU, one thread, median of 5 interleaved calls; the identity is checked at "
                                 "the gate's t_index values. " + _machine_line()])


def defects(_args) -> str:
    """``python -m bench.defects``: the trained reference and copies with one defect, at every precision:
    the numeric error against the true model and the structural verdict."""
    from bench.defects import measure, table

    _progress("lower the reference and its defects at every precision")
    data = measure()
    return "\n".join([table(data), "", "The trained reference (32 px); error: max\\|ORT − eager true model\\| / "
                       "max\\|eager\\| at the first, middle and last t_index (bf16 files on ONNX Runtime in float32); "
                       "step: the `--step-graph` file as `fxpass check STEP --model TRUE` measures it (x_prev and "
                       "pred_xstart against the true eager model + NumPy's posterior at the gate's t_index values, "
                       "pred_xstart's error divided by sqrt(1/ᾱ − 1)); "
                       "FAIL: over the bound; structure: `fxpass.equivalence` against the true model's float32 "
                       "graph (the step files against its float32 step graph). " + _machine_line()])


def libraries(_args) -> str:
    """``python -m bench.libraries``: diffusers and MONAI U-Nets lowered by the CLI, ORT against the library model."""
    from bench.libraries import cases, table

    _progress("lower each library's model")
    with tempfile.TemporaryDirectory(prefix="fxpass-libraries-") as tmp:
        rows = cases(Path(tmp))
    return "\n".join([table(rows), "", "Small models of each library's own class with seeded weights, lowered by "
                       "`fxpass lower` with no wrapper (`--model-factory bench.libraries:NAME`, or the diffusers folder "
                       "itself), 50 respaced steps of 1000; error: max\\|ORT − library model\\| / max\\|library model\\| "
                       "at the first, middle and last t_index and three seeded ones. " + _machine_line()])


COMMANDS: dict[str, Callable[[argparse.Namespace], str]] = {
    "golden-sets": golden_sets, "golden-tolerances": golden_tolerances, "reference": reference,
    "precision": precision, "fidelity": fidelity, "sample-runtimes": sample_runtimes, "formats": formats,
    "presets": presets, "sampling-time": sampling_time, "deep-cache": deep_cache, "defects": defects,
    "libraries": libraries,
}
#: the subcommands that read committed files only (tests/test_docs.py regenerates and compares them)
COMMITTED = ("golden-sets", "golden-tolerances", "reference", "precision", "sampling-time")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python {SCRIPT}", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--write", action="store_true", help="also replace the figure blocks of this command line")
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("golden-sets", "golden-tolerances", "reference", "precision", "sampling-time"):
        sub.add_parser(name)
    f = sub.add_parser("fidelity", help="the trained reference lowered per precision: eps-MSE and inpainting")
    f.add_argument("--precisions", default="fp32,fp16", help="comma-separated (default fp32,fp16; int8 searches "
                                                             "a plan on the held-out images)")
    f.add_argument("--images", type=int, default=32, help="held-out images for the eps-MSE (default 32)")
    f.add_argument("--count", type=int, default=16, help="held-out images inpainted (default 16, × 3 masks)")
    f.add_argument("--jump-length", type=int, default=10)
    f.add_argument("--jump-n-sample", type=int, default=10)
    s = sub.add_parser("sample-runtimes", help="the tiny config sampled on other runtimes than ONNX Runtime")
    s.add_argument("--runtimes", default="openvino,openvino-bf16,litert,litert-fp16,litert-int8",
                   help="litert[-fp16|-int8]: the .tflite of that precision on LiteRT")
    s.add_argument("--seeds", type=int, default=3)
    m = sub.add_parser("formats", help="every mobile route (default: CAMUS, heavy)")
    m.add_argument("--config", metavar="FILE", help="another config (default: built-in CAMUS)")
    m.add_argument("--routes", metavar="K,...", help="only these routes (0-based indices into the table)")
    d = sub.add_parser("deep-cache", help="the trained reference cut at each skip connection: sizes and latencies")
    d.add_argument("--levels", type=int, default=3)
    sub.add_parser("defects", help="wrong models at every precision: numeric error and structural verdict")
    sub.add_parser("libraries", help="diffusers and MONAI U-Nets through fxpass lower: route and error")
    r = sub.add_parser("presets", help="--preset paper, balanced, fast on held-out images of the trained reference")
    r.add_argument("--first", type=int, default=32, help="first held-out image, sorted by name (default 32: the "
                                                         "presets were chosen on images 0..31, 100..131, 150..181)")
    r.add_argument("--count", type=int, default=32, help="images, each under three masks (default 32: 96 cases)")
    r.add_argument("--seed", type=int, default=23, help="noise seed (default 23: the presets were chosen at seeds 0, "
                                                        "7 and 11)")
    return p


def command_line(argv: list[str]) -> str:
    """The figure-block command for ``argv`` (``--write`` left out)."""
    return " ".join(["python", SCRIPT, *(shlex.quote(a) for a in argv if a != "--write")])


def doc_files() -> list[Path]:
    out: list[Path] = []
    for pattern in DOC_FILES:
        out += sorted(REPO.glob(pattern))
    return out


FENCE = re.compile(r"^(```|~~~)", re.M)


def _mask_fences(text: str) -> str:
    """``text`` with the inside of fenced code blocks blanked (same length, newlines kept), so that a block
    shown as an example inside a fence is not taken for one; the markers of real blocks are outside fences."""
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        opens = FENCE.match(line) is not None
        if inside or opens:
            out.append(re.sub(r"[^\n]", " ", line))
        else:
            out.append(line)
        if opens:
            inside = not inside
    return "".join(out)


def find_blocks(text: str) -> list[dict[str, Any]]:
    """Every figure block of ``text`` outside fenced code: ``{"command", "start", "end", "body_start",
    "body_end", "line"}`` (offsets into ``text``; ``line`` 1-based, of the opening marker)."""
    blocks = []
    for m in BLOCK.finditer(_mask_fences(text)):
        blocks.append({"command": " ".join(m["cmd"].split()), "start": m.start(), "end": m.end(),
                       "body_start": m.start("body"), "body_end": m.end("body"),
                       "line": text.count("\n", 0, m.start()) + 1})
    return blocks


def replace_blocks(text: str, command: str, body: str) -> tuple[str, int]:
    """``text`` with the body of every block of ``command`` replaced; and how many there were."""
    blocks = [b for b in find_blocks(text) if b["command"] == command]
    for b in reversed(blocks):
        text = text[:b["body_start"]] + body.strip() + "\n" + text[b["body_end"]:]
    return text, len(blocks)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    global COMMAND_LINE
    COMMAND_LINE = command_line(argv)
    body = COMMANDS[args.what](args)
    print(body)
    if args.write:
        command, total = command_line(argv), 0
        for path in doc_files():
            text = path.read_text(encoding="utf-8")
            new, n = replace_blocks(text, command, body)
            if n:
                path.write_text(new, encoding="utf-8")
                _progress(f"{_rel(path)}: {n} block(s) of `{command}` replaced")
            total += n
        if not total:
            _progress(f"no figure block of `{command}` found")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
