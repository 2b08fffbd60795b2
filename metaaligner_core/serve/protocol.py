"""Request and response shapes of the server: OpenAI's chat-completions API, plus ``metaaligner``.

The models mirror OpenAI's wire format field for field, so the official clients (``openai``,
LiteLLM, LangChain) parse our answers unchanged. MetaAligner's own per-request options ride in
the request's ``metaaligner`` object — what ``extra_body={"metaaligner": {...}}`` adds to the
JSON body — and the answer adds a ``metaaligner`` object beside the standard fields (clients
keep unknown fields: ``completion.metaaligner`` in the ``openai`` client).

Unknown OpenAI request fields (``presence_penalty``, ``user``, …) are accepted and ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


# --- requests -------------------------------------------------------------------------------

class TextPart(BaseModel):
    """One part of a message's content list (``{"type": "text", "text": ...}``)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message as plain text; content parts other than text are refused upstream."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class MetaAlignerOptions(BaseModel):
    """``extra_body={"metaaligner": {...}}``.

    objectives: a SPEC string (``"honesty,Politeness: be kind"``) or a list of items (built-in
        keys or ``Name: description``); absent: the server's default objectives; ``[]`` or
        ``""``: no correction, the draft is returned as is.
    return_original: include the policy's draft (``metaaligner.original``) in the answer.
    """

    model_config = ConfigDict(extra="forbid")
    objectives: list[str] | str | None = None
    return_original: bool = True


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` (or the older ``max_tokens``)
    bounds both the draft and the correction; temperature 0 (greedy) unless given."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # a 64-bit integer, as OpenAI's
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    metaaligner: MetaAlignerOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- responses ------------------------------------------------------------------------------

class Timings(BaseModel):
    """Seconds spent: waiting for and writing the draft, writing the correction, in all."""

    draft_s: float
    correction_s: float
    total_s: float


class StageUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class MetaAlignerInfo(BaseModel):
    """What the aligner did: the ``metaaligner`` object of every answer.

    original: the policy's draft (None when ``return_original`` is false).
    corrected: False when no objectives were given and the draft was passed through.
    objectives: the objectives' full texts, in prompt order.
    """

    original: str | None
    corrected: bool
    policy: str
    aligner: str
    template: str
    objectives: list[str]
    usage: dict[str, StageUsage]
    timings: Timings


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    metaaligner: MetaAlignerInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    metaaligner: MetaAlignerInfo | None = None


class ModelInfo(BaseModel):
    """What this server does with a model id: ``default_max_tokens`` (each stage's length when a
    request gives no ``max_tokens``), ``context_length`` (the local policy's; None for an API
    policy), the aligner and its template, and ``dtype`` (the local models' weights: fp32, bf16 or
    fp16; None for an API policy)."""

    default_max_tokens: int
    context_length: int | None = None
    aligner: str
    template: str
    dtype: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "metaaligner"
    metaaligner: ModelInfo | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
