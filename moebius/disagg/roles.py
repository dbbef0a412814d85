"""Prefill and decode roles: engines that hand a request over between instances.

`PrefillEngine` runs prompts with expert recording on (`StepInput.record_experts`), and when a
prompt's first token is sampled it copies the prompt's KV out of the pool (all KV heads,
assembled from the ranks' slices: the wire format does not depend on the layout), together
with the per-MoE-layer top-k counts of the prompt tokens, the first token (and its logprobs)
and the resolved seed, into `exports`; then it finishes the request with reason "handoff",
which frees its blocks at once.

The counts are kept per KV block (`Request.block_meta`, block index -> (L, E) counts): the
scheduler stores a full block's counts with the block in the prefix cache and hands them back
to a request that hits it, so a cache hit's signature equals the one computed from scratch.

`DecodeEngine` accepts such a payload for a request id (`expect`); when the request arrives
through the normal `add_request` (the server's usual path), it is admitted with its prompt
already computed: blocks are allocated, the KV written, `num_computed_tokens` = prompt length,
the first token already in its outputs, so the next step decodes. Admission and the KV write
run on the engine thread between steps, never beside a step. Sampling continues from the
prefill's seed at output index 1, so greedy and seeded outputs equal a single instance's.

The HTTP side (internal endpoints, server start) is in moebius/disagg/handoff.py.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moebius.config import EngineConfig
from moebius.core import Request, SamplingParams
from moebius.disagg.kv_transfer import KVPayload
from moebius.engine.llm_engine import LLMEngine, _Group
from moebius.tokenizer import IncrementalDetokenizer


def assemble_heads(parts: list, num_kv_heads: int) -> torch.Tensor:
    """Full-head KV (L, P, T, kv, d) from the ranks' (first head, (L, P, T, kvh, d)) slices
    (None for a rank that holds none); replicated heads are taken once."""
    parts = [p for p in parts if p is not None]
    start, kv = parts[0]
    if start == 0 and kv.shape[3] == num_kv_heads:
        return kv
    full = kv.new_empty((*kv.shape[:3], num_kv_heads, kv.shape[4]))
    for start, kv in parts:
        full[:, :, :, start : start + kv.shape[3]] = kv
    return full


def add_block_counts(block_meta: dict, start_pos: int, pieces: np.ndarray, block_size: int) -> None:
    """Fold one step's counts (B, L, E), split at block boundaries from ``start_pos`` (see
    ``StepResult.expert_counts``), into ``block_meta`` (block index -> (L, E)). A piece that
    starts a block replaces what the block held (a recompute after preemption counts once);
    one that continues a block adds to it. Arrays are never changed in place: cached blocks'
    counts are shared."""
    first = start_pos // block_size
    for j, piece in enumerate(pieces):
        i = first + j
        if j == 0 and start_pos % block_size and i in block_meta:
            block_meta[i] = block_meta[i] + piece
        else:
            block_meta[i] = piece


def prompt_counts(block_meta: dict, num_prompt_tokens: int, block_size: int):
    """(L, E) top-k counts of the whole prompt: the sum over its blocks (None if none)."""
    num_blocks = (num_prompt_tokens + block_size - 1) // block_size
    parts = [block_meta[i] for i in range(num_blocks) if i in block_meta]
    return sum(parts[1:], parts[0].copy()) if parts else None


def _scores_out(entries: list | None) -> list | None:
    """A request's prompt logprobs (``Request.prompt_logprobs``) as the handoff's JSON."""
    if entries is None:
        return None
    return [None if e is None else [e[0], e[1], [[t, v] for t, v in e[2].items()]]
            for e in entries]


def _scores_in(entries: list) -> list:
    return [None if e is None else (float(e[0]), int(e[1]), {int(t): float(v) for t, v in e[2]})
            for e in entries]


class PrefillEngine(LLMEngine):
    """Runs prompts, exports each one's KV + expert counts + first token; see the module doc."""

    supports_overlap = False  # reads each step's KV and counts before the scheduler moves on

    def __init__(self, cfg: EngineConfig) -> None:
        super().__init__(cfg)
        self.scheduler.record_experts = True
        self.exports: dict[str, KVPayload] = {}

    def _on_step_results(self, batch, results) -> None:
        counts_by_rid = {}
        for res in results:
            counts_by_rid.update(res.expert_counts or {})
        bs = self.cfg.block_size
        for req, _ in batch.items:  # before Scheduler.update: num_computed_tokens = start_pos
            pieces = counts_by_rid.get(req.request_id)
            if pieces is not None:
                add_block_counts(req.block_meta, req.num_computed_tokens, pieces, bs)
        tokens = {t.request_id: t for res in results for t in res.tokens}
        for req, _ in batch.items:
            tok = tokens.get(req.request_id)
            if tok is None or req.output_token_ids:
                continue
            parts = self.executor.call(
                "export_kv", req.owner_rank, list(req.block_ids), req.num_prompt_tokens
            )
            counts = prompt_counts(req.block_meta, req.num_prompt_tokens, bs)
            lps = None
            if tok.logprob is not None:
                lps = [
                    [tok.token_id, tok.logprob],
                    *([k, v] for k, v in (tok.top_logprobs or {}).items()),
                ]
            meta = {
                "request_id": req.request_id,
                "prompt_token_ids": list(req.prompt_token_ids),
                "first_token": tok.token_id,
                "first_logprobs": lps,
                "seed": req.seed,
                "num_cached_tokens": req.num_cached_tokens,
                "expert_counts": None if counts is None else counts.tolist(),
                "prompt_logprobs": _scores_out(req.prompt_logprobs),
            }
            kv = assemble_heads(parts, self.cfg.model.num_kv_heads)
            self.exports[req.request_id] = KVPayload(meta, kv)

    def _collect(self, updated: list[Request]) -> list:
        for req in updated:
            if not req.is_finished:
                self.scheduler.finish(req, "handoff")
        return super()._collect(updated)


class DecodeEngine(LLMEngine):
    """Continues requests prefilled elsewhere; see the module doc."""

    supports_overlap = False  # admits handed-off requests between steps (admit_prefilled)

    def __init__(self, cfg: EngineConfig) -> None:
        super().__init__(cfg)
        self._expected: dict[str, KVPayload] = {}
        self._to_admit: list[tuple[Request, torch.Tensor]] = []
        self._fresh: list[Request] = []

    def expect(self, request_id: str, payload: KVPayload) -> None:
        """The next ``add_request`` with this id is admitted with ``payload``'s KV."""
        with self._lock:
            self._expected[request_id] = payload

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._expected.pop(request_id, None)

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        with self._lock:
            payload = self._expected.pop(request_id, None) if request_id else None
        if payload is None:
            return super().add_request(prompt, params, request_id, priority=priority)
        self.check_priority(priority)
        meta = payload.meta
        ids = list(meta["prompt_token_ids"])
        if params.n != 1:
            raise ValueError("a handed-off request has n = 1")
        if not isinstance(prompt, str) and list(prompt) != ids:
            raise ValueError("the handed-off prompt differs from the request's")
        self.check_prompt(ids, params)
        req = Request(request_id, ids, params, seed=meta["seed"], priority=priority)
        req.guide = self.guide(params)  # it reads the first token with the rest
        req.output_token_ids.append(int(meta["first_token"]))
        if params.logprobs is not None and meta.get("first_logprobs"):
            req.output_logprobs.append({int(t): float(v) for t, v in meta["first_logprobs"]})
        if params.prompt_logprobs is not None and meta.get("prompt_logprobs"):
            req.prompt_logprobs = _scores_in(meta["prompt_logprobs"])
            req.num_prompt_logprobs = len(ids) - 1
        req.num_cached_tokens = int(meta.get("num_cached_tokens", 0))
        detok = (
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            if self.tokenizer
            else None
        )
        text = prompt if isinstance(prompt, str) else None
        with self._lock:
            if request_id in self.groups:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.groups[request_id] = _Group(request_id, text, [req], [detok], [""])
            self.requests[request_id] = req
            self._to_admit.append((req, payload.kv))
        return request_id

    def has_unfinished(self) -> bool:
        return super().has_unfinished() or bool(self._to_admit)

    def step(self):
        self._admit_handed_off()
        return super().step()

    def _admit_handed_off(self) -> None:
        """Admit waiting handed-off requests in order while they fit; write their KV."""
        while True:
            with self._lock:
                if not self._to_admit:
                    return
                req, kv = self._to_admit[0]
                if not req.is_finished and not self.scheduler.admit_prefilled(req):
                    return  # no room yet: retried before the next step
                self._to_admit.pop(0)
                req.first_token_time = time.monotonic()
                write = not req.is_finished
            if write:
                self.executor.call("import_kv", req.owner_rank, list(req.block_ids), kv)
                with self._lock:
                    self.scheduler.commit_prefilled(req)
            self._fresh.append(req)

    def _collect(self, updated: list[Request]) -> list:
        fresh, self._fresh = self._fresh, []
        return super()._collect([r for r in fresh if r not in updated] + updated)
