"""Continuous-batching scheduler (ids and lists only): admits requests under a token budget,
mixes chunked prefill with decode, preempts when the KV pool runs out, assigns EP owners, and
plans the bookkeeping side of a layout switch.

Under TP one block manager serves all ranks (their tables are identical); under EP each rank
has its own, and every request has an owner rank.

Order: "fcfs" admits by arrival and preempts the latest admitted; "priority" (vLLM's) keeps
the waiting and the running lists sorted by (priority, arrival), so it admits the lowest
priority value first, gives the running ones the step's tokens in that order and preempts
the last (a request never preempts another to be admitted, as in vLLM).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from moebius.config import EngineConfig
from moebius.core import Request, RequestStatus
from moebius.engine.messages import (
    INFLIGHT,
    LATE_MASK,
    KVMove,
    SampledToken,
    SeqWork,
    StepInput,
    SwitchInput,
)
from moebius.kv.block_manager import BlockManager

log = logging.getLogger("moebius")


@dataclass
class ScheduledBatch:
    items: list[tuple[Request, int]]  # (request, tokens computed this step)
    inputs: list[StepInput]  # one per rank
    num_preempted: int = 0
    # overlapped scheduling: ``launched`` advanced the counts already; which items sample
    sampling: list[bool] | None = None
    # guided requests launched with a token in flight: their masks follow (``late_masks``)
    late: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.items


class Scheduler:
    def __init__(self, cfg: EngineConfig, num_blocks: dict[str, int]) -> None:
        self.cfg = cfg
        self.world_size = cfg.ranks
        self.layout = cfg.layout if cfg.ranks > 1 else "tp"
        self.num_blocks = num_blocks  # layout -> blocks per manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.managers = self._make_managers(self.layout)
        self.num_preemptions = 0
        # prompt tokens looked up in the prefix cache at first admission, and those it served
        # (the managers are remade by a switch; these count across switches)
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0
        self.num_finished = 0  # requests finished so far (the engine rescans groups on change)
        self.transition = None  # a progressive switch in flight (engine/progressive.py)
        self.paused = False  # admit nothing (a weight update waits for the running to finish)
        self.num_admitted_mid_switch = 0
        # request id -> (its table list, the length sent) for the requests of the last step's
        # inputs: the ranks that got them hold that prefix (see ``_work``)
        self._tables_sent: dict[str, tuple[list[int], int]] = {}
        # request id -> (its output list, the outputs sent) for the last step's sequences that
        # carried penalties: the ranks that sampled them count that prefix on the device
        self._history_sent: dict[str, tuple[list[int], int]] = {}

    def _make_managers(self, layout: str) -> list[BlockManager]:
        count = self.world_size if layout == "ep" else 1
        return [
            BlockManager(
                self.num_blocks[layout], self.cfg.block_size, self.cfg.enable_prefix_caching
            )
            for _ in range(count)
        ]

    # ------------------------------------------------------------------ requests
    def add(self, req: Request) -> None:
        self._insert(self.waiting, req, front=False)

    def _insert(self, queue, req: Request, front: bool) -> None:
        """Into ``waiting`` or ``running``: at the end (``front``: the start) in "fcfs", at
        its (priority, arrival) place in "priority" (searched from the end: most requests
        share a priority and arrive last)."""
        if self.cfg.scheduling_policy != "priority":
            queue.appendleft(req) if front else queue.append(req)
            return
        key, i = (req.priority, req.arrival_time), len(queue)
        while i and (queue[i - 1].priority, queue[i - 1].arrival_time) > key:
            i -= 1
        queue.insert(i, req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def manager(self, req: Request) -> BlockManager:
        return self.managers[req.owner_rank if self.layout == "ep" else 0]

    def kv_usage(self) -> float:
        return sum(m.usage() for m in self.managers) / len(self.managers)

    def max_tokens_per_request(self) -> int:
        """The most tokens one request can ever hold in this layout's KV."""
        return self.num_blocks[self.layout] * self.cfg.block_size

    def alt_manager(self, req: Request) -> BlockManager:
        """The other view's manager of ``req`` during a progressive switch."""
        ep = self.layout != "ep"
        return self.transition.alt_managers[req.owner_rank if ep else 0]

    def _free(self, req: Request) -> None:
        self.manager(req).free_table(req.block_ids)
        if self.transition is not None:
            self.alt_manager(req).free_table(req.alt_block_ids)

    def _fits(self, req: Request, num_tokens: int) -> bool:
        ok = self.manager(req).can_grow(req.block_ids, num_tokens)
        if self.transition is not None:
            ok = ok and self.alt_manager(req).can_grow(req.alt_block_ids, num_tokens)
        return ok

    def _grow(self, req: Request, num_tokens: int) -> None:
        self.manager(req).grow(req.block_ids, num_tokens)
        if self.transition is not None:
            self.alt_manager(req).grow(req.alt_block_ids, num_tokens)

    def finish(self, req: Request, reason: str, stop_reason=None) -> None:
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self._free(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        self.num_finished += 1

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        self._requeue(req)

    def _requeue(self, req: Request) -> None:
        """Back to the front of the queue with no KV: it recomputes when admitted again."""
        req.block_ids = []
        req.alt_block_ids = []
        req.block_hashes = []
        req.block_meta = {}
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.owner_rank = -1
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._insert(self.waiting, req, front=True)

    # ------------------------------------------------------------------ scheduling
    def _bucket(self, req: Request) -> int:
        return req.owner_rank if self.layout == "ep" and self.transition is None else 0

    def _choose_owner(self, req: Request) -> int:
        """EP owner: balance tokens held, prefer a rank that caches the prompt's prefix."""
        loads = [0] * self.world_size
        for r in self.running:
            loads[r.owner_rank] += r.num_tokens
        slack = max(self.cfg.block_size, sum(loads) // (4 * self.world_size))
        floor = min(loads)
        best, best_key = 0, None
        for rank in range(self.world_size):
            if loads[rank] > floor + slack:
                continue
            hit = 0  # mid-switch: no prefix reuse (progressive.py), so only load counts
            if self.transition is None:
                hit = len(self.managers[rank].match_prefix(req.all_token_ids))
            key = (-hit, loads[rank], rank)
            if best_key is None or key < best_key:
                best, best_key = rank, key
        return best

    def schedule(self) -> ScheduledBatch:
        ep = self.layout == "ep"
        split = ep and self.transition is None  # mid-switch every rank runs TP layers on all
        budgets = [self.cfg.max_num_batched_tokens] * (self.world_size if split else 1)
        items: list[tuple[Request, int]] = []
        preempted = 0
        # this loop runs for every running sequence every step: _bucket, Request.num_tokens and
        # BlockManager.blocks_needed are inlined (block_size is the managers'), the fast decode
        # case (its table already holds the step) first
        running, steady, bs = RequestStatus.RUNNING, self.transition is None, self.cfg.block_size
        for req in list(self.running):
            if req.status is not running:
                continue
            inflight = req.num_inflight
            if inflight and (self._ends_with_inflight(req) or (
                    req.guide is not None and self.transition is not None)):
                # its last token in flight; or guided mid-switch, where a step samples inside
                # its launch, so the mask cannot follow (LATE_MASK)
                continue
            b = req.owner_rank if split else 0
            done = req.num_computed_tokens
            total = len(req.prompt_token_ids) + len(req.output_token_ids) + inflight
            n = min(total - done, budgets[b])
            if n <= 0:
                continue
            if steady and (done + n + bs - 1) // bs <= len(req.block_ids):
                items.append((req, n))  # its table holds the step already (most decode steps)
                budgets[b] -= n
                continue
            while not self._fits(req, req.num_computed_tokens + n):
                # the last of this bucket in the running order (fcfs: the latest admitted;
                # priority: the lowest): never one already scheduled this step, since those
                # precede req in that order
                peers = [r for r in self.running if self._bucket(r) == b]
                victim = peers[-1]
                if peers == [req]:  # alone and still too long: it can never fit this pool
                    log.warning(
                        "request %s needs more KV than a rank holds: stopped at %d tokens",
                        req.request_id,
                        req.num_tokens,
                    )
                    self.finish(req, "length")
                    break
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue
            self._grow(req, req.num_computed_tokens + n)
            items.append((req, n))
            budgets[b] -= n
        while (self.waiting and not preempted and not self.paused
               and len(self.running) < self.cfg.max_num_seqs):
            req = self.waiting[0]
            if req.num_inflight:  # preempted with a token in flight: admitted once it lands
                break
            mid_switch = self.transition is not None  # one of the two views is EP: an owner
            req.owner_rank = self._choose_owner(req) if ep or mid_switch else -1
            b = self._bucket(req)
            mgr = self.manager(req)
            cached = ([] if mid_switch or req.needs_prompt_logprobs
                      else mgr.match_prefix(req.all_token_ids))
            num_cached = len(cached) * self.cfg.block_size
            n = min(req.num_tokens - num_cached, budgets[b])
            fits = n > 0 and mgr.can_allocate(cached, num_cached + n)
            if fits and mid_switch:
                fits = self.alt_manager(req).can_allocate([], n)
            if not fits:
                req.owner_rank = -1
                break
            self.waiting.popleft()
            if mid_switch:
                req.alt_block_ids = self.alt_manager(req).allocate([], n)
                self.num_admitted_mid_switch += 1
            req.block_ids = mgr.allocate(cached, num_cached + n)
            req.block_hashes = []
            req.block_meta = {i: m for i, m in enumerate(mgr.cached_meta(cached)) if m is not None}
            req.num_computed_tokens = num_cached
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
                self.num_prefix_hits += num_cached
                self.num_prefix_queries += req.num_prompt_tokens
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self._insert(self.running, req, front=False)
            items.append((req, n))
            budgets[b] -= n
        late = [r for r, _ in items if r.guide is not None and r.num_inflight]
        return ScheduledBatch(items, self._inputs(items), preempted, late=late)

    def late_masks(self, batch: ScheduledBatch) -> dict[str, bytes]:
        """The masks of ``batch.late``'s rows, once the tokens that were in flight at its
        launch have landed (``update``): the ranks sample with them (none for a request that
        finished meanwhile; its token is dropped)."""
        return {r.request_id: r.guide.mask(r.output_token_ids) for r in batch.late
                if r.status == RequestStatus.RUNNING}

    def _inputs(self, items: list[tuple[Request, int]]) -> list[StepInput]:
        if self.transition is not None:
            return self._mixed_inputs(items)
        per_rank: list[list[SeqWork]] = [[] for _ in range(self.world_size)]
        scoring = False  # a chunk scores prompt tokens: eager (a graph keeps only sampled rows)
        sent, self._tables_sent = self._tables_sent, {}
        history, self._history_sent = self._history_sent, {}
        for req, n in items:
            rid = req.request_id
            work = self._work(req, n, sent.get(rid), history.get(rid))
            self._tables_sent[rid] = (req.block_ids, work.blocks_from + len(work.block_ids))
            scoring = scoring or work.prompt_logprobs is not None
            if work.penalties is not None:
                self._history_sent[rid] = (req.output_token_ids,
                                           work.penalties[5] + len(work.penalties[3]))
            if self.layout == "ep":
                per_rank[req.owner_rank].append(work)
            else:
                for lst in per_rank:
                    lst.append(work)
        counts = [sum(len(w.token_ids) for w in lst) for lst in per_rank]
        record = self.record_experts
        decode = bool(items) and not scoring and all(n == 1 for _, n in items)
        return [StepInput(self.layout, lst, counts, record, decode) for lst in per_rank]

    def _mixed_inputs(self, items: list[tuple[Request, int]]) -> list[StepInput]:
        """Mid-switch: every rank gets every sequence (its TP layers need them all), with the
        EP owner and both views' tables."""
        works, counts = [], [0] * self.world_size
        self._tables_sent = {}  # whole tables and histories this step and the next
        self._history_sent = {}
        for req, n in items:
            w = self._work(req, n, None, None)
            w.owner, w.alt_block_ids = req.owner_rank, list(req.alt_block_ids)
            works.append(w)
            counts[req.owner_rank] += n
        modes = list(self.transition.modes)
        return [StepInput(self.layout, works, counts, layer_modes=modes)] * self.world_size

    def _ends_with_inflight(self, req: Request) -> bool:
        """Whether the token ``req`` has in flight will stop it by length (max_tokens or the
        context), so it needs no further step."""
        p = req.params
        num_out = len(req.output_token_ids) + req.num_inflight
        return (p.max_tokens is not None and num_out >= p.max_tokens) or (
            req.num_tokens + req.num_inflight >= self.cfg.context_len
        )

    def _work(self, req: Request, n: int, sent: tuple[list[int], int] | None,
              history: tuple[list[int], int] | None) -> SeqWork:
        """``req``'s share of the step; ``sent``: its table and the length the same ranks got
        in the step before (then only the blocks appended since are sent). A table that was
        replaced (admission, preemption, a switch) is another list object: sent whole.
        ``history``: its output list and the outputs the same ranks counted for its penalties
        in the step before (then only the outputs since go, and the prompt does not; whole
        whenever the table goes whole, since the sampling ranks may have changed)."""
        start = req.num_computed_tokens
        out_ids = req.output_token_ids
        known = len(req.prompt_token_ids) + len(out_ids)  # req.num_tokens
        if n == 1 and start == known:  # decode of the token in flight
            tokens = [INFLIGHT]  # the runner reads it on the device
        elif n == 1 and start == known - 1 and out_ids:  # decode, its token landed
            tokens = [out_ids[-1]]
        else:  # prompt chunks, recomputation after a preemption
            tokens = req.token_slice(start, min(start + n, known))
            tokens += [INFLIGHT] * (start + n - known)
        p = req.params
        num_out = len(out_ids) + req.num_inflight
        do_sample = start + n == known + req.num_inflight
        banned: list[int] = []
        if do_sample and num_out < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_ids))
        table = req.block_ids
        num_blocks = len(table)
        since = sent[1] if sent is not None and sent[0] is table and sent[1] <= num_blocks else 0
        # positional (SeqWork's field order): this runs for every sequence of every step.
        # The table is sliced (a copy): an abort from another thread may clear the request's
        # table before a rank's message is pickled
        # penalties: the outputs before the newest one (at most one is in flight, and it, or
        # the newest landed one, is this step's last input token), from those counted before
        penalties = None
        if do_sample and (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1):
            rep, upto = p.repetition_penalty, max(num_out - 1, 0)
            counted = (history[1] if since and history is not None and history[0] is out_ids
                       and history[1] <= upto else 0)
            prompt = req.prompt_token_ids if rep != 1 and not counted else []
            penalties = (p.presence_penalty, p.frequency_penalty, rep, out_ids[counted:upto],
                         prompt, counted)
        rules = None
        if do_sample and (p.allowed_token_ids or p.logit_bias):
            rules = (p.allowed_token_ids, p.logit_bias)
        mask = None
        if do_sample and req.guide is not None:  # a token in flight: the mask follows
            mask = LATE_MASK if req.num_inflight else req.guide.mask(out_ids)
        scored = None  # prompt logprobs: the prompt tokens this chunk's rows predict
        num_prompt = len(req.prompt_token_ids)
        if start < num_prompt - 1 and req.needs_prompt_logprobs:
            scored = (p.prompt_logprobs, req.prompt_token_ids[start + 1 : start + n + 1])
        return SeqWork(req.request_id, tokens, start, table[since:num_blocks], do_sample,
                       p.temperature, p.top_k, p.top_p, p.min_p, req.seed, num_out,
                       -1 if p.logprobs is None else p.logprobs, banned, -1, None, since,
                       penalties, rules, mask, scored)

    eos_ids: tuple[int, ...] = ()
    record_experts: bool = False  # ask ranks for per-request top-k counts (prefill role)

    def admit_prefilled(self, req: Request) -> bool:
        """Admit a request whose prompt KV was computed elsewhere (disaggregated decode):
        ``req`` carries its first output token; blocks for the prompt are allocated now and
        ``num_computed_tokens`` = prompt length, so its next step decodes. Returns False (and
        changes nothing) when it does not fit yet; the caller then writes the KV into
        ``req.block_ids``. The first token may already finish it (stop checks run here)."""
        if len(self.running) >= self.cfg.max_num_seqs:
            return False
        req.owner_rank = self._choose_owner(req) if self.layout == "ep" else -1
        mgr = self.manager(req)
        num_prompt = req.num_prompt_tokens
        if not mgr.can_allocate([], num_prompt + 1):
            req.owner_rank = -1
            return False
        req.block_ids = mgr.allocate([], num_prompt)
        req.block_hashes = []
        req.num_computed_tokens = num_prompt
        req.status = RequestStatus.RUNNING
        self._insert(self.running, req, front=False)
        self._check_stop(req)
        return True

    def commit_blocks(self, req: Request) -> None:
        """Register ``req``'s blocks that became full of computed tokens for prefix caching
        (reading only those blocks' tokens, not the whole sequence)."""
        mgr = self.manager(req)
        known = min(req.num_computed_tokens, req.num_tokens)  # not the tokens in flight
        if mgr.caching and known // mgr.block_size > len(req.block_hashes):
            mgr.commit_full_blocks(
                req.block_ids,
                req.token_view,
                known,
                req.block_hashes,
                req.block_meta,
            )

    def commit_prefilled(self, req: Request) -> None:
        """Register the imported prompt blocks for prefix caching (after the KV is written)."""
        if req.status == RequestStatus.RUNNING:
            self.commit_blocks(req)

    # ------------------------------------------------------------------ results
    def launched(self, batch: ScheduledBatch) -> None:
        """Overlapped scheduling: ``batch`` is on the device, and the next ``schedule()`` comes
        before its tokens. Count its tokens as computed and its samples as in flight now."""
        batch.sampling = []
        for req, n in batch.items:
            req.num_computed_tokens += n
            samples = req.num_computed_tokens == req.num_tokens + req.num_inflight
            req.num_inflight += samples
            batch.sampling.append(samples)

    def update(self, batch: ScheduledBatch, tokens: dict[str, SampledToken]) -> list[Request]:
        """Advance computed counts, append sampled tokens; returns requests with a new token.
        After ``launched``: a token in flight lands even on a request preempted meanwhile (it
        is recomputed with it); one that finished meanwhile drops it."""
        out = []
        for i, (req, n) in enumerate(batch.items):
            if batch.sampling is not None:
                req.num_inflight -= batch.sampling[i]
                if req.status == RequestStatus.FINISHED:
                    continue
            elif req.status != RequestStatus.RUNNING:
                continue
            else:
                req.num_computed_tokens += n
            if self.transition is None and req.status == RequestStatus.RUNNING:
                self.commit_blocks(req)  # nothing registers mid-switch: progressive.begin
            tok = tokens.get(req.request_id)
            if tok is None:
                continue
            req.output_token_ids.append(tok.token_id)
            if tok.logprob is not None:
                req.output_logprobs.append({tok.token_id: tok.logprob, **(tok.top_logprobs or {})})
            self._check_stop(req)
            out.append(req)
        return out

    def _check_stop(self, req: Request) -> None:
        p = req.params
        t = req.output_token_ids[-1]
        if len(req.output_token_ids) >= p.min_tokens:
            if not p.ignore_eos and t in self.eos_ids:
                return self.finish(req, "stop")
            if t in p.stop_token_ids:
                return self.finish(req, "stop", t)
        if p.max_tokens is not None and len(req.output_token_ids) >= p.max_tokens:
            return self.finish(req, "length")
        if req.num_tokens >= self.cfg.context_len:
            return self.finish(req, "length")

    # ------------------------------------------------------------------ switching
    def plan_switch(self, target: str) -> tuple[SwitchInput, list[Request]]:
        """Re-home every running request's KV for ``target``; preempt the fewest requests
        needed when the target view cannot hold them all. Returns the plan and the preempted."""
        old = [(r, r.owner_rank, list(r.block_ids)) for r in self.running]
        self.layout = target
        self.managers = self._make_managers(target)
        owners = self._balanced_owners([r for r, _, _ in old]) if target == "ep" else {}
        moves: list[KVMove] = []
        preempted: list[Request] = []
        # Smallest first: keeps the most requests when they do not all fit.
        for req, old_owner, old_blocks in sorted(old, key=lambda x: x[0].num_computed_tokens):
            req.owner_rank = owners.get(req.request_id, -1)
            mgr = self.manager(req)
            req.block_hashes = []
            if not mgr.can_allocate([], req.num_computed_tokens):
                preempted.append(req)
                continue
            req.block_ids = mgr.allocate([], req.num_computed_tokens)
            self.commit_blocks(req)
            moves.append(
                KVMove(
                    req.request_id,
                    req.num_computed_tokens,
                    old_owner,
                    old_blocks,
                    req.owner_rank,
                    list(req.block_ids),
                )
            )
        for req in preempted:  # their blocks belonged to the old view: nothing to free
            self.running.remove(req)
            self._requeue(req)
        for req in self.waiting:
            req.owner_rank = -1
        return SwitchInput(target, moves), preempted

    def _balanced_owners(self, reqs: list[Request]) -> dict[str, int]:
        loads = [0] * self.world_size
        owners = {}
        for req in sorted(reqs, key=lambda r: -r.num_tokens):
            rank = min(range(self.world_size), key=lambda i: (loads[i], i))
            owners[req.request_id] = rank
            loads[rank] += req.num_tokens
        return owners
