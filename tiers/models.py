"""Model catalog: the transformer shapes the performance model needs.

Pure data. Must not import fastapi, sqlalchemy or httpx. Sources are each model's published config.json
(Hugging Face model card); parameter counts include embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

from conserve.errors import did_you_mean
from tiers.errors import CatalogError


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    params: float  # total parameters (count)
    dtype_bytes: int = 2  # bf16
    max_context_tokens: int = 32768
    source: str = ""

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: 2 * layers * kv_heads * head_dim * dtype bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def flops_per_token(self) -> float:
        """Dense (non-attention) forward FLOPs per token: 2 * params."""
        return 2.0 * self.params

    def attention_flops(self, new_tokens: int, cached_tokens: int) -> float:
        """Attention score + value FLOPs for `new_tokens` attending over cached + causal new tokens.

        4 * layers * (heads * head_dim) * n * (c + n/2): QK^T and AV, 2 FLOPs per MAC each.
        """
        q_dim = self.attention_heads * self.head_dim
        return 4.0 * self.layers * q_dim * new_tokens * (cached_tokens + new_tokens / 2.0)

    def prefill_flops(self, new_tokens: int, cached_tokens: int = 0) -> float:
        return self.flops_per_token * new_tokens + self.attention_flops(new_tokens, cached_tokens)


_MODELS: tuple[ModelSpec, ...] = (
    # Qwen/Qwen3-0.6B config.json: 28 layers, hidden 1024, 16 heads, 8 KV heads, head_dim 128, 0.6B params,
    # max_position_embeddings 40960. KV 114,688 B/token matches the ConServe artifact
    # (cost_model_constants.csv).
    ModelSpec("Qwen3-0.6B", 28, 1024, 16, 8, 128, 0.596e9, 2, 40960, "Qwen/Qwen3-0.6B config.json"),
    # meta-llama/Llama-3.1-8B config.json: 32 layers, hidden 4096, 32 heads, 8 KV heads, 8.03B params.
    ModelSpec("Llama-3.1-8B", 32, 4096, 32, 8, 128, 8.03e9, 2, 131072, "meta-llama/Llama-3.1-8B config.json"),
    # meta-llama/Llama-3.1-70B config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads, 70.6B params.
    ModelSpec(
        "Llama-3.1-70B", 80, 8192, 64, 8, 128, 70.6e9, 2, 131072, "meta-llama/Llama-3.1-70B config.json"
    ),
    # meta-llama/Llama-2-70b-hf config.json: 80 layers, hidden 8192, 64 heads, 8 KV heads (GQA), 69.0B params.
    ModelSpec("Llama-2-70B", 80, 8192, 64, 8, 128, 68.98e9, 2, 4096, "meta-llama/Llama-2-70b-hf config.json"),
    # bigscience/bloom config.json: 70 layers, hidden 14336, 112 heads (MHA), 176B params
    # (Splitwise's 2nd model).
    ModelSpec("BLOOM-176B", 70, 14336, 112, 112, 128, 176.2e9, 2, 2048, "bigscience/bloom config.json"),
)

MODELS: dict[str, ModelSpec] = {m.name: m for m in _MODELS}

_ALIASES: dict[str, str] = {
    "qwen3-0.6b": "Qwen3-0.6B",
    "qwen/qwen3-0.6b": "Qwen3-0.6B",
    "llama-3.1-8b": "Llama-3.1-8B",
    "meta-llama/llama-3.1-8b": "Llama-3.1-8B",
    "meta-llama/llama-3.1-8b-instruct": "Llama-3.1-8B",
    "llama-3.1-70b": "Llama-3.1-70B",
    "meta-llama/llama-3.1-70b": "Llama-3.1-70B",
    "meta-llama/llama-3.1-70b-instruct": "Llama-3.1-70B",
    "llama2-70b": "Llama-2-70B",
    "llama-2-70b": "Llama-2-70B",
    "meta-llama/llama-2-70b-hf": "Llama-2-70B",
    "bloom-176b": "BLOOM-176B",
    "bigscience/bloom": "BLOOM-176B",
}


def get_model(name: str) -> ModelSpec:
    """Look a model up by catalog name, Hugging Face id or common alias (case-insensitive)."""
    if name in MODELS:
        return MODELS[name]
    canonical = _ALIASES.get(name.lower())
    if canonical:
        return MODELS[canonical]
    raise CatalogError(
        f"unknown model {name!r}.{did_you_mean(name, list(MODELS) + list(_ALIASES))} "
        f"Known models: {', '.join(MODELS)}. "
        "To fix: use one of these or define the model inline in fleet.yaml "
        "(model: {name, layers, hidden_size, attention_heads, kv_heads, head_dim, params})."
    )
