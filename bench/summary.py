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
    from rich.table import Table

    console = console or Console(highlight=False)
    machine, settings, cpu = results["machine"], results["settings"], results.get("cpu", {})
    ram = machine.get("ram_bytes")
    title = (f"fxpass bench — {results['config']['name']} ({cpu.get('image_size')}×{cpu.get('image_size')}, "
             f"batch 1) — {machine['cpu_model']}, {machine['cores']} cores"
             + (f", {ram / 2**30:.0f} GiB" if ram else "") + f" — {results['date']}")
    table = Table(title=title, title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("vs eager", justify="right")
    table.add_column("notes")
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
    r = cpu.get("ratios", {})
    table.add_row("fxpass / eager", ratio(r.get("fxpass_over_eager")), "", "")
    table.add_row("fxpass / naive", ratio(r.get("fxpass_over_naive")), "", "")
    nodes = cpu.get("nodes", {})
    table.add_row("ONNX nodes: naive → fxpass", f"{nodes.get('naive') or '—'} → {nodes.get('fxpass') or '—'}", "",
                  _top_ops(naive_graph, fx_graph))
    naive_build = cpu.get("naive_build", {})
    if "export_s" in naive_build:
        table.add_row("naive export time", secs(naive_build["export_s"]), "", "torch.onnx.export(dynamo=True)")
    fx_build = cpu.get("fxpass_build", {})
    if "lower_s" in fx_build:
        table.add_row("fxpass lower_with_report (in process)", secs(fx_build["lower_s"]), "",
                      stage_text(fx_build.get("stages_s", {})))
    cli = cpu.get("lower_cli")
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
    sched = cpu.get("schedule")
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
    flops = results.get("flops", {})
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
    load = results.get("load", {})
    if load.get("max_load1") is not None:
        table.add_row("load average (1 min) during run", f"max {load['max_load1']:.2f}", "",
                      f"mean {load['mean_load1']:.2f} over {len(load['samples'])} samples")
    console.print(table)

    targets = results.get("targets")
    if targets:
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
        console.print(t)

    gpu = results.get("gpu")
    if gpu is not None:
        if "skipped" in gpu or "error" in gpu:
            console.print(f"GPU section {_problem(gpu)}")
        else:
            g = Table(title=f"GPU — {gpu['device'].get('name')} (CUDA {gpu['device'].get('cuda')})",
                      title_justify="left")
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
                    g.add_row(row["name"], row["precision"], str(row["batch"]), "—", "—", "—",
                              _problem(row) or "")
            console.print(g)
            if gpu.get("peak"):
                console.print(f"peak: nominal dense figures for {gpu['peak']['matched']} "
                              f"(fp16 {gpu['peak']['fp16']:.0f}, fp32 {gpu['peak']['fp32']:.1f} TFLOP/s)")


def _top_ops(naive: dict[str, Any], fx: dict[str, Any], n: int = 5) -> str:
    if not naive or not fx:
        return ""
    ops = list(naive.get("ops", {}))[:n]
    return "; ".join(f"{op} {naive['ops'].get(op, 0)}→{fx.get('ops', {}).get(op, 0)}" for op in ops)
