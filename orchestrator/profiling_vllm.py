"""The profiler's vLLM driver: orchestrator/profiling.py's EngineDriver for a vLLM OpenAI server over
aiohttp (one session). Prompts are token-id lists built from /tokenize output, so lengths are exact; the
decode clock is vLLM's own inter-token latency histogram from /metrics. Must not import fastapi, sqlalchemy
or httpx; aiohttp is imported only inside the driver's methods.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from orchestrator.errors import EngineError
from orchestrator.profiling import DecodeClock

# Text tokenized once to build prompts of exact lengths (any text works: it only supplies token ids).
_POOL_TEXT = (
    "run the test file and read the error then fix the bug in the repo and commit the patch to the branch . "
    "the function returns none because the value of the key is not found in the list ; assert the output . "
    "open the file , search for the class , replace the line , edit the code , call the tool , exit 0 . "
)


class VllmHttpDriver:
    """EngineDriver for a vLLM OpenAI server (aiohttp; one session)."""

    def __init__(self, base_url: str, seed: int = 0, request_timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = ""
        self.version = "unknown"
        self.max_model_len_tokens = 0
        self._pool: list[int] = []
        self._rng = random.Random(seed)
        self._timeout_s = request_timeout_s
        self._session: Any = None

    async def __aenter__(self) -> VllmHttpDriver:
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        try:
            models = await self._get("/v1/models")
            card = models["data"][0]
            self.model = str(card["id"])
            self.max_model_len_tokens = int(card.get("max_model_len") or 0)
            self.version = str((await self._get("/version")).get("version", "unknown"))
            tok = await self._post("/tokenize", {"model": self.model, "prompt": _POOL_TEXT})
            self._pool = [int(t) for t in tok["tokens"]]
        except BaseException:
            await self._session.close()
            raise
        if not self._pool or self.max_model_len_tokens <= 0:
            await self._session.close()
            raise EngineError(f"engine at {self.base_url} gave no tokens or no max_model_len; is it vLLM?")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _fail(self, err: BaseException) -> EngineError:
        return EngineError(
            f"engine at {self.base_url} failed ({type(err).__name__}: {err}). To fix: check that a vLLM "
            "OpenAI server runs there (GET /health) and pass its base URL with --engine."
        )

    async def _get(self, path: str) -> dict[str, Any]:
        import aiohttp

        try:
            async with self._session.get(self.base_url + path) as resp:
                if resp.status != 200:
                    raise EngineError(
                        f"GET {self.base_url}{path} answered HTTP {resp.status}: {await resp.text()}"
                    )
                return dict(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError) as err:
            raise self._fail(err) from err

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        try:
            async with self._session.post(self.base_url + path, json=body) as resp:
                if resp.status != 200:
                    raise EngineError(
                        f"POST {self.base_url}{path} answered HTTP {resp.status}: {await resp.text()}"
                    )
                return dict(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError) as err:
            raise self._fail(err) from err

    def _prompt(self, n: int) -> list[int]:
        """n token ids drawn from the pool: fresh random sequences never share a cached prefix block."""
        return [self._rng.choice(self._pool) for _ in range(n)]

    async def prefill_once(self, new_tokens: int) -> float:
        body = {"model": self.model, "prompt": self._prompt(new_tokens), "max_tokens": 1, "temperature": 0.0}
        t0 = time.perf_counter()
        out = await self._post("/v1/completions", body)
        elapsed = time.perf_counter() - t0
        got = int((out.get("usage") or {}).get("prompt_tokens", new_tokens))
        if got != new_tokens:
            raise EngineError(f"engine counted {got} prompt tokens for a {new_tokens}-token prompt")
        return elapsed

    async def decode_clock(self) -> DecodeClock | None:
        """vLLM's inter-token latency histogram from /metrics (summed over its label sets; the profiler is the
        engine's only client). vLLM >= 0.10 names it ``vllm:inter_token_latency_seconds``, older releases
        ``vllm:time_per_output_token_seconds``. None when /metrics is missing or has neither."""
        import aiohttp

        try:
            async with self._session.get(self.base_url + "/metrics") as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        return parse_decode_clock(text)

    async def run_batch(self, batch: int, prompt_tokens: int, output_tokens: int) -> float:
        async def one() -> int:
            body = {
                "model": self.model, "prompt": self._prompt(prompt_tokens), "max_tokens": output_tokens,
                "min_tokens": output_tokens, "ignore_eos": True, "temperature": 0.0,
            }  # fmt: skip
            out = await self._post("/v1/completions", body)
            return int((out.get("usage") or {}).get("completion_tokens", -1))

        t0 = time.perf_counter()
        got = await asyncio.gather(*(one() for _ in range(batch)))
        elapsed = time.perf_counter() - t0
        if any(n != output_tokens for n in got):
            raise EngineError(
                f"batch of {batch}: sequences generated {got} tokens, expected {output_tokens} each (the "
                "engine must honour ignore_eos and min_tokens, as vLLM does)"
            )
        return elapsed


def parse_decode_clock(metrics_text: str) -> DecodeClock | None:
    """The inter-token latency histogram's _sum and _count in Prometheus text, summed over label sets."""
    for name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"):
        total = {"_sum": 0.0, "_count": 0.0}
        seen = False
        for line in metrics_text.splitlines():
            for suffix in total:
                head = name + suffix
                if line.startswith(head) and line[len(head) : len(head) + 1] in ("{", " "):
                    try:
                        total[suffix] += float(line.rsplit(" ", 1)[1])
                    except ValueError:
                        continue
                    seen = True
        if seen:
            return DecodeClock(total["_sum"], total["_count"])
    return None
