"""Issue 10 item 4: why a plan's decode batch differs from the simulator's (placement.ilp.batching).

    PYTHONPATH=. python benchmarks/fidelity_batch.py [--fleet examples/paper-a40-disagg.yaml]
        [--conversations 255,1000,4000] [--seeds 0,1,2] [--iid]

For the fleet's plan (made as `orchestrator plan` makes it) it prints, per stream length and seed, the
simulator's per-decoder figures over the verification's steady window (orchestrator.verify: turn-1
placements and their rate, time-averaged running batch, decode tokens/s, token-weighted step, context per
sequence, sequences admitted but not yet decoding, pinned conversations), the decode step per batch size
against the tier model's (the step law), and the window's mean last-turn TBT; then the model's side: the
pool's stationary batch law and the same birth-death chain started empty, averaged over each stream's steady
window (its transient). --iid draws the stream's conversations with replacement instead of once per pass
(orchestrator.verify.steady_stream).

Not a speed benchmark: a measurement script (docs/planning.md, "How close the model is"). 4,000
conversations x 3 seeds take ~3 minutes on one core: run it under the heavy-job lock on the shared machine.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

import orchestrator.sim.steps as sim_steps
from orchestrator.config import load_fleet
from orchestrator.planner.inputs import demand_from_stats
from orchestrator.planner.run import make_plan
from orchestrator.sim.fleet import simulate_fleet
from orchestrator.verify import policy_for, steady_stream
from orchestrator.workload import ConversationSpec, workload_from_config
from placement.ilp.batching import batch_law, instance_steps_s

# per committed step or stretch: (t0, t1, steps, decoding, context of the decoding sequences, prefill step,
# sequences admitted but not decoding (waiting, in transfer, joining), pinned conversations)
_LOG: dict[str, list[tuple[float, float, int, int, int, bool, int, int]]] = defaultdict(list)
_commit = sim_steps.Stepping._commit


def _logged_commit(self, inst, t):  # type: ignore[no-untyped-def]
    t0, n, _, _, _, is_pre, _ = inst.cur
    other = len(inst.waiting) + inst.running_other + len(inst.pending_join)
    _LOG[inst.id].append((t0, t, n, inst.n_decode, inst.ctx_sum, is_pre, other, len(inst.pinned)))
    return _commit(self, inst, t)


def iid_stream(base: Sequence[ConversationSpec], n: int, rate: float, seed: int) -> list[ConversationSpec]:
    """steady_stream with the conversations drawn with replacement (arrivals as there)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), n)
    convs = [replace(base[int(i)], conversation_id=f"s{seed}-{k}") for k, i in enumerate(idx)]
    gaps = rng.exponential(1.0, n - 1)
    gaps *= (n - 1) / rate / gaps.sum()
    times = np.concatenate(([0.0], np.cumsum(gaps)))
    return [replace(c, arrival_s=float(x)) for c, x in zip(convs, times, strict=True)]


def chain_transient(
    steps_s: np.ndarray, rate: float, k: float, n: int, windows: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """The pool's birth-death chain (placement.ilp.batching) started empty: for each window, its mean batch
    per instance and its token-weighted mean step (s) under the law averaged over the window. The forward
    equation p' = p Q is integrated with classical Runge-Kutta steps of 1/(10 x the fastest rate) seconds."""
    cap = min(len(steps_s), 64)
    kk = np.arange(0, n * cap + 1, dtype=float)
    per = kk / n
    step_k = np.interp(np.maximum(per, 1.0 / n), np.arange(1, cap + 1, dtype=float), steps_s[:cap])
    birth = np.full(len(kk), rate)
    birth[-1] = 0.0
    death = np.where(kk > 0, kk / (k * step_k), 0.0)

    def flow(p: np.ndarray) -> np.ndarray:
        out = -(birth + death) * p
        out[1:] += birth[:-1] * p[:-1]
        out[:-1] += death[1:] * p[1:]
        return out

    dt = 0.1 / float((birth + death).max())
    p = np.zeros(len(kk))
    p[0] = 1.0
    t = 0.0
    sums = [np.zeros(len(kk)) for _ in windows]
    top = max(b for _, b in windows)
    while t < top:
        k1 = flow(p)
        k2 = flow(p + dt / 2 * k1)
        k3 = flow(p + dt / 2 * k2)
        k4 = flow(p + dt * k3)
        p = p + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t += dt
        for acc, (a, b) in zip(sums, windows, strict=True):
            if a <= t <= b:
                acc += p
    out = []
    for pbar in sums:
        pbar = pbar / max(pbar.sum(), 1e-300)
        tok = pbar[1:] * kk[1:] / step_k[1:]
        out.append((float((pbar * per).sum()), float((tok * step_k[1:]).sum() / tok.sum())))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fleet", type=Path, default=Path("examples/paper-a40-disagg.yaml"))
    ap.add_argument("--conversations", default="255,1000,4000")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iid", action="store_true")
    args = ap.parse_args(argv)
    sim_steps.Stepping._commit = _logged_commit  # type: ignore[method-assign]
    cfg = load_fleet(args.fleet)
    run = make_plan(cfg)
    rate = run.plan.predictions.arrival_rate_per_s
    demand = demand_from_stats(replace(run.stats, arrival_rate_per_s=rate))
    dec = max((p for p in run.result.pools if p.option.does_decode), key=lambda p: p.arrival_rate_per_s)
    k = demand.decode_tokens + demand.later_turns
    steps = instance_steps_s(dec.option, demand)
    ctx = demand.decode_context_tokens
    pure = [dec.option.model.decode_step_time_s(b, int(b * ctx)) for b in range(1, 13)]
    law = batch_law(steps, dec.arrival_rate_per_s, k, dec.instances)
    each = dec.arrival_rate_per_s / dec.instances
    print(
        f"plan: {rate:.4f} conv/s, {dec.instances} x {dec.option.model.name} decoders at {each:.4f} conv/s "
        f"each; K = O + Kn = {k:.1f} steps, decode context {ctx:.0f} tokens; demand {each * k:.1f} tokens/s "
        f"per decoder; batch law: mean batch {law.mean_batch:.2f}, mean step {law.step_tok_s * 1e3:.2f} ms, "
        f"step CV {law.step_cv_tok:.3f}, tau_c {law.tau_c_s:.1f} s"
    )
    base = workload_from_config(cfg.workload)
    policy, opts = policy_for(run, cfg)
    stream = iid_stream if args.iid else steady_stream
    for n in [int(x) for x in args.conversations.split(",") if x.strip()]:
        per_b: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        windows = []
        tbts = []
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            _LOG.clear()
            convs = stream(base, n, rate, seed)
            res, _ = simulate_fleet(
                cfg, run.plan, policy, None, seed=seed, conversations=convs, policy_options=opts,
                energy_window_s=None,
            )  # fmt: skip
            t_end = max(c.arrival_s for c in convs)
            e2e = float(np.mean([c.e2e_s for c in res.conversations]))
            t_w = min(max(e2e, 0.1 * t_end), 0.3 * t_end)
            windows.append((t_w, t_end))
            span = t_end - t_w
            place: dict[str, int] = defaultdict(int)
            for tr in res.turns:
                if tr.turn == 1 and t_w <= tr.arrival_s <= t_end:
                    place[tr.decode_instance] += 1
            cut = t_end - e2e
            tb = [c.last_turn_tbt_mean_s for c in res.conversations if t_w <= c.arrival_s <= cut]
            tbts.append(float(np.mean([x for x in tb if x > 0])))
            print(f"\n{n} conversations, seed {seed}: window [{t_w:.0f}, {t_end:.0f}] s, mean last-turn TBT "
                  f"{tbts[-1] * 1e3:.2f} ms")  # fmt: skip
            for iid in sorted(_LOG):
                if iid not in place and not any(r[3] for r in _LOG[iid]):
                    continue
                a = np.array([(*r[:5], float(r[5]), *r[6:]) for r in _LOG[iid]], dtype=float)
                lo, hi = np.clip(a[:, 0], t_w, t_end), np.clip(a[:, 1], t_w, t_end)
                dur = hi - lo
                frac = np.where(a[:, 1] > a[:, 0], dur / np.maximum(a[:, 1] - a[:, 0], 1e-12), 0.0)
                tokens = float((a[:, 3] * a[:, 2] * frac).sum())
                print(
                    f"  {iid}: turn-1 placements {place[iid]} ({place[iid] / span:.3f}/s), batch "
                    f"{(dur * a[:, 3]).sum() / span:.2f}, {tokens / span:.1f} tokens/s, step "
                    f"{(dur * a[:, 3]).sum() / max(tokens, 1) * 1e3:.2f} ms, context/sequence "
                    f"{(dur * a[:, 4]).sum() / max((dur * a[:, 3]).sum(), 1e-9):,.0f}, admitted not decoding "
                    f"{(dur * a[:, 6]).sum() / span:.2f}, pinned {(dur * a[:, 7]).sum() / span:.2f}"
                )
                for t0, t1, ns, nd, _, pre, _, _ in _LOG[iid]:
                    if not pre and 1 <= nd <= 12 and t_w <= t0 and t1 <= t_end:
                        per_b[nd][0] += t1 - t0
                        per_b[nd][1] += ns
        print(
            f"\n{n} conversations: mean last-turn TBT over seeds {np.mean(tbts) * 1e3:.2f} ms (batch law "
            f"{law.step_tok_s * 1e3:.2f}); decode step by batch, simulated vs tier model (ms):"
        )
        cells = [f"{b}: {v[0] / v[1] * 1e3:.2f}/{pure[b - 1] * 1e3:.2f}" for b, v in sorted(per_b.items())]
        print("  " + ", ".join(cells))
        avg = ", ".join(
            f"{b:.2f} ({t * 1e3:.2f} ms)"
            for b, t in chain_transient(steps, dec.arrival_rate_per_s, k, dec.instances, windows)
        )
        print(
            f"  the chain started empty, mean batch (token-weighted step) over each seed's window: {avg}; "
            f"stationary {law.mean_batch:.2f} ({law.step_tok_s * 1e3:.2f} ms)"
        )


if __name__ == "__main__":
    main()
