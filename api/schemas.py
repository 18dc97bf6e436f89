"""HTTP bodies (pydantic, the edge): OpenAI-compatible requests/responses and ConServe's resource views.

Requests accept unknown fields (OpenAI and vLLM add fields over time; they are forwarded to the engines).
ConServe's own request fields: ``conversation_id`` (the ``X-Conversation-Id`` header wins when both are
given) and ``conserve: {"final": true}`` (same as the ``X-Conversation-Final: true`` header). Both are
removed before the request reaches an engine.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CONVERSATION_ID_MAX_CHARS = 256
# Visible ASCII only: the id is echoed in the X-Conversation-Id response header, which cannot carry other
# characters (a body id with "€" used to end in a 500, one with a newline in a broken response).
CONVERSATION_ID_PATTERN = r"^[!-~]+$"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ConserveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    final: bool = Field(
        False, description="this turn is the conversation's last (ends the pin; TTFET from it)"
    )


class StreamOptions(_Open):
    include_usage: bool | None = None


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Sampling(_Open):
    model: str = Field(min_length=1, description="a model id from GET /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="output token cap (>= 1)")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    conversation_id: str | None = Field(
        None,
        min_length=1,
        max_length=CONVERSATION_ID_MAX_CHARS,
        pattern=CONVERSATION_ID_PATTERN,
        description="conversation this turn belongs to (visible ASCII); the X-Conversation-Id header wins "
        "when both are set",
    )
    conserve: ConserveOptions | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="one prompt (a string, or token ids); batches of several prompts are not supported"
    )
    echo: bool | None = None


class UsageEnergy(BaseModel):
    """``usage.energy``: this turn's modelled joules (estimated from the tier model when the turn ends; the
    metered attribution follows in GET /v1/conversations/{id} once settled)."""

    estimated: bool = True
    source: str = Field("modelled", description="'modelled': from the tier power model, not a meter")
    turn_j: float
    turn_prefill_j: float
    turn_decode_j: float
    conversation_j: float = Field(description="estimated joules of the conversation's turns so far")
    attributed: str | None = Field(None, description="where the attributed figure appears once settled")


class ConversationEnergy(BaseModel):
    attributed_j: float = Field(description="joules attributed to the conversation in the ledger so far")
    measured_share: float | None = Field(description="fraction of attributed_j from hardware meters")
    settled: bool = Field(
        description="every energy interval up to the conversation's last token is attributed (the figure "
        "is final; before that, intervals still pending will add to it)"
    )
    estimated_j: float | None = Field(None, description="sum of the turns' usage.energy estimates")


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    energy: UsageEnergy | None = Field(None, description="ConServe extension (non-streaming responses)")


class ChatChoice(_Open):
    index: int
    message: dict[str, Any]
    finish_reason: str | None


class ChatCompletionResponse(_Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None


class CompletionResponse(_Open):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "conserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TurnView(BaseModel):
    turn: int
    request_id: str
    instance_id: str
    tier: str | None
    prefill_instance_id: str | None
    remote_prefill: bool
    arrival_at: datetime
    first_token_at: datetime | None
    last_token_at: datetime | None
    ttft_s: float | None
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    finish_reason: str | None
    is_final: bool
    status: str


class PinView(BaseModel):
    instance_id: str
    at: datetime
    reason: str


class ConversationResponse(BaseModel):
    conversation_id: str
    run_id: str
    policy: str | None
    pinned_instance_id: str | None = Field(
        description="decoder of the latest pin, kept after the pin is released (`active` says whether it "
        "still holds); None if the conversation was never pinned (policies that do not pin)"
    )
    active: bool = Field(description="held in this router's memory with a live pin")
    pins: list[PinView]
    turns: list[TurnView]
    final_turn: int | None
    ttfet_s: float | None = Field(description="arrival of turn 1 to the first token of the final turn so far")
    e2e_s: float | None
    replacements: int
    energy: ConversationEnergy | None = Field(None, description="None when energy accounting is off")


class PowerCapView(BaseModel):
    """The power cap asked for an engine and what happened (orchestrator/power.py, energy/power.py)."""

    requested_w: float | None = Field(description="cap per GPU the fleet or plan asked for")
    applied_w: float | None = Field(description="limit NVML read back on every GPU; null: not applied")
    applied: bool = Field(description="true only when every GPU of the engine runs at the requested cap")
    status: str = Field(description="applied, differs, simulated (modelled, no GPU), no_nvml, no_permission, "
                        "out_of_range, no_gpus, remote, held or failed")  # fmt: skip
    message: str = Field(description="why it was not applied, and how to fix it")
    source: str = Field(description="where the cap came from (fleet.yaml field, plan pool, tier model)")
    gpus: list[dict[str, Any]] = Field(default_factory=list, description="per GPU: nvml_index, uuid, status")


class InstanceStatus(BaseModel):
    instance_id: str
    role: str
    tier: str
    healthy: bool
    down_reason: str | None
    kv_capacity_tokens: int
    kv_used_tokens: int = Field(description="max(engine-reported, router's pinned accounting)")
    kv_occupancy: float
    engine_kv_usage_frac: float | None
    running: int
    waiting: int
    inflight_requests: int
    queued_prefill_tokens: int
    pinned_conversations: int
    pinned_tokens: int
    kv_transfers_in: int
    engine: dict[str, float]
    power_cap: PowerCapView | None = Field(None, description="null: no cap asked for this engine")


class FleetResponse(BaseModel):
    backend: str
    policy: str
    model: str
    fleet_source: str
    instances: list[InstanceStatus]
    stats: dict[str, int]


class Health(BaseModel):
    status: str
    detail: dict[str, Any] = Field(default_factory=dict)
