"""Issue 11 item 3, one engine model: the simulated engines behind `serve --backend sim`
(orchestrator/engines/sim.py) advance on the same instance step model and link model as the discrete-event
simulator (tiers/steps.py over tiers/perf.py and tiers/links.py), for every GPU and link type.

The same turns run through SimEngine instances on a virtual-time event loop (tests/core/vloop.py) and through
the simulator with a policy that places them the same way; every turn's prefill end, first and last token
come out at the same virtual instant: prefill steps (chunked, batched with decodes, after a prefix-cache hit),
decode steps (batch and context growing and shrinking) and KV hand-offs (over the slower of two links, with a
round trip's history pull and bookkeeping).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from parity import Inst
from vloop import run_virtual

import tiers.steps
from conserve.clock import LoopClock
from orchestrator.config import load_fleet
from orchestrator.core import round_trip_tokens
from orchestrator.engines.base import EngineRequest, RequestKind
from orchestrator.engines.sim import SimEngine, SimKvFabric
from orchestrator.sim import SimOptions, SimResult, run_simulation
from orchestrator.workload import ConversationSpec, TurnSpec
from placement.base import FleetView, Placement, Role, TurnRequest
from tiers.catalog import get_gpu
from tiers.perf import TierModel

# the model of examples/fleet.yaml (Llama-3.2-3B): fits an L4 with room for KV
MODEL = load_fleet(Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml").model_spec()
# virtual seconds: both drivers add the same step durations, in a different order of float operations (the
# simulator sums a decode stretch in closed form)
ABS_S = 1e-9


def _tm(gpu: str) -> TierModel:
    return TierModel(get_gpu(gpu), MODEL)


@dataclass
class Fixed:
    """Places every turn of conversation c on decoder decode[c] (prefilled on prefill[c] when given, with a
    KV round trip of the history when round_trip)."""

    decode: dict[str, str]
    prefill: dict[str, str] = field(default_factory=dict)
    round_trip: bool = False
    name: str = "fixed"

    def place(self, turn: TurnRequest, view: FleetView) -> Placement:
        pre = self.prefill.get(turn.conversation_id)
        hist = turn.input_tokens if (self.round_trip and pre and turn.turn > 1) else 0
        return Placement(
            self.decode[turn.conversation_id], pre, transfer_kv=pre is not None, pin=True, history_tokens=hist
        )

    def observe_turn_end(self, conversation_id: str, turn: int, output_tokens: int) -> None:
        return None

    def forget(self, conversation_id: str) -> None:
        return None


def _simulate(
    insts: list[Inst], convs: list[ConversationSpec], policy: Fixed, links: dict[str, str]
) -> SimResult:
    opts = SimOptions(view_cached_histories=False)
    return run_simulation(insts, convs, policy, options=opts, links=links, energy_window_s=None)  # type: ignore[arg-type]


def _serve(
    insts: list[Inst], convs: list[ConversationSpec], policy: Fixed, links: dict[str, str]
) -> dict[tuple[str, int], tuple[float, float, float]]:
    """(conversation, turn) -> (prefill end, first token, last token), virtual seconds, from SimEngines driven
    the way the router drives them (prefill, then the decoder with the KV handle)."""
    out: dict[tuple[str, int], tuple[float, float, float]] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        clock, fabric = LoopClock(), SimKvFabric()
        engines = {
            i.instance_id: SimEngine(
                i.instance_id, i.role, i.tier, i.tier_model, model_name="m", clock=clock, fabric=fabric,
                link=links[i.tier],
            )
            for i in insts
        }  # fmt: skip

        async def client(c: ConversationSpec) -> None:
            await asyncio.sleep(c.arrival_s)
            for k, t in enumerate(c.turns, start=1):
                if k > 1:
                    await asyncio.sleep(t.tool_gap_s)
                turn = TurnRequest(c.conversation_id, k, c.input_tokens(k), t.appended_tokens)
                pl = policy.place(turn, FleetView(()))
                out_n = t.output_tokens
                body = {"model": "m", "prompt": "p", "max_tokens": out_n, "min_tokens": out_n}
                dec = engines[pl.decode_instance]
                params = None
                pre_end = loop.time()
                if pl.remote_prefill:
                    held = dec.cached_prefix_tokens(c.conversation_id)
                    hist = round_trip_tokens(pl, turn, held, dec.tier_model.block_size_tokens)
                    req = _req(c, k, body, history=hist, source=pl.decode_instance if hist else None)
                    res = await engines[pl.prefill_instance or ""].prefill(req)
                    params, pre_end = res.kv_transfer_params, loop.time()
                first = last = None
                async for _ in dec.stream(_req(c, k, body, params)):
                    last = loop.time()
                    first = first if first is not None else last
                    if not pl.remote_prefill and first == last:
                        pre_end = last
                assert first is not None and last is not None
                out[(c.conversation_id, k)] = (pre_end, first, last)

        await asyncio.gather(*(client(c) for c in convs))
        for e in engines.values():
            await e.aclose()

    run_virtual(main())
    return out


def _req(
    c: ConversationSpec,
    k: int,
    body: dict[str, Any],
    params: dict[str, Any] | None = None,
    history: int = 0,
    source: str | None = None,
) -> EngineRequest:
    rid, cid = f"{c.conversation_id}-{k}", c.conversation_id
    return EngineRequest(
        RequestKind.COMPLETION, body, rid, cid, c.input_tokens(k), params, history_tokens=history,
        history_source=source,
    )  # fmt: skip


def _compare(res: SimResult, served: dict[tuple[str, int], tuple[float, float, float]]) -> None:
    assert len(res.turns) == len(served)
    for t in res.turns:
        pre_end, first, last = served[(t.conversation_id, t.turn)]
        key = f"{t.conversation_id} turn {t.turn}"
        assert pre_end == pytest.approx(t.prefill_end_s, abs=ABS_S), f"{key}: prefill end"
        assert first == pytest.approx(t.first_token_s, abs=ABS_S), f"{key}: first token"
        assert last == pytest.approx(t.last_token_s, abs=ABS_S), f"{key}: last token"


@pytest.mark.parametrize("gpu", ["L4", "A40", "H100-SXM", "H200-SXM"])
def test_colocated_batches_prefill_chunks_decode_steps_and_prefix_hits_alike(gpu: str) -> None:
    """One instance: a 12k-token prompt (two chunks at the 8,192-token budget) joined by shorter ones while
    it prefills and decodes, and a second turn that hits the prefix cache."""
    tm = _tm(gpu)
    insts = [Inst("i0", "t", Role.COLOCATED, tm)]
    convs = [
        ConversationSpec("a", 0.0, (TurnSpec(12_000, 40), TurnSpec(301, 30, 0.25))),
        ConversationSpec("b", 0.0123, (TurnSpec(3_000, 25),)),
        ConversationSpec("c", 0.0871, (TurnSpec(517, 60), TurnSpec(45, 12, 0.05))),
    ]
    policy = Fixed(dict.fromkeys("abc", "i0"))
    links = {"t": "pcie"}
    res = _simulate(insts, convs, policy, links)
    assert any(t.cached_tokens for t in res.turns)  # a prefix-cache hit happened
    _compare(res, _serve(insts, convs, policy, links))


@pytest.mark.parametrize(
    ("pre_gpu", "pre_link", "dec_gpu", "dec_link"),
    [
        ("L4", "ethernet", "H100-SXM", "infiniband"),
        ("A40", "pcie", "A40", "pcie"),
        ("H100-SXM", "nvlink", "H200-SXM", "nvlink"),
        ("H200-SXM", "infiniband", "L4", "pcie"),
    ],
)
def test_disaggregated_prefill_and_kv_handoff_alike(
    pre_gpu: str, pre_link: str, dec_gpu: str, dec_link: str
) -> None:
    """A prefiller and a decoder of different tiers and links: remote prefills, the KV hand-off over the
    slower link (only what the decoder does not hold, at a later turn), decodes overlapping another turn's
    transfer."""
    insts = [Inst("p0", "pre", Role.PREFILL, _tm(pre_gpu)), Inst("d0", "dec", Role.DECODE, _tm(dec_gpu))]
    convs = [
        ConversationSpec("a", 0.0, (TurnSpec(9_000, 30), TurnSpec(200, 20, 0.3))),
        ConversationSpec("b", 0.0412, (TurnSpec(2_000, 50),)),
    ]
    policy = Fixed({"a": "d0", "b": "d0"}, {"a": "p0", "b": "p0"})
    links = {"pre": pre_link, "dec": dec_link}
    res = _simulate(insts, convs, policy, links)
    assert all(t.remote_prefill for t in res.turns)
    _compare(res, _serve(insts, convs, policy, links))


@pytest.mark.parametrize(("gpu", "link"), [("A40", "pcie"), ("L4", "ethernet"), ("H100-SXM", "infiniband")])
def test_round_trip_history_pull_alike(gpu: str, link: str) -> None:
    """A later turn sent to a prefiller with a KV round trip: the history goes decoder -> prefiller, the rest
    is prefilled, and the hand-back pays both sides' block bookkeeping."""
    tm = _tm(gpu)
    insts = [Inst("p0", "t", Role.PREFILL, tm), Inst("d0", "t", Role.DECODE, tm)]
    convs = [ConversationSpec("a", 0.0, (TurnSpec(6_000, 30), TurnSpec(700, 20, 0.4)))]
    policy = Fixed({"a": "d0"}, {"a": "p0"}, round_trip=True)
    links = {"t": link}
    res = _simulate(insts, convs, policy, links)
    assert res.turns[1].history_transfer_tokens > 0
    _compare(res, _serve(insts, convs, policy, links))


def _rebind(monkeypatch: pytest.MonkeyPatch, name: str, fake: Callable[..., Any]) -> None:
    """Replace tiers.steps.<name> wherever a module of the project holds it (tiers.steps itself, the
    simulated engines, the simulator)."""
    orig = getattr(tiers.steps, name)
    for mod in list(sys.modules.values()):
        if mod is None or not mod.__name__.startswith(("orchestrator", "tiers")):
            continue
        if getattr(mod, name, None) is orig:
            monkeypatch.setattr(mod, name, fake)


def _faster_link(a: str, b: str) -> str:
    order = tiers.steps.LINK_ORDER
    ra = order.index(a) if a in order else 0
    rb = order.index(b) if b in order else 0
    return str(order[max(ra, rb)])


_plan, _step, _book = tiers.steps.plan_chunks, tiers.steps.prefill_step_time_s, tiers.steps.kv_bookkeeping_s


def _small_chunks(budget: int, decode_batch: int, left: list[int]) -> list[int]:
    return [min(c, 1_500) for c in _plan(budget, decode_batch, left)]


# each a deliberately wrong rule: if only one driver read it from tiers/steps.py, the drivers would part
DISTORTIONS: dict[str, tuple[str, Callable[..., Any]]] = {
    "chunks of at most 1,500 tokens": ("plan_chunks", _small_chunks),
    "prefill steps 1.7x longer": ("prefill_step_time_s", lambda *a: 1.7 * _step(*a)),
    "hand-offs over the faster link": ("handoff_link", _faster_link),
    "round-trip bookkeeping 5x": ("kv_bookkeeping_s", lambda n: 5.0 * _book(n)),
}  # fmt: skip


@pytest.mark.parametrize("distortion", list(DISTORTIONS))
def test_both_drivers_take_the_step_and_link_rules_from_tiers_steps(
    distortion: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one engine model lives in tiers/steps.py: change a rule there and the simulator and the simulated
    engines move together (mixed links, chunked prefill, a round trip's pull and hand-back)."""
    insts = [Inst("p0", "pre", Role.PREFILL, _tm("L4")), Inst("d0", "dec", Role.DECODE, _tm("H100-SXM"))]
    convs = [
        ConversationSpec("a", 0.0, (TurnSpec(9_000, 30), TurnSpec(700, 20, 0.4))),
        ConversationSpec("b", 0.0412, (TurnSpec(2_000, 50),)),
    ]
    policy = Fixed({"a": "d0", "b": "d0"}, {"a": "p0", "b": "p0"}, round_trip=True)
    links = {"pre": "ethernet", "dec": "infiniband"}
    plain = _simulate(insts, convs, policy, links)
    name, fake = DISTORTIONS[distortion]
    _rebind(monkeypatch, name, fake)
    res = _simulate(insts, convs, policy, links)
    assert res.turns[1].history_transfer_tokens > 0  # the round trip happened
    moved = max(abs(a.last_token_s - b.last_token_s) for a, b in zip(res.turns, plain.turns, strict=True))
    assert moved > 1e-4, f"{distortion} did not change the simulator"
    _compare(res, _serve(insts, convs, policy, links))
