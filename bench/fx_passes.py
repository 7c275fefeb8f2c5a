"""Node counts and times of capture and each fx pass on the CAMUS model: ``python -m bench.fx_passes``."""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def main(argv=None) -> int:
    from fxpass import capture
    from fxpass.checkpoint import init_model
    from fxpass.config import CAMUS, load_config
    from fxpass.passes import default_passes
    from fxpass.schedule import respaced

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML (default: built-in CAMUS)")
    parser.add_argument("--fixed", type=int, help="fold this one timestep instead of the schedule")
    args = parser.parse_args(argv)
    cfg = load_config(args.config) if args.config else CAMUS
    model = init_model(cfg, seed=0)
    schedule = respaced(cfg.diffusion_steps, cfg.timestep_respacing)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    gm = capture(model, (x, torch.tensor([schedule[-1]])))
    rows = [{"stage": "capture", "nodes": len(gm.graph.nodes), "seconds": time.perf_counter() - t0,
             "asserts": sum(1 for n in gm.graph.nodes if n.target is torch._assert),
             "sqrt": sum(1 for n in gm.graph.nodes if n.target is math.sqrt)}]
    total = rows[0]["seconds"]
    for p in default_passes(args.fixed if args.fixed is not None else schedule):
        name = getattr(p, "__name__", type(p).__name__)
        t0 = time.perf_counter()
        gm = p(gm).graph_module
        seconds = time.perf_counter() - t0
        total += seconds
        rows.append({"stage": name, "nodes": len(gm.graph.nodes), "seconds": seconds,
                     "rewrites": gm.meta["fxpass_rewrites"].get(
                         {"FoldTimesteps": "fold_timesteps"}.get(name, name)),
                     "asserts": sum(1 for n in gm.graph.nodes if n.target is torch._assert),
                     "sqrt": sum(1 for n in gm.graph.nodes if n.target is math.sqrt)})
    for r in rows:
        print(f"{r['stage']:<30} nodes {r['nodes']:>5}  rewrites {str(r.get('rewrites', '-')):>4}  "
              f"asserts {r['asserts']:>3}  sqrt {r['sqrt']:>3}  {r['seconds']:.2f} s")
    print(f"capture + passes: {total:.2f} s (torch threads {torch.get_num_threads()})")
    indices = [0, 1, len(schedule) // 2, len(schedule) - 2, len(schedule) - 1] if args.fixed is None else [None]
    worst = 0.0
    with torch.no_grad():
        for i in indices:
            xi = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(7))
            if i is None:
                ref, out = model(xi, torch.tensor([args.fixed])), gm(xi)
            else:
                ref, out = model(xi, torch.tensor([schedule[i]])), gm(xi, torch.tensor([i]))
            err = float((out - ref).abs().max() / ref.abs().max())
            worst = max(worst, err)
            print(f"t_index {i}: max|diff|/max|ref| = {err:.2e}")
    print(json.dumps({"rows": rows, "worst_rel_err": worst}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
