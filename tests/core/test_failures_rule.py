"""orchestrator.core.failures: what a failure does to the turns it touches, one rule for both drivers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.core import abandoned_prefill_cached_tokens, handoff_refused


def test_a_finished_prefill_is_handed_only_to_a_healthy_decoder() -> None:
    assert handoff_refused(decoder_healthy=False)
    assert not handoff_refused(decoder_healthy=True)


def test_an_abandoned_prefill_keeps_what_it_held_and_computed() -> None:
    assert abandoned_prefill_cached_tokens(6000, 0, 6000) == 6000  # finished: the whole prompt
    assert abandoned_prefill_cached_tokens(6000, 4096, 1904) == 6000  # a prefix-cache hit + the rest
    assert abandoned_prefill_cached_tokens(6000, 0, 2048) == 2048  # cut short: the chunks computed so far
    assert abandoned_prefill_cached_tokens(6000, 0, 0) == 0


@given(st.integers(1, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_never_more_than_the_prompt(prompt: int, held: int, computed: int) -> None:
    kept = abandoned_prefill_cached_tokens(prompt, held, computed)
    assert 0 <= kept <= prompt
    assert kept == min(prompt, held + computed)
