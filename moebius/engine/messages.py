"""Messages between the engine (scheduler) and the workers: small dataclasses, pickled over a
pipe to worker processes. The scheduler sends each rank only the sequences it computes.

A step's sequences cross the pipe by columns (one list per ``SeqWork`` field) and are rebuilt
as slotted objects: at 2,048 sequences a step's message took 2.9 ms to pickle and 4.3 ms to
unpickle one object at a time, 1.8 and 1.8 ms by columns (the 2-core CPU machine, the ranks'
GC setting). A sequence that was in the rank's step before with the same table carries only
the blocks appended since (``blocks_from``): a table grows by one block every block_size
steps, and sending whole tables made messages grow with every sequence's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

INFLIGHT = -1  # an input token the previous launch sampled, still on the device
# a guided row's token_mask that follows the launch: it needs the token in flight, which lands
# while the step's forward runs (ModelRunner.sample_late; docs/async-scheduling.md)
LATE_MASK = b""


@dataclass(slots=True)
class SeqWork:
    """One sequence's share of a step on one rank."""

    request_id: str
    token_ids: list[int]  # tokens whose KV this step computes
    start_pos: int  # position of token_ids[0]
    # the block table in the current layout's view from index ``blocks_from`` on (0: whole);
    # the rank keeps the first ``blocks_from`` from the step before (ModelRunner._full_tables)
    block_ids: list[int]
    sample: bool  # sample a token after this chunk (the prompt is complete)
    # sampling (read only when sample is True)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    output_index: int = 0  # index of the token to sample among the outputs
    num_logprobs: int = -1  # -1: none; n >= 0: the sampled logprob and the top n
    banned_token_ids: list[int] = field(default_factory=list)  # eos/stop ids before min_tokens
    # during a progressive switch: the EP owner, and the table in the other layout's view
    owner: int = -1
    alt_block_ids: list[int] | None = None
    blocks_from: int = 0
    # (presence, frequency, repetition, outputs, prompt, counted) where penalties are set: the
    # sampling rank counts each output once on the device, so ``outputs`` are the ones after
    # the first ``counted`` (0: all, and the prompt where repetition != 1, else []), up to
    # the one before the newest; the newest is this step's last input token
    # (ModelRunner._penalize)
    penalties: tuple[float, float, float, list[int], list[int], int] | None = None
    # (allowed_token_ids or None, logit_bias or None) where the request sets either: the
    # params' own (checked) objects, so a sequence without them adds one None to the message
    logit_rules: tuple[list[int] | None, dict[int, float] | None] | None = None
    # guided decoding: the tokens allowed this step, V bits packed little-endian
    # (moebius/guided/guide.py), or LATE_MASK
    token_mask: bytes | None = None
    # prompt logprobs (SamplingParams.prompt_logprobs): (top n, the prompt tokens that follow
    # the first len(...) of token_ids), the logprob of each under its predecessor's logits
    prompt_logprobs: tuple[int, list[int]] | None = None


@dataclass
class StepInput:
    layout: str
    seqs: list[SeqWork]
    num_tokens_per_rank: list[int]  # EP: every rank's token count (pads the exchange)
    record_experts: bool = False
    # every rank's work is one token per sequence (decode): ranks > 1 agree on a CUDA graph
    decode_only: bool = False
    # progressive switch: layer i runs in layer_modes[i]; every rank gets every sequence and
    # ``layout`` names the view of ``block_ids`` (``alt_block_ids`` is the other one)
    layer_modes: list[str] | None = None

    def __reduce__(self):
        cols = tuple([getattr(s, f) for s in self.seqs] for f in _SEQ_FIELDS)
        return _step_input, (self.layout, cols, self.num_tokens_per_rank, self.record_experts,
                             self.decode_only, self.layer_modes)


_SEQ_FIELDS = [f.name for f in fields(SeqWork)]


def _step_input(layout, cols, *rest) -> StepInput:
    return StepInput(layout, [SeqWork(*row) for row in zip(*cols, strict=True)], *rest)


@dataclass
class SampledToken:
    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass
class StepResult:
    rank: int
    tokens: list[SampledToken]
    # request_id -> per-MoE-layer top-k counts of this step's tokens, split at KV-block
    # boundaries: (B, num_moe_layers, E), row j for block start_pos // block_size + j
    expert_counts: dict | None = None
    # request_id -> (position of the first prompt token scored, its logprobs, their ranks, the
    # top ids and the top logprobs at each position): SeqWork.prompt_logprobs' answers
    prompt_logprobs: dict | None = None


@dataclass
class KVMove:
    """A running request's computed KV and where it lives before and after a switch."""

    request_id: str
    num_tokens: int
    old_owner: int  # -1 under TP
    old_blocks: list[int]
    new_owner: int  # -1 under TP
    new_blocks: list[int]


@dataclass
class SwitchInput:
    target: str  # "tp" or "ep"
    moves: list[KVMove]
    layers: list[int] | None = None  # decoder layers to move (None: all of them)


@dataclass
class SwitchResult:
    rank: int
    weight_bytes_sent: int
    kv_bytes_sent: int
    seconds: dict  # phase -> seconds
