"""Side by side with NVIDIA AIConfigurator (issue 10 acceptance): the same serving questions to both tools.

Each question: a dense model on N GPUs of one system, single-turn requests of fixed input/output length, a
TTFT bound and a TPOT bound. AIConfigurator (``cli_default``, backend vLLM, its measured kernel tables)
answers with its best aggregated and best disaggregated configuration and their output tokens/s per GPU.
ConServe answers through ``orchestrator plan --max-rate --json`` on a generated fleet file (one tier of N
GPUs, the model from the catalog, a synthetic single-turn workload with those lengths, absolute SLOs
``ttfet_s`` and ``tbt_ms``): output tokens/s per GPU = planned conversations/s x output tokens / GPUs used.

TTFT definitions (they differ; the table says which is which):
- AIConfigurator: the modelled prefill latency of a request inside its in-flight-batching step model (agg) or
  on the prefill worker (disagg); no queueing behind other requests.
- ConServe: TTFET at the SLO percentile from the conversation's arrival (queueing included), as the planner
  models it. For a single-turn request TTFET = TTFT.

    python benchmarks/bench_aiconfigurator.py [--json]

Needs the optional extra (pip install 'conserve[aiconfigurator]'). Heavy (a few minutes): run it under the
team's lock. It calls the planner only through the public CLI, so it keeps working when the planner changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Question:
    model: str  # our catalog name
    gpu: str  # our catalog name
    gpus: int
    isl: int
    osl: int
    ttft_ms: float
    tpot_ms: float


QUESTIONS = (
    Question("Llama-3.1-8B", "H200-SXM", 8, 4000, 500, 1000.0, 50.0),
    Question("Llama-3.1-8B", "H100-SXM", 8, 4000, 500, 1000.0, 50.0),
    Question("Llama-3.1-70B", "H200-SXM", 8, 4000, 500, 1000.0, 50.0),
    Question("Llama-3.1-70B", "H100-SXM", 8, 4000, 500, 1000.0, 50.0),
)


def ask_aiconfigurator(q: Question) -> dict[str, object]:
    from aiconfigurator.cli.api import cli_default

    from tiers.aiconfigurator import AIC_MODELS, AIC_SYSTEMS

    logging.getLogger("aiconfigurator").setLevel(logging.ERROR)
    r = cli_default(
        AIC_MODELS[q.model], q.gpus, AIC_SYSTEMS[q.gpu], backend="vllm", isl=q.isl, osl=q.osl,
        ttft=q.ttft_ms, tpot=q.tpot_ms, top_n=1,
    )  # fmt: skip
    out: dict[str, object] = {"chosen": r.chosen_exp}
    for mode in ("agg", "disagg"):
        df = r.best_configs.get(mode)
        if df is None or len(df) == 0:
            out[mode] = None
            continue
        row = df.iloc[0]
        out[mode] = {
            "tokens_per_s_per_gpu": float(row["tokens/s/gpu_cluster"]),
            "ttft_ms": float(row["ttft"]),
            "tpot_ms": float(row["tpot"]),
            "parallel": str(row.get("parallel", "")),
        }
    return out


def fleet_file(q: Question, mode: str, path: Path) -> Path:
    cfg = {
        "model": q.model,
        # every serving mode AIConfigurator weighs: aggregated (our colocated, opt-in per tier), disaggregated
        "tiers": [
            {
                "name": "gpu",
                "gpu": q.gpu,
                "count": q.gpus,
                "tp": [1, 2, 4, 8],
                "link": "nvlink",
                "roles": ["prefill", "decode", "colocated"],
            }
        ],
        "workload": {
            "format": "synthetic",
            "synthetic": {
                "turn1_input_tokens_median": q.isl,
                "turn1_input_tokens_sigma": 0.0,
                "turns_mean": 1,
                "output_tokens_mean": q.osl,
            },
            "conversations": 400,
            "arrival_rate_per_s": 1.0,
            "seed": 0,
        },
        "slo": {
            "percentile": 95,
            "ttfet_slowdown": None,
            "tbt_slowdown": None,
            "e2e_slowdown": None,
            "ttfet_s": q.ttft_ms / 1e3,
            "tbt_ms": q.tpot_ms,
        },
        "reference_tier": "gpu",
        "objective": "throughput" if mode == "throughput" else "energy",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ask_conserve(q: Question, workdir: Path) -> dict[str, object]:
    fleet = fleet_file(q, "energy", workdir / f"{q.model}-{q.gpu}.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = "from orchestrator.cli import main; main()"
    cmd = [sys.executable, "-c", cli, "plan", "--fleet", str(fleet), "--max-rate", "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    elapsed = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:], "elapsed_s": elapsed}
    # from the first "{": HiGHS may print its banner on stdout first (issue 10 item 6, engineer plan's fix)
    doc = json.loads(p.stdout[p.stdout.index("{") :])
    plan = doc.get("plan", doc)
    pred = plan.get("predictions", {})
    pools = plan.get("pools", [])
    gpus = sum(int(x.get("instances", 0)) * int(x.get("tp", 1)) for x in pools) or q.gpus
    roles = sorted({str(x.get("role")) for x in pools if int(x.get("instances", 0)) > 0})
    rate = float(doc.get("workload", {}).get("arrival_rate_per_s") or plan.get("arrival_rate_per_s") or 0.0)
    return {
        "mode": "disagg" if "prefill" in roles else "agg",
        "roles": roles,
        "gpus": gpus,
        "rate_per_s": rate,
        "tokens_per_s_per_gpu": rate * q.osl / gpus if gpus else 0.0,
        "pools": [{k: x.get(k) for k in ("role", "instances", "tp", "power_cap_w")} for x in pools],
        "predictions": pred,
        "elapsed_s": round(elapsed, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from importlib import metadata

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for q in QUESTIONS:
            theirs = ask_aiconfigurator(q)
            ours = ask_conserve(q, Path(tmp))
            rows.append({"question": asdict(q), "aiconfigurator": theirs, "conserve": ours})
            print(f"done: {q.model} on {q.gpus} x {q.gpu}", file=sys.stderr, flush=True)
    meta = {"aiconfigurator": metadata.version("aiconfigurator"), "backend": "vllm"}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
        return
    print(f"AIConfigurator {meta['aiconfigurator']} (vllm) vs ConServe `orchestrator plan --max-rate`")
    print(
        "| question | AIC agg tok/s/GPU | AIC disagg tok/s/GPU | AIC choice | ours tok/s/GPU | ours mode "
        "| ours/AIC best |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        q, t, o = r["question"], r["aiconfigurator"], r["conserve"]
        agg = t.get("agg") or {}
        dis = t.get("disagg") or {}
        best = max(float(agg.get("tokens_per_s_per_gpu", 0.0)), float(dis.get("tokens_per_s_per_gpu", 0.0)))
        ours = float(o.get("tokens_per_s_per_gpu", 0.0))
        label = f"{q['model']} {q['gpus']}x{q['gpu']} {q['isl']}/{q['osl']}"
        label += f" TTFT {q['ttft_ms']:g} ms TPOT {q['tpot_ms']:g} ms"
        print(
            f"| {label} | {agg.get('tokens_per_s_per_gpu', 0):,.0f} (TTFT {agg.get('ttft_ms', 0):.0f} ms) "
            f"| {dis.get('tokens_per_s_per_gpu', 0):,.0f} | {t.get('chosen')} | {ours:,.0f} | "
            f"{o.get('mode', o.get('error'))} | {ours / best if best else float('nan'):.2f} |"
        )


if __name__ == "__main__":
    main()
