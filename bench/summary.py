"""Targets (met / not met, never asserted) and the rich tables printed at the end of a run."""

from __future__ import annotations

from typing import Any

TARGETS_DEFINED_FOR = "the CAMUS config on the 2-core CPU machine"

TARGETS = (
    ("fxpass_over_eager", "fxpass on ORT ≤ 0.60× eager PyTorch (per step, batch 1)", 0.60, "×"),
    ("fxpass_over_naive", "fxpass on ORT ≤ 1.0× the naive export on ORT", 1.0, "×"),
    ("lower_cli_s", "`fxpass lower` end to end ≤ 45 s", 45.0, "s"),
)


def target_values(results: dict[str, Any]) -> dict[str, float | None]:
    cpu = results.get("cpu", {})
    ratios = cpu.get("ratios", {})
    return {
        "fxpass_over_eager": ratios.get("fxpass_over_eager"),
        "fxpass_over_naive": ratios.get("fxpass_over_naive"),
        "lower_cli_s": cpu.get("lower_cli", {}).get("wall_s"),
    }


def evaluate_targets(results: dict[str, Any]) -> dict[str, Any]:
    values = target_values(results)
    machine = results.get("machine", {})
    applies = results.get("config", {}).get("name") == "CAMUS" and machine.get("cores") == 2
    rows = []
    for key, what, limit, unit in TARGETS:
        value = values[key]
        rows.append({"id": key, "what": what, "limit": limit, "unit": unit, "value": value,
                     "met": None if value is None else bool(value <= limit)})
    return {"defined_for": TARGETS_DEFINED_FOR, "applies_here": applies, "rows": rows}


# ---- formatting ---------------------------------------------------------------------------------
def ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def secs(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.1f} s"


def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _problem(section: dict[str, Any] | None) -> str | None:
    if section is None:
        return "not run"
    if "error" in section:
        return f"error: {section['error']}"
    if "skipped" in section:
        return f"skipped: {section['skipped']}"
    return None


def stage_text(stages: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in stages.items())


def print_results(results: dict[str, Any], console=None) -> None:
    from rich.console import Console

    console = console or Console(highlight=False)
    console.print(_cpu_table(results))
    print_precision(results.get("precision"), console)
    targets = results.get("targets")
    if targets:
        console.print(_targets_table(targets))
    gpu = results.get("gpu")
    if gpu is not None:
        _print_gpu(gpu, console)


def _cpu_table(results: dict[str, Any]):
    """The CPU sections: per-step latency, node counts and build times, ``fxpass lower``, the schedule,
    FLOPs and the load average."""
    from rich.table import Table

    machine, cpu = results["machine"], results.get("cpu", {})
    ram = machine.get("ram_bytes")
    title = (f"fxpass bench — {results['config']['name']} ({cpu.get('image_size')}×{cpu.get('image_size')}, "
             f"batch 1) — {machine['cpu_model']}, {machine['cores']} cores"
             + (f", {ram / 2**30:.0f} GiB" if ram else "") + f" — {results['date']}")
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("vs eager", justify="right")
    table.add_column("notes")
    _latency_rows(table, cpu, results["settings"])
    _build_rows(table, cpu)
    _cli_row(table, cpu.get("lower_cli"))
    _schedule_rows(table, cpu.get("schedule"))
    _flops_row(table, results.get("flops", {}), cpu)
    load = results.get("load", {})
    if load.get("max_load1") is not None:
        table.add_row("load average (1 min) during run", f"max {load['max_load1']:.2f}", "",
                      f"mean {load['mean_load1']:.2f} over {len(load['samples'])} samples")
    return table


def _latency_rows(table, cpu: dict[str, Any], settings: dict[str, Any]) -> None:
    eager = cpu.get("eager", {}).get("median_s")
    runs = f"median of {settings['runs']} (warm-up {settings['warmup']}), {settings['threads']} threads"

    def latency_row(label: str, key: str, extra: str = "") -> None:
        section = cpu.get(key)
        problem = _problem(section)
        if problem:
            table.add_row(label, "—", "", problem)
            return
        value = section["median_s"]
        notes = [runs if key == "eager" else f"max |Δ| vs eager {section.get('max_abs_vs_eager', 0):.2g}"]
        if extra:
            notes.append(extra)
        table.add_row(label, ms(value), ratio(value / eager) if eager else "—", "; ".join(notes))

    latency_row("eager PyTorch fp32 (per step)", "eager")
    naive_graph = cpu.get("naive_build", {}).get("graph", {})
    fx_graph = cpu.get("fxpass_build", {}).get("graph", {})
    latency_row("naive dynamo export on ORT", "naive_ort",
                f"{naive_graph['nodes']} nodes, opset {naive_graph['opset']}" if naive_graph else "")
    latency_row("fxpass (table mode) on ORT", "fxpass_ort",
                f"{fx_graph['nodes']} nodes, opset {fx_graph['opset']}, fed t_index" if fx_graph else "")


def _build_rows(table, cpu: dict[str, Any]) -> None:
    """The ratios, the node counts and how long each build took."""
    r = cpu.get("ratios", {})
    table.add_row("fxpass / eager", ratio(r.get("fxpass_over_eager")), "", "")
    table.add_row("fxpass / naive", ratio(r.get("fxpass_over_naive")), "", "")
    nodes = cpu.get("nodes", {})
    table.add_row("ONNX nodes: naive → fxpass", f"{nodes.get('naive') or '—'} → {nodes.get('fxpass') or '—'}", "",
                  _top_ops(cpu.get("naive_build", {}).get("graph", {}), cpu.get("fxpass_build", {}).get("graph", {})))
    naive_build = cpu.get("naive_build", {})
    if "export_s" in naive_build:
        table.add_row("naive export time", secs(naive_build["export_s"]), "", "torch.onnx.export(dynamo=True)")
    fx_build = cpu.get("fxpass_build", {})
    if "lower_s" in fx_build:
        table.add_row("fxpass lower_with_report (in process)", secs(fx_build["lower_s"]), "",
                      stage_text(fx_build.get("stages_s", {})))


def _cli_row(table, cli: dict[str, Any] | None) -> None:
    problem = _problem(cli)
    if problem and not (cli and "wall_s" in cli):
        table.add_row("`fxpass lower` end to end", "—", "", problem)
    elif cli:
        notes = stage_text(cli.get("stages_s", {}))
        if cli.get("check_and_other_s") is not None:
            notes += f", load+check {cli['check_and_other_s']:.1f}, start-up {cli['startup_s']:.1f}"
        passed = cli.get("check_passed")
        if passed is not None:
            passed = passed if isinstance(passed, bool) else str(passed).lower() == "true"
            notes += "; ORT check " + ("passed" if passed else "FAILED")
        table.add_row("`fxpass lower` end to end", secs(cli["wall_s"]), "", notes)


def _schedule_rows(table, sched: dict[str, Any] | None) -> None:
    problem = _problem(sched)
    if problem:
        table.add_row("schedule", "—", "", problem)
    elif sched:
        label = "measured" if not sched["extrapolated"] else "EXTRAPOLATED"
        how = sched["how"]
        table.add_row(f"{sched['steps_total']}-step schedule: fxpass ORT", secs(sched["fxpass_ort"]["total_s"]),
                      ratio(sched["fxpass_over_eager"]), f"{label}: {how}")
        table.add_row(f"{sched['steps_total']}-step schedule: eager", secs(sched["eager"]["total_s"]), "1.00×",
                      f"{label}")


def _flops_row(table, flops: dict[str, Any], cpu: dict[str, Any]) -> None:
    problem = _problem(flops)
    if problem:
        table.add_row("FLOPs per step", "—", "", problem)
    elif flops:
        achieved = []
        for key, name in (("eager", "eager"), ("naive_ort", "naive"), ("fxpass_ort", "fxpass")):
            t = cpu.get(key, {}).get("median_s")
            if t:
                achieved.append(f"{name} {flops['flops'] / t / 1e9:.0f}")
        table.add_row("FLOPs per step", f"{flops['gflop']:.1f} GFLOP", "",
                      "FlopCounterMode; achieved GFLOP/s: " + ", ".join(achieved))


def _targets_table(targets: dict[str, Any]):
    from rich.table import Table

    t = Table(title=f"targets (defined for {targets['defined_for']}"
                    + ("" if targets["applies_here"] else "; NOT this run's machine/config, shown for reference")
                    + ")", title_justify="left")
    t.add_column("target")
    t.add_column("measured", justify="right")
    t.add_column("")
    for row in targets["rows"]:
        value = row["value"]
        shown = "—" if value is None else (f"{value:.2f}×" if row["unit"] == "×" else f"{value:.1f} s")
        status = ("[yellow]not measured[/]" if row["met"] is None else
                  "[green]met[/]" if row["met"] else "[red]not met[/]")
        t.add_row(row["what"], shown, status)
    return t


def _print_gpu(gpu: dict[str, Any], console) -> None:
    from rich.table import Table

    if "skipped" in gpu or "error" in gpu:
        console.print(f"GPU section {_problem(gpu)}")
        return
    g = Table(title=f"GPU — {gpu['device'].get('name')} (CUDA {gpu['device'].get('cuda')})", title_justify="left")
    for col in ("runtime", "precision", "batch", "per step", "TFLOP/s", "% of peak", "notes"):
        g.add_column(col, justify="left" if col in ("runtime", "notes") else "right")
    for row in gpu["rows"]:
        if "median_s" in row:
            note = (f"CUDA graphs skipped {row['cudagraph_skips']}× (ran without them)"
                    if row.get("cudagraph_skips") else "")
            g.add_row(row["name"], row["precision"], str(row["batch"]), ms(row["median_s"]),
                      f"{row['achieved_tflops']:.1f}" if "achieved_tflops" in row else "—",
                      f"{row['percent_of_peak']:.0f} %" if "percent_of_peak" in row else "—", note)
        else:
            g.add_row(row["name"], row["precision"], str(row["batch"]), "—", "—", "—", _problem(row) or "")
    console.print(g)
    if gpu.get("peak"):
        console.print(f"peak: nominal dense figures for {gpu['peak']['matched']} "
                      f"(fp16 {gpu['peak']['fp16']:.0f}, fp32 {gpu['peak']['fp32']:.1f} TFLOP/s)")


# ---- the precision section ----------------------------------------------------------------------
def _entry_problem(entry: dict[str, Any] | None) -> str | None:
    """``unavailable: why`` / ``error: ...`` / ``skipped: ...`` for a row's latency or fidelity, else None."""
    if not entry:
        return "not run"
    for key in ("unavailable", "error", "skipped"):
        if key in entry:
            return f"{key}: {entry[key]}"
    return None


def eps_text(fidelity: dict[str, Any] | None) -> str:
    """A row's eps-MSE cell: the worst ratio to float32 over t and where, ``reference``, or why there is none."""
    if fidelity and fidelity.get("reference"):
        return "reference"
    problem = _entry_problem(fidelity)
    if problem:
        return problem
    if fidelity.get("worst_ratio") is None:
        return "—"
    return f"{fidelity['worst_ratio']:.3f}× at t_index {fidelity['t_index']}"


def precision_cells(section: dict[str, Any], fmt_ms=None) -> list[dict[str, str]]:
    """Display strings for each row of the precision section: runtime, precision, what, latency,
    vs_eager, eps.  A row without a measurement shows why (``unavailable: ...``), never a number."""
    fmt_ms = fmt_ms or ms
    cells = []
    for row in section.get("rows", []):
        latency = row.get("latency")
        problem = _entry_problem(latency)
        cells.append({
            "key": row["key"], "runtime": row["runtime"], "precision": row["precision"], "what": row["what"],
            "latency": problem or fmt_ms(latency["median_s"]),
            "vs_eager": "—" if problem else ratio(latency.get("ratio_vs_eager")),
            "eps": eps_text(row.get("fidelity")),
        })
    return cells


def _plan_text(info: dict[str, Any]) -> str:
    plan = info.get("plan") if isinstance(info.get("plan"), dict) else {}
    kept, total = plan.get("float_layers"), plan.get("layers")
    if isinstance(kept, list) and isinstance(total, int):
        return f"{len(kept)} of {total} layers kept in float"
    return ""


def _range_text(fid: dict[str, Any]) -> str:
    first, end = (fid.get("image_range") or [0, 0])[:2]
    if not first:
        return ""
    return f" (numbers {first}..{end - 1}: fxpass's int8 calibrates on the {first} before them)"


def precision_notes(section: dict[str, Any]) -> list[str]:
    """The sentences under the precision table: what the eps column means, how each row was built."""
    notes = []
    fid = section.get("fidelity") or {}
    if "images" in fid:
        notes.append(f"eps-MSE: ratio of each row's eps-MSE to the eager float32 model's on the trained digits "
                     f"reference (`{fid['model']}`, lowered with fxpass and built the same way), {fid['images']} "
                     f"held-out image{'s' if fid['images'] != 1 else ''}{_range_text(fid)} at every one of its "
                     f"{fid['steps']} schedule steps (seed {fid['seed']}); the worst over t is the one farthest "
                     f"from 1. Latency uses seeded random weights, which say nothing about accuracy")
    elif _entry_problem(fid):
        notes.append(f"eps-MSE on the digits reference: {_entry_problem(fid)}")
    rows = {r["key"]: r for r in section.get("rows", [])}
    builds = []
    for name, info in (section.get("fxpass_int8") or {}).items():
        where = ("the bench config (calibrated on the model's own trajectories)" if name == "bench"
                 else "the digits reference")
        plan = _plan_text(info)
        builds.append(f"fxpass int8 on {where} {secs(info.get('quantize_s'))}" + (f" ({plan})" if plan else ""))
    for key, label, field in (("nncf_int8", "NNCF", "quantize_s"), ("ort_int8_default", "ORT quantize_static",
                                                                     "quantize_s"),
                              ("torch_compile", "torch.compile's first call", "compile_s")):
        build = (rows.get(key, {}).get("latency") or {}).get("build") or {}
        if build.get(field) is not None:
            extra = f" ({build['graphs']} graphs: a graph break)" if (build.get("graphs") or 0) > 1 else ""
            builds.append(f"{label} {secs(build[field])}{extra}")
    if builds:
        notes.append("Build times on the bench config unless said: " + "; ".join(builds))
    if section.get("baseline_calibration"):
        notes.append(f"Baselines (ORT quantize_static, NNCF) calibrate on {section['baseline_calibration']}; "
                     "ORT's activations are QUInt8 because with the default QInt8 ONNX Runtime refuses the file "
                     "at load (the Softmax output's QuantizeLinear gets a uint8 zero point)")
    rp = section.get("repaint_full") or {}
    if "wall_s" in rp:
        notes.append(f"A whole RePaint run (t_T {rp['t_T']}, jump_length {rp['jump_length']}, jump_n_sample "
                     f"{rp['jump_n_sample']}: {rp['model_calls']:,} model calls) on {rp['row']}: "
                     f"{secs(rp['wall_s'])} ({rp['wall_s'] / 60:.1f} min; {rp['model_s']:.0f} s in the model); "
                     f"{rp.get('why', '')}")
    elif rp and _entry_problem(rp) and not rp.get("skipped", "").startswith("off by default"):
        notes.append(f"RePaint full run: {_entry_problem(rp)}")
    return notes


def print_precision(section: dict[str, Any] | None, console) -> None:
    from rich.table import Table

    if section is None:
        return
    problem = _entry_problem(section)
    if problem:
        console.print(f"precision section {problem}")
        return
    lat = section.get("latency_config", {})
    t = Table(title=f"precision — CPU, batch 1, {lat.get('image_size')}×{lat.get('image_size')}, "
                    f"{section.get('threads')} threads; eps-MSE on the trained digits reference", title_justify="left")
    for col in ("runtime", "precision", "what", "per step", "vs eager", "eps-MSE vs fp32, worst over t"):
        t.add_column(col, justify="right" if col in ("per step", "vs eager") else "left")
    for c in precision_cells(section):
        t.add_row(c["runtime"], c["precision"], c["what"], c["latency"], c["vs_eager"], c["eps"])
    console.print(t)
    for note in precision_notes(section):
        console.print(f"- {note}.")


def _top_ops(naive: dict[str, Any], fx: dict[str, Any], n: int = 5) -> str:
    if not naive or not fx:
        return ""
    ops = list(naive.get("ops", {}))[:n]
    return "; ".join(f"{op} {naive['ops'].get(op, 0)}→{fx.get('ops', {}).get(op, 0)}" for op in ops)
