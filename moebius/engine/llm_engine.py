"""The engine loop: requests in, one scheduled step at a time through the workers, outputs
out. Owns the tokenizer, the scheduler, detokenization and stop strings, and applies layout
switches at step boundaries (from a schedule, or ``switch()`` called from any thread).
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass, field

from moebius.config import ConfigError, EngineConfig
from moebius.core import (
    CompletionOutput,
    Logprob,
    Prefix,
    Request,
    RequestOutput,
    SamplingError,
    SamplingParams,
)
from moebius.engine import progressive
from moebius.engine.gc_tuning import tune_gc
from moebius.engine.policy import EngineSnapshot, ManualPolicy, SwitchPolicy
from moebius.engine.scheduler import Scheduler
from moebius.engine.weight_update import WeightUpdate, checked_source, describe
from moebius.engine.worker import make_executor
from moebius.guided.guide import WHITESPACE_RUN, Guide, Vocabulary
from moebius.guided.token_bytes import token_bytes
from moebius.parallel.reshard import owner_changed_expert_bytes
from moebius.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("moebius")


class PromptTooLongError(ValueError):
    """The prompt cannot fit the model's context or the KV pool."""


@dataclass
class SwitchRecord:
    step: int
    source: str
    target: str
    running: int
    preempted: int
    weight_bytes: int
    kv_bytes: int
    seconds: float
    phases: dict


def _critical_phases(results) -> dict:
    """Seconds per phase of the slowest rank (the switch waits for it), each rank's time summed
    over the steps of a progressive switch."""
    per_rank: dict[int, dict] = {}
    for r in results:
        mine = per_rank.setdefault(r.rank, {})
        for ph, sec in r.seconds.items():
            mine[ph] = mine.get(ph, 0.0) + sec
    return {ph: max(t[ph] for t in per_rank.values()) for ph in results[0].seconds}


@dataclass
class _Group:
    """The ``n`` completions of one prompt."""

    request_id: str
    prompt: str | None
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    texts: list[str] = field(default_factory=list)
    reported: bool = False
    final_only: bool = False  # report once, when finished (offline generate): no per-step work
    # per child, the logprobs reported so far and their running sum: each step converts only
    # the new token's (rebuilding them all made a step O(tokens so far) per request)
    logprobs: list[list[dict[int, Logprob]]] = field(init=False)
    cum_logprobs: list[float] = field(init=False)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # once all are computed

    def __post_init__(self) -> None:
        self.logprobs = [[] for _ in self.children]
        self.cum_logprobs = [0.0 for _ in self.children]


class LLMEngine:
    # roles that act on a step's results before the scheduler applies them turn this off
    supports_overlap = True

    def __init__(self, cfg: EngineConfig) -> None:
        tune_gc()
        self.cfg = cfg
        self.tokenizer = Tokenizer(cfg.model_dir, cfg.chat_template) if cfg.model_dir else None
        t0 = time.perf_counter()
        self.executor = make_executor(cfg)
        self.startup_seconds = time.perf_counter() - t0
        self.memory = self.executor.reports
        nb_ep = min(r["kv_blocks_ep"] for r in self.memory)
        nb_tp = min(r["kv_blocks_tp"] for r in self.memory)
        self.scheduler = Scheduler(cfg, {"ep": nb_ep, "tp": nb_tp})
        log.info("%s", self.memory_summary())
        self.kv_tokens_per_request = min(nb_ep, nb_tp) * cfg.block_size  # in either layout
        self._check_kv_capacity()
        eos = set(cfg.model.eos_token_ids)
        if self.tokenizer and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.scheduler.eos_ids = tuple(sorted(eos))
        self.groups: dict[str, _Group] = {}
        self.requests: dict[str, Request] = {}
        self.step_count = 0
        self.switches: list[SwitchRecord] = []
        self.weight_updates: list[WeightUpdate] = []  # refused ones too (with their error)
        self.weights_version = 0
        self._pending_update = None  # a source to write once no request is running
        self.switch_schedule = dict(cfg.switch_schedule)
        self.progressive_layers = cfg.progressive_layers  # layers a step (0: all at once)
        self._pending_switch: str | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._rng = random.Random(cfg.seed)
        self._vocabulary: Vocabulary | None = None
        # overlapped steps: one step in flight at a time (docs/async-scheduling.md)
        self._overlap = (
            cfg.overlap_steps and self.supports_overlap and hasattr(self.executor, "launch")
        )
        self._inflight = None  # (batch, pending step, launch time) not yet applied
        self._last_landing = 0.0
        self._finished_seen = 0  # scheduler.num_finished at the last scan for unreported groups
        self.policy: SwitchPolicy = ManualPolicy()
        if cfg.policy == "auto" and cfg.ranks > 1:
            from moebius.engine.policy import AutoPolicy
            from moebius.engine.step_profile import load_or_measure

            self.policy = AutoPolicy(
                load_or_measure(self),
                progressive_layers=cfg.progressive_layers,
                num_layers=cfg.model.num_layers,
            )

    # ------------------------------------------------------------------ requests
    @property
    def layout(self) -> str:
        return self.scheduler.layout

    def next_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        final_only: bool = False,
        add_special_tokens: bool = True,
        priority: int = 0,
    ) -> str:
        """Admit a prompt; returns its request id. ``final_only``: ``step()`` reports it once,
        finished, and skips the per-step detokenisation and output building (as vLLM's
        ``RequestOutputKind.FINAL_ONLY``); stop strings still detokenise every step.
        ``add_special_tokens=False``: a text prompt gets no BOS (a rendered chat has its own).
        ``priority``: under scheduling_policy "priority", lower is admitted first."""
        self.check_priority(priority)
        rid = request_id or self.next_request_id()
        if rid in self.groups:
            raise ValueError(f"request id {rid!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this engine has no tokenizer: pass token ids")
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens)
        else:
            text, ids = None, list(prompt)
        self.check_prompt(ids, params)
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        children = []
        for i in range(params.n):
            child = Request(f"{rid}#{i}" if params.n > 1 else rid, ids, params, seed=base_seed + i)
            child.guide = self.guide(params)
            child.priority = priority
            children.append(child)
        if params.prompt_logprobs is not None:  # the prompt is the same: one child scores it
            children[0].prompt_logprobs = [None] * len(ids)
        detoks = [
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            if self.tokenizer
            else None
            for _ in children
        ]
        with self._lock:
            self.groups[rid] = _Group(
                rid, text, children, detoks, [""] * len(children), final_only=final_only
            )
            for child in children:
                self.requests[child.request_id] = child
                self.scheduler.add(child)
        return rid

    def check_priority(self, priority: int) -> None:
        """ValueError for a priority this engine cannot honour (vLLM's rule: any but 0 needs
        the priority policy)."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority and self.cfg.scheduling_policy != "priority":
            raise ValueError(f"priority {priority} needs the priority scheduling policy "
                             f"(--scheduling-policy priority); this engine serves fcfs")

    def _check_kv_capacity(self) -> None:
        """As vLLM does: an explicit max_model_len the KV cache cannot hold for one request
        (in either layout) is a start-up error; the model's own default only warns, and longer
        requests are refused (prompt) or stopped with "length"."""
        kv_tokens = self.kv_tokens_per_request
        if self.cfg.max_model_len is not None and self.cfg.max_model_len > kv_tokens:
            self.executor.shutdown()
            raise ConfigError(
                f"max_model_len {self.cfg.max_model_len} is larger than the {kv_tokens} tokens "
                f"the KV cache holds per request; lower max_model_len or give the cache more "
                f"memory (num_kv_blocks, kv_cache_memory, gpu_memory_utilization)"
            )
        if self.cfg.context_len > kv_tokens:
            log.warning(
                "the model's context (%d tokens) exceeds the KV cache's %d tokens per request: "
                "longer prompts are refused and longer generations stop with 'length'",
                self.cfg.context_len,
                kv_tokens,
            )

    def guide(self, params: SamplingParams) -> Guide | None:
        """A new request's guide (guided decoding), or None."""
        if not params.guided:
            return None
        if params.guided_choice is not None:
            return Guide(self.vocabulary(), "choice", params.guided_choice)
        whitespace = 0 if params.guided_compact_json else WHITESPACE_RUN
        if params.guided_json is not None:
            return Guide(self.vocabulary(), "schema", params.guided_json, whitespace)
        if params.guided_regex is not None:
            return Guide(self.vocabulary(), "regex", params.guided_regex)
        return Guide(self.vocabulary(), "json", (), whitespace)

    def vocabulary(self) -> Vocabulary:
        """Every token's bytes and the guided masks computed so far (a pass over the
        vocabulary: the server builds it at start, offline the first guided request does)."""
        if self._vocabulary is None:
            if self.tokenizer is None:
                raise ConfigError("guided decoding needs the checkpoint's tokenizer")
            tokens = token_bytes(self.tokenizer.hf, self.cfg.model.vocab_size)
            self._vocabulary = Vocabulary(tokens, self.scheduler.eos_ids)
        return self._vocabulary

    def check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        """Raise (a ValueError: HTTP 400) for a request this engine cannot take: an empty or
        too long prompt, or token ids outside the vocabulary in the prompt or the params (a
        worker would fail on them)."""
        if not ids:
            raise PromptTooLongError("the prompt is empty")
        vocab = self.cfg.model.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        for name, tokens in (("stop_token_ids", params.stop_token_ids),
                             ("logit_bias", params.logit_bias),
                             ("allowed_token_ids", params.allowed_token_ids)):
            bad = [t for t in tokens or () if not 0 <= t < vocab]
            if bad:
                raise SamplingError(f"{name} must be token ids in [0, {vocab}), got {bad[0]}")
        if params.allowed_token_ids and params.min_tokens:
            stops = set(params.stop_token_ids)
            stops.update(() if params.ignore_eos else self.scheduler.eos_ids)
            if stops.issuperset(params.allowed_token_ids):
                raise SamplingError(
                    "allowed_token_ids holds only stop tokens, which min_tokens forbids"
                )
        limit = self.cfg.context_len
        if len(ids) >= limit:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens; this model's context is {limit} tokens "
                f"and at least one must remain for the output"
            )
        kv_limit = self.kv_tokens_per_request
        if len(ids) + 1 > kv_limit:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the KV cache holds {kv_limit} per request"
            )

    def abort(self, request_id: str) -> None:
        with self._lock:
            group = self.groups.get(request_id)
            if group is None:
                return
            for child in group.children:
                if not child.is_finished:
                    self.scheduler.finish(child, "abort")

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_work() or self._inflight is not None
                or self._pending_update is not None)

    # ------------------------------------------------------------------ weights
    def update_weights(self, source) -> WeightUpdate:
        """Write new weights into every rank in place, now: ``source`` a checkpoint folder of
        the same model, or (Hugging Face name, tensor) pairs or a dict (any subset of the
        model's names). ValueError for another model, a missing, unknown or misshapen tensor:
        the weights then stay. The engine must be idle (offline use between ``generate``
        calls; the server uses ``request_weight_update``). Drops the prefix cache."""
        if self.has_unfinished():
            raise RuntimeError("update_weights needs an idle engine (requests are unfinished); "
                               "a server updates through request_weight_update")
        record = self._update_weights(checked_source(self.cfg.model, source))
        if record.error:
            raise ValueError(record.error)
        return record

    def join_weight_group(self, host: str, port: int, world_size: int, rank_offset: int = 1,
                          timeout_s: float = 300.0) -> None:
        """Every rank joins a trainer's process group (moebius/engine/weight_sync.py): rank
        ``rank_offset + r`` of ``world_size``, the trainer's ``WeightSender`` at rank 0
        hosting the store at host:port. Blocks until all have joined (call it while the
        trainer makes its sender)."""
        self.executor.call("moebius.engine.weight_sync:join", host, port, world_size,
                           rank_offset, timeout_s)

    def request_weight_update(self, source) -> None:
        """Update (``source`` as for ``update_weights``) at the first step boundary where no
        request is running (thread-safe): new and preempted requests wait until then, running
        ones finish under the weights they began with. ValueError for another model's
        checkpoint; the outcome (a ``WeightUpdate``, its ``error`` set if a rank refused the
        source) is appended to ``weight_updates``."""
        source = checked_source(self.cfg.model, source)
        with self._lock:
            if self._pending_update is not None:
                raise ValueError("a weight update is already waiting for the running requests")
            self._pending_update = source
            self.scheduler.paused = True

    def _maybe_update_weights(self) -> None:
        s = self.scheduler
        if s.running or self._inflight is not None or s.transition is not None:
            return  # (overlapped: the step in flight lands in this call, the update next)
        source, self._pending_update = self._pending_update, None
        self._update_weights(source)
        with self._lock:
            s.paused = False

    def _update_weights(self, source) -> WeightUpdate:
        t0 = time.perf_counter()
        results = self.executor.call("update_weights", source)
        errors = [r["error"] for r in results if "error" in r]
        record = WeightUpdate(
            self.weights_version + (not errors), describe(source), self.step_count,
            time.perf_counter() - t0,
            max((r.get("check_seconds", 0.0) for r in results), default=0.0),
            max((r.get("write_seconds", 0.0) for r in results), default=0.0),
            errors[0] if errors else None,
        )
        if not errors:
            self.weights_version = record.version
            with self._lock:
                for mgr in self.scheduler.managers:  # cached KV came from the old weights
                    mgr.forget_cached()
            log.info("weights updated from %s (version %d) in %.2f s", record.source,
                     record.version, record.seconds)
        else:
            log.warning("weight update from %s refused: %s", record.source, errors[0])
        self.weight_updates.append(record)
        return record

    # ------------------------------------------------------------------ switching
    def switch(self, target: str) -> None:
        """Ask for a layout switch at the next step boundary (thread-safe)."""
        if target not in ("tp", "ep"):
            raise ValueError(f"layout must be 'tp' or 'ep', got {target!r}")
        if self.cfg.ranks == 1:
            raise ValueError("a single rank has one layout: switching needs ranks > 1")
        with self._lock:
            self._pending_switch = target

    def snapshot(self) -> EngineSnapshot:
        s = self.scheduler
        return EngineSnapshot(
            step=self.step_count,
            now=time.monotonic(),
            layout=self.layout,
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            running_tokens=sum(r.num_tokens for r in s.running),
            kv_usage=s.kv_usage(),
            remaining_tokens=[
                None
                if r.params.max_tokens is None
                else r.params.max_tokens - len(r.output_token_ids)
                for r in s.running
            ],
            transition=s.transition and (s.transition.target, s.transition.share_done),
        )

    def _maybe_switch(self, land=None) -> list[RequestOutput]:
        """Switch (or move a progressive switch on) when the schedule, ``switch()`` or the
        policy asks; ``land`` first lands a step in flight (overlapped steps) and its outputs
        are returned."""
        target = None
        for step in sorted(k for k in self.switch_schedule if k <= self.step_count):
            target = self.switch_schedule.pop(step)  # overlapped: a step may land past k
        with self._lock:
            if self._pending_switch:
                target, self._pending_switch = self._pending_switch, None
        tr = self.scheduler.transition
        if target is None and self.cfg.ranks > 1 and not isinstance(self.policy, ManualPolicy):
            target = self.policy.decide(self.snapshot())
        moves = tr is not None or (target and target != self.layout and self.cfg.ranks > 1)
        landed = land() if moves and land is not None else []
        if tr is not None:  # a progressive switch in flight: reverse it, or go on
            if target and target != tr.target:
                with self._lock:
                    progressive.reverse(self.scheduler)
                log.info(
                    "progressive switch reversed at step %d: back to %s", self.step_count, tr.target
                )
            self._do_switch(tr.target)
        elif moves:
            self._do_switch(target)
        return landed

    def _do_switch(self, target: str) -> SwitchRecord | None:
        """All layers at once, or (``progressive_layers``) the next few of a progressive
        switch; a progressive switch is recorded once, when its last layer has moved."""
        source = self.layout
        t0 = time.perf_counter()
        k = self.progressive_layers
        with self._lock:
            if k and self.scheduler.transition is None:
                self._progress = {
                    "t0": t0,
                    "step": self.step_count,
                    "results": [],
                    "preempted": len(progressive.begin(self.scheduler, target)),
                    "source": source,
                }
            if k:
                plan = progressive.progress(self.scheduler, k)
                preempted = []
            else:
                plan, preempted = self.scheduler.plan_switch(target)
        results = self.executor.switch(plan)
        if k:
            self._progress["results"] += results
            if self.scheduler.transition is not None:
                return None
            results, t0 = self._progress["results"], self._progress["t0"]
            source, preempted = self._progress["source"], [None] * self._progress["preempted"]
        seconds = time.perf_counter() - t0
        rec = SwitchRecord(
            step=self._progress["step"] if k else self.step_count,
            source=source,
            target=target,
            running=len(plan.moves),
            preempted=len(preempted),
            weight_bytes=sum(r.weight_bytes_sent for r in results),
            kv_bytes=sum(r.kv_bytes_sent for r in results),
            seconds=seconds,
            phases=_critical_phases(results),
        )
        self.switches.append(rec)
        self.policy.observe_switch(rec)
        log.info(
            "switch %s->%s at step %d: %d running (%d preempted), weights %.2f MB + KV %.3f MB "
            "moved in %.1f ms (weights %.1f ms, kv %.1f ms)",
            source,
            target,
            rec.step,
            rec.running,
            rec.preempted,
            rec.weight_bytes / 1e6,
            rec.kv_bytes / 1e6,
            seconds * 1e3,
            rec.phases["weights"] * 1e3,
            rec.phases["kv"] * 1e3,
        )
        return rec

    def expected_switch_weight_bytes(self) -> int:
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
        from moebius.engine.model_runner import resolve_dtype

        size = (
            resolve_dtype(self.cfg).itemsize
            if self.cfg.dtype == "auto"
            else itemsize[self.cfg.dtype]
        )
        return owner_changed_expert_bytes(self.cfg.model, self.cfg.ranks, size)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns outputs of the prompts that progressed. Overlapped
        (``cfg.overlap_steps``): launches step N+1, then reports step N."""
        if self._pending_update is not None:
            self._maybe_update_weights()
        if self._overlap:
            return self._step_overlapped()
        self._maybe_switch()
        with self._lock:
            batch = self.scheduler.schedule()
        if batch.empty:
            return self._collect([])
        t0 = time.perf_counter()
        results = self.executor.step(batch.inputs)
        self.policy.observe_step(self.layout, len(batch.items), time.perf_counter() - t0)
        return self._apply(batch, results)

    def _step_overlapped(self) -> list[RequestOutput]:
        """Schedule and launch the next step before the one in flight has landed: the host's
        scheduling, input building and bookkeeping run while the device computes, and the
        next step's decode inputs are the in-flight step's tokens, read on the device. A
        request that stops on EOS or a stop string has one extra token computed and dropped;
        one stopping by length is never scheduled past it (``Scheduler.launched``)."""
        # a switch lands the step in flight first (the reshard must not race it)
        outs = self._maybe_switch(land=self._land) if self.cfg.ranks > 1 else []
        with self._lock:
            batch = self.scheduler.schedule()
            if not batch.empty:
                self.scheduler.launched(batch)
        t = time.perf_counter()
        if not batch.empty:
            pending = self.executor.launch(batch.inputs)
        outs += self._land()
        if not batch.empty:
            if batch.late:  # guided rows: their masks needed the tokens that just landed
                with self._lock:
                    masks = self.scheduler.late_masks(batch)
                pending = self.executor.masks(pending, masks)
            self._inflight = (batch, pending, t)
        return outs or self._collect([])

    def _land(self) -> list[RequestOutput]:
        """Wait for the step in flight, if any, and apply it; its outputs."""
        if self._inflight is None:
            return []
        (batch, pending, t_launch), self._inflight = self._inflight, None
        results = self.executor.finish(pending)
        now = time.perf_counter()
        # the device time it took: from its launch or the previous landing, the later
        self.policy.observe_step(batch.inputs[0].layout, len(batch.items),
                                 now - max(t_launch, self._last_landing))
        self._last_landing = now
        return self._apply(batch, results)

    def _apply(self, batch, results) -> list[RequestOutput]:
        with self._lock:
            for res in results:
                for rid, scored in (res.prompt_logprobs or {}).items():
                    if (req := self.requests.get(rid)) is not None:
                        req.store_prompt_logprobs(*scored)
        self._on_step_results(batch, results)
        tokens = {t.request_id: t for res in results for t in res.tokens}
        with self._lock:
            updated = self.scheduler.update(batch, tokens)
            self.step_count += 1
            now = time.monotonic()
            for req in updated:
                if req.first_token_time is None:
                    req.first_token_time = now
            return self._collect(updated)

    def _on_step_results(self, batch, results) -> None:
        """Hook for roles (moebius.disagg.roles): sees a step's results while the batch's
        blocks are still intact, before the scheduler applies them. No-op here."""

    def _collect(self, updated: list[Request]) -> list[RequestOutput]:
        touched = {}
        for req in updated:
            gid = req.request_id.split("#")[0]
            group = touched[gid] = self.groups[gid]
            if not group.final_only or req.params.stop or req.is_finished:
                self._detokenize(group, req)
        if self.scheduler.num_finished != self._finished_seen:  # some finished: any unreported
            self._finished_seen = self.scheduler.num_finished  # without a new token (aborts)?
            for gid, group in self.groups.items():
                if gid not in touched and all(c.is_finished for c in group.children):
                    touched[gid] = group
        outs = []
        for gid, group in touched.items():
            if group.reported:
                continue
            if group.final_only and not all(c.is_finished for c in group.children):
                continue
            out = self._output(group)
            outs.append(out)
            if out.finished:
                group.reported = True
                del self.groups[gid]
                for c in group.children:
                    self.requests.pop(c.request_id, None)
        return outs

    def _detokenize(self, group: _Group, req: Request) -> None:
        i = group.children.index(req)
        detok = group.detoks[i]
        if detok is None:
            return
        detok.catch_up(req.output_token_ids)  # one token a step, or all at the end (final_only)
        text = detok.text
        for stop in req.params.stop:
            j = text.find(stop, max(0, len(group.texts[i]) - len(stop) + 1))
            if j < 0:
                continue
            text = text[: j + len(stop)] if req.params.include_stop_str_in_output else text[:j]
            if not req.is_finished:
                self.scheduler.finish(req, "stop", stop)
            req.finish_reason, req.stop_reason = "stop", stop
            break
        group.texts[i] = text

    def _output(self, group: _Group) -> RequestOutput:
        comps = []
        for i, c in enumerate(group.children):
            lps = cum = None
            if c.params.logprobs is not None:
                done = group.logprobs[i]
                new = zip(c.output_logprobs[len(done) :], c.output_token_ids[len(done) :],
                          strict=True)
                for d, t in new:
                    done.append({k: Logprob(v) for k, v in d.items()})
                    group.cum_logprobs[i] += d[t]
                lps = list(done) if c.is_finished else Prefix(done)  # later steps append
                cum = group.cum_logprobs[i] if done else None
            comps.append(
                CompletionOutput(
                    i,
                    group.texts[i],
                    list(c.output_token_ids) if c.is_finished else Prefix(c.output_token_ids),
                    cum,
                    lps,
                    c.finish_reason,
                    c.stop_reason,
                )
            )
        first = group.children[0]
        if group.prompt_logprobs is None and first.prompt_logprobs is not None and not (
                first.needs_prompt_logprobs):
            group.prompt_logprobs = _prompt_logprobs(first)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=comps,
            finished=all(c.is_finished for c in group.children),
            num_cached_tokens=first.num_cached_tokens,
            metrics={
                "arrival_time": first.arrival_time,
                "first_token_time": first.first_token_time,
                "first_scheduled_time": first.first_scheduled_time,
            },
            prompt_logprobs=group.prompt_logprobs,
        )

    def memory_summary(self) -> str:
        """Per-rank memory and the KV capacity of each layout (cluster-wide tokens)."""
        r = self.memory[0]
        n, bs = self.cfg.ranks, self.cfg.block_size

        def size(b: float) -> str:
            return f"{b / 1e9:.3f} GB" if b >= 1e9 else f"{b / 1e6:.2f} MB"

        dense, experts = r["dense_weight_bytes"], r["expert_weight_bytes"]
        staging = r.get("switch_staging_bytes", 0)
        lines = [
            f"memory per rank: dense weights {size(dense)} (whole: attention for EP's "
            f"data parallelism), experts {size(experts)}, KV pool "
            f"{size(r['kv_pool_bytes'])}, switch staging {size(staging)}"
            + (
                ""
                if r.get("workspace_bytes") is None
                else f", workspace {size(r['workspace_bytes'])}"
            ),
            f"KV capacity (tokens, all ranks): TP {r['kv_blocks_tp'] * bs} "
            f"(every rank holds every request), EP {n * r['kv_blocks_ep'] * bs}",
        ]
        if n > 1:
            total = dense + experts + r["kv_pool_bytes"] + staging
            lines.append(
                f"dual-layout overhead: vs static EP {staging / total:.2%} (staging); vs static "
                f"TP {(staging + dense * (n - 1) / n) / total:.2%} (staging + unsharded attention)"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------------ lifecycle
    def stats(self) -> dict:
        s = self.scheduler
        return {
            "layout": self.layout,
            "steps": self.step_count,
            "running": len(s.running),
            "waiting": len(s.waiting),
            "kv_usage": s.kv_usage(),
            "preemptions": s.num_preemptions,
            "prefix_cache_query_tokens": s.num_prefix_queries,
            "prefix_cache_hit_tokens": s.num_prefix_hits,
            "switches": len(self.switches),
            "weights_version": self.weights_version,
        }

    def shutdown(self) -> None:
        self.executor.shutdown()


def _prompt_logprobs(req: Request) -> list[dict[int, Logprob] | None]:
    """vLLM's ``RequestOutput.prompt_logprobs`` of a scored prompt: None for the first token,
    then {the token: its Logprob, each top id: its Logprob}, with ranks."""
    out: list[dict[int, Logprob] | None] = [None]
    for token, (lp, rank, top) in zip(req.prompt_token_ids[1:], req.prompt_logprobs[1:],
                                      strict=True):
        entry = {token: Logprob(lp, rank)}
        for i, (t, v) in enumerate(top.items()):
            entry.setdefault(t, Logprob(v, i + 1))
        out.append(entry)
    return out
