"""OpenAI's HTTP API as pydantic models: completion and chat-completion requests, their
responses and stream chunks, usage and the error body, plus the mapping of a request onto
``SamplingParams``.

Requests are validated strictly (no "1" for 1, no true for 1) and with OpenAI's ranges, so a bad
body is a 400 here and never reaches a worker. Unknown fields are ignored, as vLLM does.
vLLM's extra sampling fields (top_k, min_p, min_tokens, ignore_eos, stop_token_ids,
allowed_token_ids, ...) and ``return_tokens_as_token_ids`` are accepted. Guided decoding
(moebius/guided): ``response_format`` "json_object" (the output is one JSON object) and
"json_schema" (a document of the schema: the subset moebius/guided/json_schema.py enforces,
a 400 naming any other keyword), vLLM's ``guided_json`` (a schema), ``guided_choice`` and
``guided_regex`` (moebius/guided/regex.py), or the same as vLLM's newer
``structured_outputs`` (json, regex, choice, json_object); a grammar (``guided_grammar``,
``structured_outputs.grammar``, a "structural_tag" format) is a 400 rather than ignored.

Tool calling: a chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``;
assistant messages with ``tool_calls`` and ``tool`` messages with ``tool_call_id`` render into
the dicts transformers' chat templates read (arguments parsed from their JSON text, as vLLM
does). tool_choice "required" or a named function is forced by a JSON schema added to the
sampling parameters (moebius/server/tool_choice.py); which parser reads an "auto" output is the
server's business (moebius/server/tool_parsers.py).

vLLM's /tokenize takes a prompt, or messages with the chat request's template fields
(``ChatTemplateFields``); /detokenize token ids.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moebius.core import MAX_LOGIT_BIAS, SamplingError, SamplingParams
from moebius.guided.json_schema import loosened
from moebius.server.tool_choice import forced_schema

INT64_MAX = 2**63 - 1
Prompt = str | list[Annotated[int, Field(ge=0)]]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: the schema under ``schema``. With ``strict``
    true every keyword is enforced or the request is a 400; otherwise (OpenAI's default) bounds
    on values (minimum, maxLength, pattern, format, ...) are dropped and the structure is
    enforced (moebius/guided/json_schema.py, ``loosened``)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict = Field(..., alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (its newer form of the ``guided_*`` fields): one of
    ``json`` (a schema), ``regex``, ``choice``, ``json_object``; ``disable_any_whitespace``
    (JSON with no whitespace between tokens). A grammar, a structural tag and a whitespace
    pattern are 400s; ``disable_fallback`` and
    ``disable_additional_properties`` ask what this server does anyway (no fallback backend;
    no properties beyond a schema's)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None
    grammar: Any = None
    structural_tag: Any = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False
    disable_additional_properties: bool = False

    def guides(self) -> dict:
        """As SamplingParams' guided fields; SamplingError for what cannot be enforced."""
        for name in ("grammar", "structural_tag", "whitespace_pattern"):
            if getattr(self, name) is not None:
                raise SamplingError(f"guided decoding is not supported: structured_outputs."
                                    f"{name} cannot be enforced by this server (json, regex, "
                                    f"choice and json_object can)")
        return {"guided_json": self.json_, "guided_regex": self.regex,
                "guided_choice": self.choice, "guided_json_object": bool(self.json_object),
                "guided_compact_json": self.disable_any_whitespace}


# vLLM's guided-decoding extras this server cannot enforce: any value but null is a 400
UNSUPPORTED_GUIDED = ("guided_grammar",)
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # ASCII digits only (int() takes others too)
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _SamplingFields(_Strict):
    """Fields shared by both endpoints (OpenAI's plus vLLM's extras)."""

    model: str
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, le=10, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), le=INT64_MAX - 128)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool | None = None  # vLLM's: ids beside the text (responses.Job)
    user: str | None = None
    # OpenAI's: JSON keys are strings, so token ids come as decimal strings ({"50256": -100})
    logit_bias: Annotated[dict[str, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    allowed_token_ids: TokenIds | None = None  # vLLM's
    # vLLM's: each prompt token's logprob and the top n at its position, in the response's
    # prompt_logprobs (not while streaming)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's: under --scheduling-policy priority, lower is admitted first (else only 0)
    priority: int = Field(0, ge=-(2**63), le=INT64_MAX)
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None  # vLLM's: a JSON schema (or its text)
    guided_regex: str | None = None  # vLLM's: the output is a whole match of it
    guided_choice: list[str] | None = None  # vLLM's: the output is exactly one of them
    guided_grammar: Any = None
    structured_outputs: StructuredOutputs | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's parameters; raises ``SamplingError`` (a 400) on a bad combination, a
        logit_bias key that is not a token id, or guided decoding this server cannot do."""
        if self.stream and self.prompt_logprobs is not None:
            raise SamplingError("prompt_logprobs are not available when stream is true")
        fmt = self.response_format
        if fmt is not None and fmt.type == "structural_tag":
            raise SamplingError(
                "guided decoding is not supported: response_format 'structural_tag' cannot be "
                "enforced by this server ('text', 'json_object' and 'json_schema' can)"
            )
        schema = self.guided_json
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise SamplingError("response_format 'json_schema' needs its json_schema.schema")
            if schema is not None:
                raise SamplingError("response_format 'json_schema' and guided_json exclude "
                                    "each other")
            schema = fmt.json_schema.schema_
            if not fmt.json_schema.strict:  # OpenAI's default: the structure, not the bounds
                schema = loosened(schema)
        for name in UNSUPPORTED_GUIDED:
            if getattr(self, name) is not None:
                raise SamplingError(
                    f"guided decoding is not supported: {name} cannot be enforced by this server "
                    f"(response_format 'json_object' / 'json_schema', guided_json, "
                    f"guided_choice and guided_regex can)"
                )
        guides = {"guided_json_object": fmt is not None and fmt.type == "json_object",
                  "guided_json": schema, "guided_choice": self.guided_choice,
                  "guided_regex": self.guided_regex}
        if self.structured_outputs is not None:
            if any(v is not None and v is not False for v in guides.values()):
                raise SamplingError("structured_outputs and response_format / guided_* exclude "
                                    "each other")
            guides = self.structured_outputs.guides()
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=self.scored_prompt(logprobs),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=self._logit_bias(),
            allowed_token_ids=self.allowed_token_ids,
            **guides,
        )

    def scored_prompt(self, logprobs: int | None) -> int | None:
        """The prompt logprobs the engine computes (top n), or None."""
        return self.prompt_logprobs

    def _logit_bias(self) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        out: dict[int, float] = {}
        for key, bias in self.logit_bias.items():
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise SamplingError(
                    f"logit_bias: keys must be token ids written as decimal integers, got {key!r}"
                )
            if int(key) in out:
                raise SamplingError(f"logit_bias: token id {int(key)} is given twice")
            out[int(key)] = bias
        return out


class CompletionRequest(_SamplingFields):
    prompt: Prompt | list[Prompt]
    max_tokens: int | None = Field(16, ge=0, le=INT64_MAX)  # 0: only with echo
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the prompt, and with logprobs its logprobs, before each completion
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=128)

    def scored_prompt(self, logprobs: int | None) -> int | None:
        """echo with logprobs scores the prompt with the same top n (OpenAI's, vLLM's)."""
        if self.prompt_logprobs is None and self.echo:
            return logprobs
        return self.prompt_logprobs

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p) if p else [p]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text


class MessageToolCall(_Strict):
    """A call in an assistant message: sent back by clients, and in our responses."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def render(self) -> dict[str, Any]:
        """The dict a chat template reads: ``function.arguments`` parsed (vLLM's choice; the
        templates write them with ``tojson``)."""
        try:
            args = json.loads(self.function.arguments)
        except ValueError as e:
            raise ValueError(f"function.arguments is not valid JSON: {e}") from None
        call = {"type": "function", "function": {"name": self.function.name, "arguments": args}}
        return call if self.id is None else {"id": self.id, **call}


def _render_each(items, field: str) -> list[dict[str, Any]]:
    """Each item's ``render()``; a ValueError names the item as ``field[i].``."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(item.render())
        except ValueError as e:
            raise ValueError(f"{field}[{i}].{e}") from None
    return out


class ChatMessage(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this answers

    def render(self) -> dict[str, Any]:
        """The message as a chat template reads it; ValueError names a bad field."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        msg: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            if self.role != "assistant":
                raise ValueError("tool_calls: only assistant messages carry tool calls")
            msg["tool_calls"] = _render_each(self.tool_calls, "tool_calls")
        if self.role == "tool" and self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON Schema
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ChatTemplateFields(_Strict):
    """What renders a conversation into a prompt: one set of fields and one rendering path
    (``Responder.chat_prompt``) for /v1/chat/completions and /tokenize, so both count the
    same tokens for the same body."""

    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    # transformers' and vLLM's: the prompt ends inside the final message, for the model to
    # continue it (400 together with add_generation_prompt)
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # template variables (vLLM's field)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    def rendered_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template reads them; ValueError (a 400) names the field."""
        return _render_each(self.messages, "messages")

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The ``tools`` handed to the chat template: the request's definitions (fields left
        out stay out), or None without tools or with tool_choice "none"."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class ChatCompletionRequest(_SamplingFields, ChatTemplateFields):
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool = True  # False: at most the first call is returned

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """As the base's; tool_choice "required" or a named function adds the schema that
        forces the calls (moebius/server/tool_choice.py)."""
        params = super().sampling_params(max_tokens, logprobs)
        mode = self.tool_mode()
        if mode not in ("required", "named"):
            return params
        if params.guided:
            raise SamplingError(f"tool_choice {_choice_text(self.tool_choice)} forces the "
                                f"output's form: response_format and guided_* cannot be added")
        name = self.tool_choice.function.name if mode == "named" else None
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        schema = forced_schema(tools, name, self.parallel_tool_calls)
        return dataclasses.replace(params, guided_json=schema)

    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        """OpenAI's default: "auto" with tools, "none" without. Raises ValueError (a 400) for a
        choice that contradicts ``tools``."""
        choice = self.tool_choice
        if choice is None:
            return "auto" if self.tools else "none"
        if choice == "none":
            return "none"
        if not self.tools:
            raise ValueError(f"tool_choice: {_choice_text(choice)} needs tools")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in {t.function.name for t in self.tools}:
                raise ValueError(
                    f"tool_choice: the function {choice.function.name!r} is not in tools"
                )
            return "named"
        return choice


def _choice_text(choice) -> str:
    return repr(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"


# ---------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``Logprob`` of a prompt position's token or one of its top n."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# None for the first prompt token, then {token id: PromptLogprob} at each position
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, where the request asks them
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # with --reasoning-parser (vLLM's field)
    tool_calls: list[MessageToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # vLLM's return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, where the request asks them
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "moebius"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------- /tokenize, /detokenize
class TokenizeCompletionRequest(_Strict):
    """vLLM's /tokenize with a prompt: encoded as /v1/completions encodes a string prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # the tokenizer's BOS, if it adds one
    return_token_strs: bool = False


class TokenizeChatRequest(ChatTemplateFields):
    """vLLM's /tokenize with messages: rendered as /v1/chat/completions renders them."""

    model: str | None = None
    add_special_tokens: bool = False  # True: the tokenizer's BOS before the template's text
    return_token_strs: bool = False


def tokenize_request_type(body: bytes) -> type[TokenizeCompletionRequest | TokenizeChatRequest]:
    """The chat form when the body is an object with ``messages``, else the prompt form (whose
    validation then reports bad JSON or a missing prompt)."""
    try:
        data = json.loads(body)
    except ValueError:
        return TokenizeCompletionRequest
    if isinstance(data, dict) and "messages" in data:
        return TokenizeChatRequest
    return TokenizeCompletionRequest


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # the vocabulary's strings (byte-level BPE: "Ġthe")


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class SwitchRequest(_Strict):
    layout: Literal["tp", "ep"]


class UpdateWeightsRequest(_Strict):
    """SGLang's ``update_weights_from_disk`` body: a checkpoint folder of the served model."""

    model_path: str


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
