"""`orchestrator profile --micro`: torch GEMM and memory-bandwidth kernels across power caps -> cap curves.

    orchestrator profile --micro --out curves.yaml [--fleet fleet.yaml --tier a40 | --tier A40]
                         [--caps 300,250,200] [--gpu-indices 0] [--micro-seconds 0.25] [--repeats 3] [--json]

Called by orchestrator/cli/profile.py (kept apart from the engine profiler). The caps default to the tier's
``power_caps_w``. The file is what fleet.yaml ``tiers[].cap_curves`` reads (tiers/capcurves.py); a CPU run
writes one point and says, in the file and here, that its figures are not a GPU's and no cap was applied.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.cli.common import console, err_console, print_json

CPU_NOTE = "CPU run: these figures are NOT a GPU's, no power cap was applied, power was not measured"


def profile_micro(
    out: Path,
    fleet: Path | None,
    tier: str | None,
    caps_w: tuple[float, ...],
    gpu_index: int,
    seconds: float,
    repeats: int,
    json_out: bool,
) -> None:
    from orchestrator.micro import MicroSettings, default_caps, run_micro
    from tiers.capcurves import curves_to_dict, save_cap_curves

    gpu_name = None
    if fleet is not None and tier is not None:
        from orchestrator.config import load_fleet
        from orchestrator.fleet import allowed_caps_w, find_tier

        tier_cfg = find_tier(load_fleet(fleet), tier)
        gpu_name = tier_cfg.gpu_spec().name
        caps_w = caps_w or default_caps(allowed_caps_w(tier_cfg))
    elif tier is not None:
        from tiers.catalog import get_gpu

        gpu_name = get_gpu(tier).name
    settings = MicroSettings(default_caps(caps_w), gpu_index=gpu_index, seconds=seconds, repeats=repeats)

    def note(line: str) -> None:
        if not json_out:
            err_console.print(f"  {line}", highlight=False, markup=False)

    if not json_out:
        err_console.print("micro-benchmarks: GEMM and memory copy with torch ...")
    curves = run_micro(settings, gpu_name, on_point=note)
    save_cap_curves(curves, out, header="" if curves.gpu_measured else CPU_NOTE)
    if json_out:
        print_json({"out": str(out), **curves_to_dict(curves)})
        return
    from rich.table import Table

    t = Table(title=f"cap curves ({curves.device}{', ' + curves.gpu if curves.gpu else ''})")
    cols = ("cap W", "GEMM TFLOP/s", "copy GB/s", "GEMM W", "copy W", "compute slowdown", "memory slowdown")
    for c in cols:
        t.add_column(c, justify="right")
    for p in curves.points:
        s_c, s_m = curves.slowdowns(p.cap_w) if p.cap_w is not None else (1.0, 1.0)
        watts = ["-" if w is None else f"{w:.0f}" for w in (p.gemm_power_w, p.mem_power_w)]
        t.add_row("none" if p.cap_w is None else f"{p.cap_w:g}", f"{p.gemm_tflops:.4g}", f"{p.mem_gbps:.4g}",
                  *watts, f"{s_c:.3f}", f"{s_m:.3f}")  # fmt: skip
    console.print(t)
    console.print(f"wrote {out}" + ("" if curves.gpu_measured else f" ({CPU_NOTE})"))
