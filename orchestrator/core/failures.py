"""What an instance failure does to the turns it touches, defined once for the router and the simulator.

A turn is re-placed (the policy is asked again for the same turn, the pin moves if the new placement says so,
the turn's arrival and so its TTFT and the conversation's TTFET stay where they were) when its driver learns
that an instance the turn needs is gone:

- a turn queued, prefilling, receiving KV or decoding on the failed instance: at once (the simulator at the
  failure, the router when its engine call fails);
- a turn whose remote prefill runs on a healthy prefiller for a decoder that fails: when the prefill ends
  and the hand-off is refused (:func:`handoff_refused`). Neither driver cancels a running prefill for a lost
  decoder: the prefiller does not know, and the router learns of the decoder only by a poll or a call;
- what the abandoned prefill leaves on the prefiller: the prompt KV it held or computed stays in its prefix
  cache (:func:`abandoned_prefill_cached_tokens`), as after a completed hand-off (a vLLM engine frees a
  finished or aborted request's computed blocks into its prefix cache; the simulated engines of `serve`
  do the same), so the re-placed turn's prefill there computes only what is missing.

The router follows these rules by construction (its engines keep what they computed; it re-places a turn
when an engine call fails); the simulator applies them explicitly (orchestrator/sim/steps.py). The parity
test (tests/core/test_driver_parity.py) checks the two agree with a decoder failing during a remote prefill.
"""

from __future__ import annotations


def handoff_refused(decoder_healthy: bool) -> bool:
    """A finished remote prefill cannot hand its KV to a decoder that failed meanwhile: the turn is re-placed
    now, not at the failure."""
    return not decoder_healthy


def abandoned_prefill_cached_tokens(prompt_tokens: int, held_tokens: int, computed_tokens: int) -> int:
    """Prompt tokens a healthy prefiller keeps in its prefix cache from a prefill whose KV no decoder takes:
    what it held of the prompt before (its prefix-cache hit, or history shipped in) plus what it computed,
    at most the prompt."""
    return min(prompt_tokens, max(0, held_tokens) + max(0, computed_tokens))
