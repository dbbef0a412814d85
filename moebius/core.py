"""Plain data shared by the engine, the scheduler and the APIs: sampling parameters, the
request state the scheduler tracks, and the outputs returned to users (vLLM's shapes).

No torch.distributed and no tensors here.
"""

from __future__ import annotations

import enum
import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class SamplingError(ValueError):
    """An invalid sampling parameter (the server maps it to HTTP 400)."""


MAX_LOGIT_BIAS = 1024  # entries in one request's logit_bias (OpenAI allows 300)


@dataclass
class SamplingParams:
    """How to sample one prompt's completions. Mirrors vLLM's ``SamplingParams``.

    ``temperature == 0`` is greedy. ``seed`` makes sampling reproducible per request,
    independent of batching, preemption and layout switches.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per token, besides the sampled one
    # vLLM's: each prompt token's logprob (from the second on) and the prompt's top n at its
    # position, from the model's raw logits (RequestOutput.prompt_logprobs)
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # OpenAI's: a token's logit minus presence_penalty if it is among the outputs so far, and
    # minus frequency_penalty times its count there (the prompt does not count)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' and vLLM's: the logit of a token in the prompt or the outputs divided by it
    # where positive, multiplied where negative (applied before the two above)
    repetition_penalty: float = 1.0
    # OpenAI's: token id -> a bias in [-100, 100] added to its logit before the penalties and
    # any pick, greedy included (an empty dict becomes None)
    logit_bias: dict[int, float] | None = None
    # vLLM's: only these tokens may be sampled (non-empty; kept sorted and without repeats)
    allowed_token_ids: list[int] | None = None
    # guided decoding (moebius/guided): the output is one JSON object (OpenAI's JSON mode), a
    # document of this JSON schema (OpenAI's json_schema response format, vLLM's guided_json),
    # exactly one of these strings (vLLM's guided_choice), or a whole match of this regular
    # expression (vLLM's guided_regex); it may end only where it is whole
    guided_json_object: bool = False
    guided_json: dict | bool | str | None = None
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    # JSON (an object or a schema's) with no whitespace between tokens (vLLM's
    # disable_any_whitespace); without it runs of up to 32 bytes may go there
    guided_compact_json: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (
                isinstance(self.top_k, int) and self.top_k >= 0,
                f"top_k must be -1, 0 or positive, got {self.top_k}",
            ),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be >= 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                f"logprobs must be in [0, 20], got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (
                -2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2,
                "presence_penalty and frequency_penalty must be in [-2, 2]",
            ),
            (
                0 < self.repetition_penalty <= 10,
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
            ),
            (
                self.seed is None or isinstance(self.seed, int),
                f"seed must be an integer, got {self.seed!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingError(message)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingError("min_tokens must not exceed max_tokens")
        self.logit_bias = _checked_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not (isinstance(ids, (list, tuple, set, frozenset)) and ids
                    and all(map(_is_id, ids))):
                raise SamplingError(
                    f"allowed_token_ids must be a non-empty list of token ids (integers >= 0), "
                    f"got {_short(ids)}"
                )
            self.allowed_token_ids = sorted(set(ids))
        self._check_guided()

    def _check_guided(self) -> None:
        choice = self.guided_choice
        if choice is not None and not (isinstance(choice, (list, tuple)) and choice
                                       and all(isinstance(c, str) and c for c in choice)):
            raise SamplingError(f"guided_choice must be a non-empty list of non-empty strings, "
                                f"got {_short(choice)}")
        if not self.guided:
            return
        kinds = [self.guided_json_object, self.guided_json is not None, choice is not None,
                 self.guided_regex is not None]
        if sum(kinds) > 1:
            raise SamplingError("guided_choice, guided_json (a JSON schema), guided_regex and "
                                "JSON mode exclude each other")
        if self.guided_json is not None:
            self.guided_json = _checked_schema(self.guided_json)
        if self.guided_regex is not None:
            _check_regex(self.guided_regex)
        if self.ignore_eos:
            raise SamplingError("ignore_eos cannot be combined with guided decoding: a guided "
                                "output ends where the grammar does")
        if choice is not None and self.min_tokens:
            raise SamplingError("min_tokens cannot be combined with guided_choice")
        self.guided_choice = list(choice) if choice is not None else None

    @property
    def guided(self) -> bool:
        return (self.guided_json_object or self.guided_json is not None
                or self.guided_choice is not None or self.guided_regex is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _checked_schema(schema) -> dict | bool:
    """A JSON schema (a dict, true, or its JSON text) that moebius/guided can enforce, or
    SamplingError saying what it cannot."""
    from moebius.guided.json_schema import SchemaError, compiled

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise SamplingError(f"guided_json is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)) or schema is False:
        raise SamplingError(f"guided_json must be a JSON schema (an object), got {_short(schema)}")
    try:
        compiled(schema)
    except SchemaError as e:
        raise SamplingError(f"guided_json: {e}") from None
    return schema


def _check_regex(pattern) -> None:
    """SamplingError unless ``pattern`` is a regular expression moebius/guided can enforce."""
    from moebius.guided.regex import RegexError, compiled

    if not isinstance(pattern, str):
        raise SamplingError(f"guided_regex must be a string, got {_short(pattern)}")
    try:
        compiled(pattern)
    except RegexError as e:
        raise SamplingError(f"guided_regex: {e}") from None


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _checked_logit_bias(bias) -> dict[int, float] | None:
    """``logit_bias`` as {token id: float bias}, or None where empty; SamplingError names the
    first bad entry."""
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise SamplingError(f"logit_bias must map token ids to biases, got {_short(bias)}")
    if len(bias) > MAX_LOGIT_BIAS:
        raise SamplingError(
            f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}"
        )
    out = {}
    for tid, b in bias.items():
        if not _is_id(tid):
            raise SamplingError(f"logit_bias keys must be token ids (integers >= 0), got {tid!r}")
        ok = isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
        if not (ok and -100 <= b <= 100):
            raise SamplingError(f"logit_bias values must be in [-100, 100], got {b!r} for {tid}")
        out[tid] = float(b)
    return out or None


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence the scheduler tracks: its tokens, progress, owner and KV blocks (ids only)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # resolved seed (random when the user gave none)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    # sampled by a launched step, not yet on the host (overlapped scheduling: 0 or 1)
    num_inflight: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first schedule)
    status: RequestStatus = RequestStatus.WAITING
    owner_rank: int = -1  # EP owner; -1 under TP
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of full blocks
    # block index -> data kept with the block in the prefix cache (the prefill role: the
    # block's top-k expert counts); cached blocks' entries come from the block manager
    block_meta: dict[int, object] = field(default_factory=dict)
    alt_block_ids: list[int] = field(default_factory=list)  # other view, progressive switch
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    guide: object | None = None  # guided decoding: a moebius.guided.guide.Guide
    priority: int = 0  # scheduling_policy "priority": lower goes first (vLLM's)
    # params.prompt_logprobs set (on a group's first child only): entry p >= 1 is (the logprob
    # of prompt token p, its rank, {top id: logprob}) once a step computed it, else None
    prompt_logprobs: list | None = None
    num_prompt_logprobs: int = 0  # entries computed

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Some prompt logprob is still to compute: its prompt must run whole, not from the
        prefix cache (whose blocks hold KV, not logits)."""
        return (self.prompt_logprobs is not None
                and self.num_prompt_logprobs < len(self.prompt_token_ids) - 1)

    def store_prompt_logprobs(self, first: int, lps, ranks, top_ids, top_lps) -> None:
        """Keep prompt logprobs a step computed (``StepResult.prompt_logprobs``) from prompt
        position ``first`` on. A chunk computed twice (in flight across a preemption) writes
        the same values again."""
        entries = self.prompt_logprobs
        if entries is None:
            return
        for j, lp in enumerate(lps):
            self.num_prompt_logprobs += entries[first + j] is None
            entries[first + j] = (lp, ranks[j], dict(zip(top_ids[j], top_lps[j], strict=True)))

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """``all_token_ids[start:stop]`` without concatenating the whole sequence."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p : stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - p]

    @property
    def token_view(self) -> _TokenView:
        """``all_token_ids`` for slicing, without concatenating the whole sequence."""
        return _TokenView(self)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


class _TokenView:
    """A request's prompt + output tokens, sliced ``[start:stop]`` through ``token_slice``
    (what the prefix cache reads of a block that became full, once every block_size steps)."""

    __slots__ = ("_req",)

    def __init__(self, req: Request) -> None:
        self._req = req

    def __getitem__(self, s: slice) -> list[int]:
        assert s.step is None and 0 <= s.start <= s.stop
        return self._req.token_slice(s.start, min(s.stop, self._req.num_tokens))


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class Prefix(Sequence):
    """The first ``len`` items of a list that only grows by appends, read-only: a streaming
    step's output reports a request's tokens (and logprobs) so far without copying them, which
    made each step's host time grow with every token generated (BENCHMARKS.md, session 7)."""

    __slots__ = ("_items", "_len")

    def __init__(self, items: list) -> None:
        self._items, self._len = items, len(items)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._len)
            if step == 1:
                return self._items[start:stop]
            return [self._items[j] for j in range(start, stop, step)]
        if not -self._len <= i < self._len:
            raise IndexError("Prefix index out of range")
        return self._items[i % self._len]

    def __iter__(self):
        return itertools.islice(self._items, self._len)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]  # a list once finished; while streaming, a ``Prefix``
    cumulative_logprob: float | None
    logprobs: Sequence[dict[int, Logprob]] | None  # likewise
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One prompt's result: vLLM's ``RequestOutput`` shape."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    # SamplingParams.prompt_logprobs set: None for the first prompt token, then each token's
    # logprob and the top n at its position (with ranks), once the prompt is computed
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
