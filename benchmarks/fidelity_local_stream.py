"""Issue 10 item 4: why the hybrid decoders' local prompts wait longer in the simulator than in the step chain
(placement.ilp.stepchain), on the verification's steady window.

    PYTHONPATH=. python benchmarks/fidelity_local_stream.py [--fleet examples/fleet-single-turn.yaml]
        [--conversations N]

For the fleet's plan (made as `orchestrator plan` makes it) it runs the verification's streams (seeds 0-2,
orchestrator.verify.steady_stream, its steady window) with a logger on the decoders' steps and prints, for
the steady turn-1 prompts of single-turn conversations: the share over the predicted p95 slowdown (local /
remote) against the model's; the local prompts' wait beyond their own mixed step against the chain's Y; how
often a local prompt's first-token step prefilled another prompt; the decode part of that step (the batch's
swings) for the tail and the rest; the local arrivals per decoder (gaps against a Poisson thinning) and how
often two consecutive turn-1 arrivals were placed on the same decoder, by their gap. Against the models
(placement.ilp.routing, placement.ilp.prefillpool): the routing model's P(same decoder) by gap and its Palm
rate of same-decoder local neighbours against the simulator's, the local chain at that rate, the prefill
pool model's delay sample against the simulated prefiller side, and the pool's steps replayed on the
simulator's own remote arrivals against every simulated prefill end. Last, a diagnostic (not the model):
the prediction with the chain's local rate scaled by n x P(same decoder | gap < 0.1 s).

Not a speed benchmark: a measurement script (docs/planning.md, "How close the model is"); ~10 s on one core.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

import orchestrator.sim.steps as sim_steps
import placement.ilp.predict as ilp_predict
from orchestrator.config import load_fleet
from orchestrator.metrics import SloSpec, conversation_metrics
from orchestrator.planner.run import make_plan
from orchestrator.sim.fleet import reference_tier_model, simulate_fleet
from orchestrator.sim.standalone import StandaloneCache
from orchestrator.verify import RAMP_TAU_C, decode_relaxation_s, policy_for, steady_stream, stream_length
from orchestrator.workload import workload_from_config
from placement.ilp.prefillpool import PREFILL_BUDGET_TOKENS, pool_ends
from placement.ilp.queueing import wait_tail
from placement.ilp.routing import near_local_rate
from placement.ilp.stepchain import StepChain

# per committed step or stretch: (t0, t1, sequences decoding, prefill step, chunks, decode part of the step s)
_LOG: dict[str, list[tuple[float, float, int, bool, int, float]]] = defaultdict(list)
_commit = sim_steps.Stepping._commit


def _recording(fn: Any, sink: list[Any]) -> Any:
    """fn, appending each of its results to sink (the planner's internals, read after make_plan)."""

    def spy(*a: Any, **k: Any) -> Any:
        out = fn(*a, **k)
        sink.append(out)
        return out

    return spy


def _logged_commit(self, inst, t):  # type: ignore[no-untyped-def]
    t0, _, _, _, _, is_pre, chunks = inst.cur
    nd = inst.n_decode
    dd = inst.tm.decode_step_time_s(nd, inst.ctx_sum) if nd else 0.0
    _LOG[inst.id].append((t0, t, nd, is_pre, len(chunks), dd))
    return _commit(self, inst, t)


def _q(x: np.ndarray, qs: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99)) -> str:
    return " / ".join(f"{v:.3f}" for v in np.quantile(x, qs)) if len(x) else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fleet", type=Path, default=Path("examples/fleet-single-turn.yaml"))
    ap.add_argument("--conversations", type=int, default=None, help="per seed (default: the verification's)")
    args = ap.parse_args()
    cfg = load_fleet(args.fleet)
    captured: list[tuple[list[Any], float]] = []
    chains: list[tuple[StepChain, tuple[np.ndarray, float, float]]] = []
    mixture = ilp_predict.mixture_quantile
    chain_cls = ilp_predict.StepChain

    def spy_mixture(parts, pct):  # type: ignore[no-untyped-def]
        out = mixture(parts, pct)
        captured.append((parts, out))
        return out

    def spy_chain(parts_s: np.ndarray, rate: float, step: float) -> StepChain:
        c = chain_cls(parts_s, rate, step)
        chains.append((c, (parts_s, rate, step)))
        return c

    local_steps = ilp_predict._local_steps_s
    steps_args: list[tuple] = []

    def spy_steps(dec, batch, demand):  # type: ignore[no-untyped-def]
        steps_args.append((dec, batch, demand))
        return local_steps(dec, batch, demand)

    routing_spy: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    routed = ilp_predict.routed_stream
    ilp_predict.routed_stream = _recording(routed, routing_spy)
    pool_spy: list[np.ndarray] = []
    pool_sample = ilp_predict.pool_delay_sample
    ilp_predict.pool_delay_sample = _recording(pool_sample, pool_spy)
    ilp_predict._local_steps_s = spy_steps
    ilp_predict.mixture_quantile = spy_mixture  # type: ignore[assignment]
    ilp_predict.StepChain = spy_chain  # type: ignore[assignment,misc]
    run = make_plan(cfg)
    ilp_predict.mixture_quantile, ilp_predict.StepChain = mixture, chain_cls  # type: ignore[misc]
    ilp_predict._local_steps_s = local_steps
    ilp_predict.routed_stream = routed
    ilp_predict.pool_delay_sample = pool_sample
    pred = run.plan.predictions.ttfet_p95_slowdown
    parts = [p for p, r in captured if abs(r - pred) < 0.006 and len(p) == 2][-1]
    with_rate = [c for c in chains if c[1][1] > 0]
    # per prediction: the even split's chain, then (hybrid, n > 1) the routing's near chain for local prompts
    near_chain = with_rate[-1][0]
    chain, (p_local, lam, d) = with_rate[-2] if routing_spy else with_rate[-1]

    sim_steps.Stepping._commit = _logged_commit  # type: ignore[method-assign]
    rate = run.plan.predictions.arrival_rate_per_s
    n = args.conversations or stream_length(cfg, run)
    base = workload_from_config(cfg.workload)
    policy, opts = policy_for(run, cfg)
    slo = SloSpec.from_config(cfg.slo)
    sa = StandaloneCache(reference_tier_model(cfg))
    ramp_s = RAMP_TAU_C * decode_relaxation_s(run)
    rows: list[dict] = []
    arrivals: list[tuple[int, float, str, bool]] = []
    replays: list[np.ndarray] = []  # per seed: every remote turn's (arrival, prompt tokens, prefill end)
    for seed in (0, 1, 2):
        _LOG.clear()
        convs = steady_stream(base, n, rate, seed)
        res, _ = simulate_fleet(
            cfg, run.plan, policy, None, seed=seed, conversations=convs, policy_options=opts,
            energy_window_s=1.0,
        )  # fmt: skip
        mets = conversation_metrics(res, convs, sa, slo)
        t_end = max(c.arrival_s for c in convs)
        e2e = float(np.mean([m.e2e_s for m in mets]))
        t_w = min(max(e2e, ramp_s, 0.1 * t_end), 0.3 * t_end)
        t_cut = max(t_end - e2e, t_w)
        logs = {k: np.array(v) for k, v in _LOG.items()}
        first = {tr.conversation_id: tr for tr in res.turns if tr.turn == 1}
        rem_all = sorted(
            (tr.arrival_s, tr.input_tokens, tr.prefill_end_s) for tr in res.turns if tr.remote_prefill
        )
        replays.append(np.array(rem_all, dtype=float).reshape(-1, 3))
        for m in mets:
            if not (t_w <= m.arrival_s <= t_cut) or m.ttfet_slowdown is None:
                continue
            tr = first[m.conversation_id]
            arrivals.append((seed, tr.arrival_s, tr.decode_instance, tr.remote_prefill))
            if m.turns != 1:
                continue
            lg = logs[tr.decode_instance]
            i = min(int(np.searchsorted(lg[:, 1], tr.arrival_s)), len(lg) - 1)
            j = min(int(np.searchsorted(lg[:, 1], tr.first_token_s - 1e-9)), len(lg) - 1)
            rows.append(
                dict(sd=m.ttfet_slowdown, remote=tr.remote_prefill, L=tr.input_tokens, ttft=tr.ttft_s,
                     ps=tr.prefill_start_s, pe=tr.prefill_end_s, arr=tr.arrival_s, batch=lg[i, 2],
                     chunks=lg[j, 4], dd=lg[j, 5])
            )  # fmt: skip
    sim_steps.Stepping._commit = _commit  # type: ignore[method-assign]

    sd = np.array([r["sd"] for r in rows])
    rem = np.array([r["remote"] for r in rows])
    p95 = float(np.quantile(sd, 0.95))
    print(f"{args.fleet}: predicted p95 TTFET slowdown {pred:.3f}, single-turn steady p95 {p95:.3f}, "
          f"{len(rows)} single-turn conversations ({int((~rem).sum())} local)")  # fmt: skip
    w = sum(p[0] for p in parts)
    for x in (pred, p95):
        model = [float(np.mean(p[7](x * p[5] - p[4]))) for p in parts]
        print(
            f"share over {x:.2f}x: local {np.mean(sd[~rem] > x):.3f} sim / {model[1]:.3f} model, "
            f"remote {np.mean(sd[rem] > x):.3f} / {model[0]:.3f} (weights {parts[0][0] / w:.2f} remote)"
        )
    loc = [r for r in rows if not r["remote"]]
    ll = np.array([r["L"] for r in loc])
    # each prompt's own prefill part of a mixed step next to the planned batch (predict._local_steps_s)
    dec, batch, demand = steps_args[-1]
    lengths = np.array([c.turn1_tokens for c in demand.conv_shapes], dtype=float)
    b0 = dec.model.decode_step_time_s(max(1, round(batch)), round(batch * demand.decode_context_tokens))
    srt = np.argsort(lengths)
    own = np.interp(ll, lengths[srt], (local_steps(dec, batch, demand) - b0)[srt])
    y = np.array([r["ttft"] for r in loc]) - d - own
    yq = {}
    for name, c in (("even-split chain", chain), ("routing chain", near_chain)):
        yc = np.cumsum(c.local_wait())
        yq[name] = " / ".join(
            f"{float(np.interp(q, yc, c.values[: len(yc)])):.3f}" for q in (0.5, 0.9, 0.95, 0.99)
        )
    print(
        f"local Y (TTFT - d - p_i) p50/p90/p95/p99: sim {_q(y)}, "
        + ", ".join(f"{k} {v}" for k, v in yq.items())
    )
    # remote prompts: TTFT beyond the model's fixed part c_i (prefill + a late join), against P(W + H > b)
    npt = len(parts[0][4]) // max(1, int(len(lengths) - len(p_local)))
    c_rem = parts[0][4].reshape(-1, npt)[:, 0]
    thr = run.plan.predictions.conserve_threshold_tokens or 0
    l_rem = lengths[lengths >= thr]
    if len(l_rem) == len(c_rem):
        rr = [r for r in rows if r["remote"]]
        srt = np.argsort(l_rem)
        ex = np.array([r["ttft"] for r in rr]) - np.interp([r["L"] for r in rr], l_rem[srt], c_rem[srt])
        bs = (0.2, 0.4, 0.6, 0.8, 1.0)
        print(
            "remote P(TTFT - c_i > b), b = "
            + ", ".join(f"{b:g}" for b in bs)
            + " s: sim "
            + " / ".join(f"{np.mean(ex > b):.3f}" for b in bs)
            + ", model "
            + " / ".join(f"{float(parts[0][7](np.array([b]))[0]):.3f}" for b in bs)
        )
        # the prefiller side: wait + prefill beyond the prompt's own prefill, against the M/G/k wait W
        pre = [p.option for p in run.result.pools if p.option.role == "prefill"][0]
        s_i = np.array([pre.model.prefill_time_s(r["L"]) for r in rr])
        stretch = np.array([r["pe"] - r["ps"] for r in rr]) - s_i
        side = np.array([r["pe"] - r["arr"] for r in rr]) - s_i
        p_wait, theta = wait_tail(parts[0][1], parts[0][2], parts[0][3], parts[0][6])
        w_q = [max(0.0, theta * math.log(p_wait / (1.0 - q))) for q in (0.9, 0.95, 0.99)]
        print(
            f"remote prefill stretched by shared steps: {np.mean(stretch > 0.01):.3f} of them, "
            f"p90 / p95 / p99 {_q(stretch, (0.9, 0.95, 0.99))} s; prefiller side mean {side.mean():.3f} s, "
            f"p90/95/99 {_q(side, (0.9, 0.95, 0.99))}; M/G/{parts[0][6]} W mean {p_wait * theta:.3f}, "
            + " / ".join(f"{v:.3f}" for v in w_q)
        )
        # the pool model (placement.ilp.prefillpool): its delay sample against the simulated side, and its
        # steps replayed on the simulator's own remote arrivals against every simulated prefill end
        n_pre = sum(p.instances for p in run.plan.pools if p.role == "prefill")
        ok = []
        for rp in replays:
            ends = pool_ends(rp[:, 0], rp[:, 1].astype(int), n_pre, pre.model, PREFILL_BUDGET_TOKENS)
            ok.append(float(np.mean(np.abs(ends - rp[:, 2]) < 0.005)))
        v_model = pool_spy[-1] if pool_spy else np.zeros(1)
        print(
            f"prefill pool model: delay beyond the own prefill mean {v_model.mean():.3f} s, p90/95/99 "
            f"{_q(v_model, (0.9, 0.95, 0.99))} (simulated above); its steps on the simulator's remote "
            f"arrivals end within 5 ms of the simulated prefill end for "
            + " / ".join(f"{x:.3f}" for x in ok)
            + " of the prompts (seeds 0-2)"
        )
    ch = np.array([r["chunks"] for r in loc])
    top = np.array([r["sd"] for r in loc]) > pred
    print(
        f"local first-token step prefilled >= 2 prompts: sim {np.mean(ch > 1):.3f} (tail "
        f"{np.mean(ch[top] > 1):.3f}, rest {np.mean(ch[~top] > 1):.3f}); chain P(M >= 1) "
        f"{1.0 - float(chain.g[0].sum()):.3f} (routing chain {1.0 - float(near_chain.g[0].sum()):.3f})"
    )
    dd = np.array([r["dd"] for r in loc])
    bt = np.array([r["batch"] for r in rows])
    tall = sd > pred
    print(
        f"decode part of that step: mean {dd.mean() * 1e3:.1f} ms, sd {dd.std() * 1e3:.1f} ms (tail "
        f"{dd[top].mean() * 1e3:.1f}, rest {dd[~top].mean() * 1e3:.1f}; model d {d * 1e3:.1f}); batch at "
        f"arrival tail {bt[tall].mean():.1f}, rest {bt[~tall].mean():.1f}"
    )
    by: dict[tuple[int, str], list[float]] = defaultdict(list)
    for s, t, dec, remote in arrivals:
        if not remote:
            by[(s, dec)].append(t)
    gaps = np.concatenate([np.diff(sorted(v)) for v in by.values()])
    lam_sim = 1.0 / float(gaps.mean())
    cv = gaps.std() / gaps.mean()
    print(f"local arrivals per decoder: {lam_sim:.3f}/s (chain {lam:.3f}), gap CV {cv:.2f}; "
          + ", ".join(f"P(gap < {x:g} s) {np.mean(gaps < x):.3f} vs Poisson {1 - np.exp(-lam_sim * x):.3f}"
                      for x in (0.05, 0.1, 0.2)))  # fmt: skip
    n_dec = sum(1 for p in run.plan.pools if p.role != "prefill" for _ in range(p.instances))
    seq = sorted(arrivals)
    same = np.array([a[2] == b[2] for a, b in zip(seq, seq[1:], strict=False) if a[0] == b[0]])
    gap = np.array([b[1] - a[1] for a, b in zip(seq, seq[1:], strict=False) if a[0] == b[0]])
    print(f"consecutive turn-1 arrivals on the same decoder (a split: 1/{n_dec}): "
          + ", ".join(f"gap {lo:g}-{hi:g} s {same[(gap >= lo) & (gap < hi)].mean():.2f}"
                      for lo, hi in ((0, 0.1), (0.1, 0.3), (0.3, 1), (1, 3))))  # fmt: skip
    # the routing model (placement.ilp.routing) against the simulator: the Palm rate of same-decoder local
    # neighbours within +-w of a local arrival, and P(same decoder) of consecutive arrivals by their gap
    w_near = chain.mean_step_s
    sim_near = []
    for s in (0, 1, 2):
        sel = [a for a in seq if a[0] == s]
        ids = sorted({a[2] for a in sel})
        sim_near.append(
            near_local_rate(
                np.array([a[1] for a in sel]), np.array([ids.index(a[2]) for a in sel]),
                np.array([not a[3] for a in sel]), w_near,
            )
        )  # fmt: skip
    rt, rc, rl = routing_spy[-1]
    r_same = rc[1:] == rc[:-1]
    r_gap = np.diff(rt)
    print(
        f"local neighbours on the same decoder within +-{w_near * 1e3:.0f} ms: sim "
        f"{np.mean(sim_near):.3f}/s (seeds {' / '.join(f'{x:.3f}' for x in sim_near)}), routing model "
        f"{near_local_rate(rt, rc, rl, w_near):.3f}/s, even split {lam:.3f}/s; routing model P(same) "
        + ", ".join(f"gap {lo:g}-{hi:g} s {r_same[(r_gap >= lo) & (r_gap < hi)].mean():.2f}"
                    for lo, hi in ((0, 0.1), (0.1, 0.3), (0.3, 1), (1, 3)))
    )  # fmt: skip
    f = n_dec * float(same[gap < 0.1].mean())
    scaled = chain_cls(p_local, lam * f, d)
    diag = [parts[0], (*parts[1][:7], scaled.local_survival())]
    print(
        f"diagnostic (a measured input, not the model): the local chain at {f:.2f} x its rate gives "
        f"{mixture(diag, cfg.slo.percentile):.3f}"
    )


if __name__ == "__main__":
    main()
