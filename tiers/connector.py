"""Per-turn KV connector costs: what a turn pays to move, look up and book-keep KV between engines.

Pure; must not import fastapi, sqlalchemy, httpx or orchestrator. SI units (seconds, tokens, bytes).

Two different things were called "the connector" in the ConServe paper's artifact (eicchen/conserve at
4ab277d), and the simulator needs both:

1. **The physical LMCache/NIXL path** of the runs that went through the disaggregation proxy (full
   disaggregation ``all_disagg`` and the prefiller-only run ``adaptive_disagg_prefiller``). Its engines were
   launched with ``--no-enable-prefix-caching`` on the prefiller *and* on every decoder
   (``conserve/common/disagg_vllm_launcher.sh`` lines 62, 91, 120, 149, 178), so every turn's whole prompt is
   prefilled again on the prefiller and its whole KV crosses the connector again (:func:`shipped_tokens`).
   The hand-off time itself is the measured two-regime curve of ``tiers.links`` (``pcie``); it already
   contains the LMCache store on the sender and the lookup/retrieve on the receiver, because it was measured
   from the prefiller's finish to the decoder's forward start (``paper/figures/section3/scripts/
   plot_network_overhead.py`` lines 4-6). At 128-512 tokens the prefiller's own time under the LMCache
   producer is not measurably longer than a plain prefill (:func:`producer_prefill_ms`), so no separate
   store cost is modelled.
2. **The emulated AMPD round trip** of the per-turn baseline (``per_turn_adaptive_disagg_decoders``). Those
   runs had no connector at all (plain ``vllm serve`` engines, ``conserve/profile_1pxd.sh`` lines 206-252);
   a wrongly predicted turn instead slept for a modelled wait (``conserve/src/per_turn_cost_model.py``
   ``wrong_predict_disagg_wait_ms``): hand-off of the history + a prefix-hit prefill + hand-off of the new
   tokens + block bookkeeping on both sides (:func:`wrong_predict_wait_s`), plus the queue of a virtual
   prefiller (``orchestrator.artifact.VirtualPrefiller``). The history it charged started from the
   pre-warmed compound prompt, not from the conversation's own history (``conversation.py`` line 408; see
   ``orchestrator.artifact.compound_prompt_tokens``).

Every constant below is a row of ``shared/data/conserve/cost_model_constants.csv`` (the artifact's fits).
"""

from __future__ import annotations

from tiers.links import LinkType, kv_transfer_time_s

# Prefix-cache-hit prefill step, the artifact's two-regime fit (cost_model_constants.csv PREFILL_HIT_* rows,
# from its cache_cost_table.csv hit_p50): flat below the knee, linear in the cached context above it.
PREFILL_HIT_LOW_S = 14.5e-3  # PREFILL_HIT_LOW_CONST_MS
PREFILL_HIT_KNEE_TOKENS = 12_000  # PREFILL_HIT_KNEE_L
PREFILL_HIT_SLOPE_S_PER_TOKEN = 0.95e-6  # PREFILL_HIT_HIGH_SLOPE_US_PER_TOKEN
PREFILL_HIT_OFFSET_S = 5.6e-3  # PREFILL_HIT_HIGH_OFFSET_MS

# Block bookkeeping of a KV round trip, per side (x2 sides): cost_model_constants.csv KV_MGMT_BASE_MS and
# KV_MGMT_PER_BLOCK_US, KV_BLOCK_SIZE_TOKENS. The simulator's round trip (orchestrator/sim/steps.py) charges
# kv_bookkeeping_s from here.
KV_MGMT_BASE_S = 2.0e-3
KV_MGMT_PER_BLOCK_S = 5.0e-6
KV_MGMT_BLOCK_TOKENS = 16


def shipped_tokens(prompt_tokens: int, receiver_cached_tokens: int, receiver_prefix_cache: bool) -> int:
    """Tokens of KV that cross the connector for a turn of `prompt_tokens` tokens.

    A receiver with a prefix cache pulls only what it does not hold (whole blocks are the simulator's
    business; this is the token count). The artifact's proxy-path decoders ran without one, so the whole
    prompt crossed at every turn (disagg_vllm_launcher.sh line 91 and the decoder1-3 blocks)."""
    if prompt_tokens < 0 or receiver_cached_tokens < 0:
        raise ValueError(
            f"token counts must be >= 0, got prompt_tokens={prompt_tokens}, "
            f"receiver_cached_tokens={receiver_cached_tokens}"
        )
    if not receiver_prefix_cache:
        return prompt_tokens
    return max(0, prompt_tokens - receiver_cached_tokens)


def artifact_prefill_hit_s(context_tokens: int) -> float:
    """The artifact's modelled prefill of a few new tokens over `context_tokens` cached ones (seconds)."""
    if context_tokens <= PREFILL_HIT_KNEE_TOKENS:
        return PREFILL_HIT_LOW_S
    return PREFILL_HIT_SLOPE_S_PER_TOKEN * context_tokens + PREFILL_HIT_OFFSET_S


def kv_bookkeeping_s(tokens: int) -> float:
    """Both sides' block bookkeeping for a round trip over `tokens` tokens (the artifact's kv_mgmt_ms)."""
    return 2.0 * (KV_MGMT_BASE_S + KV_MGMT_PER_BLOCK_S * tokens / KV_MGMT_BLOCK_TOKENS)


def wrong_predict_wait_s(
    history_tokens: int,
    new_tokens: int,
    kv_bytes_per_token: int,
    link: LinkType | str = LinkType.PCIE,
) -> float:
    """The artifact's fixed wait for one wrongly predicted turn, without the virtual prefiller's queue.

    = hand-off(history) + prefix-hit prefill(history + new) + hand-off(new) + bookkeeping(history + new)
    (per_turn_cost_model.py ``wrong_predict_disagg_wait_ms``). The hand-offs use the measured link model
    (``tiers.links``; for ``pcie`` and Qwen3-0.6B it is the artifact's NETWORK_* curve exactly)."""
    if history_tokens < 0 or new_tokens < 0:
        raise ValueError(
            f"token counts must be >= 0, got history_tokens={history_tokens}, new_tokens={new_tokens}"
        )
    total = history_tokens + new_tokens
    return (
        _handoff_s(history_tokens, kv_bytes_per_token, link)
        + artifact_prefill_hit_s(total)
        + _handoff_s(new_tokens, kv_bytes_per_token, link)
        + kv_bookkeeping_s(total)
    )


def _handoff_s(tokens: int, kv_bytes_per_token: int, link: LinkType | str) -> float:
    # the artifact's network_ms() charges its 4.849 ms floor even for an empty hand-off; keep that
    return kv_transfer_time_s(max(tokens, 1), kv_bytes_per_token, link)


def producer_prefill_ms(network_p50_ms: float, network_share_of_ttft_pct: float) -> float:
    """Prefill time on an LMCache producer, recovered from the artifact's hand-off measurement.

    network_kv_transfer.csv gives, per prompt length, the median hand-off (decoder forward start - prefiller
    finish) and its median share of the disaggregated TTFT (decoder forward start - prefiller request
    start); TTFT - hand-off is the producer's prefill (queue-free: one request at a time)."""
    if not 0.0 < network_share_of_ttft_pct < 100.0:
        raise ValueError(f"network share must be in (0, 100) %, got {network_share_of_ttft_pct}")
    return network_p50_ms / (network_share_of_ttft_pct / 100.0) - network_p50_ms
