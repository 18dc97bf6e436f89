"""What every field of a :class:`placement.base.Placement` means, defined once for every driver.

- ``decode_instance``: decodes the turn (must be decode-capable and healthy when placed).
- ``prefill_instance``: None or the decoder itself -> the decoder prefills the turn locally, from its prefix
  cache where it holds the conversation's history (only the increment is computed). Another instance -> a
  remote prefill there, then the KV goes to the decoder (``Placement.remote_prefill``).
- ``transfer_kv`` / ``transfer_tokens``: a remote prefill always ships KV to the decoder (``transfer_kv`` says
  so explicitly); ``transfer_tokens`` is what the policy expects to ship (0: the whole prompt). What a driver
  ships is :func:`kv_shipped_tokens`: the prompt's KV that the decoder does not already hold, at most the
  whole prompt -- never more than the policy asked for when the decoder holds the history.
- ``history_tokens`` (remote prefill of a later turn only): a KV round trip (AMPD-style): the first
  :func:`round_trip_tokens` tokens of the conversation's KV go decoder -> prefiller before the prefill, which
  then computes only the rest (:func:`remote_prefill_tokens`). Clipped to what the decoder holds (whole
  blocks) and to the prompt less one token (the last token is always computed).
- ``pin``: (re)bind the conversation to ``decode_instance`` (:func:`moves_pin`); without it an existing pin
  stays as it is and none is made (policies that never pin hold nothing between turns).
- ``reason``: free text for the records; a moved pin is recorded as ``replaced: <reason>``
  (:func:`pin_reason`).

While a turn runs, its conversation is counted on its pinned decoder for :func:`running_turn_kv_tokens`; once
it ended, for its whole context (prompt + output).
"""

from __future__ import annotations

from placement.base import Placement, TurnRequest


def moves_pin(placement: Placement, current_pin: str | None) -> bool:
    """The placement (re)binds the conversation: it asks to pin, to another decoder than the current one."""
    return placement.pin and current_pin != placement.decode_instance


def pin_reason(placement: Placement, current_pin: str | None, later_turn: bool) -> str:
    """How a moved pin is recorded: ``placed`` for a conversation's first pin, ``replaced: <why>`` when it had
    one, or when a later turn of a conversation had lost it (its decoder's record is gone)."""
    if current_pin is not None or later_turn:
        return f"replaced: {placement.reason or 'pinned decoder unavailable'}"
    return "placed"


def running_turn_kv_tokens(turn: TurnRequest) -> int:
    """KV tokens a running turn is counted for on its pinned decoder: its prompt + the client's output cap
    (when it gave one; the output's KV is not known before it is decoded)."""
    return turn.input_tokens + (turn.max_output_tokens or 0)


def round_trip_tokens(
    placement: Placement, turn: TurnRequest, decoder_holds_tokens: int, block_tokens: int = 1
) -> int:
    """History tokens a round-trip placement ships decoder -> prefiller before the prefill; 0 when it asks for
    none, prefills locally, is a turn 1 or the decoder has lost the history. `decoder_holds_tokens`: what the
    decoder holds of the conversation (the simulator: its prefix-cache entry; the router: the conversation's
    context as its pin accounting counts it)."""
    if placement.history_tokens <= 0 or turn.turn == 1 or not placement.remote_prefill:
        return 0
    hist = min(placement.history_tokens, decoder_holds_tokens, turn.input_tokens - 1)
    if hist <= 0:
        return 0
    return hist // block_tokens * block_tokens


def remote_prefill_tokens(placement: Placement, turn: TurnRequest, round_trip: int = 0) -> int:
    """Tokens a remote placement queues on its prefiller before prefix-cache hits: the prompt less the
    round-tripped history (:func:`round_trip_tokens`); 0 for a local placement."""
    return turn.input_tokens - round_trip if placement.remote_prefill else 0


def local_prefill_tokens(placement: Placement, turn: TurnRequest) -> int:
    """Tokens a local placement queues on its decoder: the turn's new tokens (the rest is the decoder's cached
    history; a re-placed conversation finds none and its engine computes the whole prompt); 0 when remote."""
    return 0 if placement.remote_prefill else turn.new_tokens


def kv_shipped_tokens(input_tokens: int, decoder_cached_tokens: int, block_tokens: int = 1) -> int:
    """KV tokens a remote prefill ships to the decoder: the prompt less what the decoder already holds of it
    (whole blocks; a round trip's history is still there)."""
    hit = min(decoder_cached_tokens, input_tokens) // block_tokens * block_tokens
    return input_tokens - hit
