"""One rank's model runner: owns the weights, the KV pool and the current layout; turns a
``StepInput`` into tensors, runs the decoder, samples; executes switches (``reshard``).

Tensors begin here: the scheduler above speaks only ids and lists.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch

from moebius.config import EngineConfig
from moebius.engine.cuda_graphs import padded_table
from moebius.engine.messages import (
    INFLIGHT,
    LATE_MASK,
    SampledToken,
    SeqWork,
    StepInput,
    StepResult,
    SwitchInput,
)
from moebius.engine.penalty_counts import PenaltyCounts
from moebius.engine.weight_sync import GroupSource, group_plan
from moebius.kv.pool import KVPool
from moebius.model import deepseek, router_fold
from moebius.model.attention import AttentionMeta, PrefillChunk
from moebius.model.decoder import forward
from moebius.model.loader import WeightWriter, load_weights, update_plan
from moebius.model.mla import MLARotary
from moebius.model.ops import Rotary
from moebius.model.sampler import (
    SamplingTensors,
    apply_logit_rules,
    apply_penalties,
    apply_token_masks,
    logprobs_of,
    sample,
    score_tokens,
)
from moebius.parallel.comm import Comm
from moebius.parallel.layout import Layout

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def resolve_dtype(cfg: EngineConfig) -> torch.dtype:
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if cfg.device == "cpu":
        return torch.float32
    return DTYPES.get(cfg.model.torch_dtype, torch.bfloat16)


class PendingStep:
    """A launched step: its sampled tokens (and logprobs, and prompt logprobs) on their way to
    the host. On GPU they are copied into pinned memory right behind the sampling, and
    ``result`` waits on an event recorded there, not on the stream (which by then also holds
    the next step)."""

    def __init__(self, rank: int, work=(), tokens=None, logprobs=None, expert_counts=None,
                 done=None, scored=None) -> None:
        self.rank = rank
        self.work = work  # the sampled sequences, in row order
        self.want = logprobs[0] if logprobs else []  # rows asking logprobs
        self.expert_counts = expert_counts
        self.done = done  # an already finished result (steps that run synchronously)
        self.scored = []  # prompt logprobs: (request id, first position, count), row order
        self.event = None
        named = {"tokens": tokens} if tokens is not None else {}
        if logprobs:
            named.update(zip(("chosen", "top_ids", "top_lp"), logprobs[1:], strict=True))
        if scored:
            self.scored = scored[0]
            named.update(zip(_SCORED, scored[1], strict=True))
        self.host = named
        if named and next(iter(named.values())).is_cuda:
            self.host = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                         .copy_(t, non_blocking=True) for k, t in named.items()}
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> StepResult:
        if self.done is not None:
            return self.done
        if self.event is not None:
            self.event.synchronize()
        host = self.host
        out = [SampledToken(s.request_id, 0) for s in self.work]
        if self.want:
            chosen, top_ids, top_lp = (host[k].tolist() for k in ("chosen", "top_ids", "top_lp"))
            for j, i in enumerate(self.want):
                k = self.work[i].num_logprobs
                out[i].logprob = float(chosen[j])
                out[i].top_logprobs = dict(zip(top_ids[j][:k], top_lp[j][:k], strict=True))
        if "tokens" in host:
            for o, t in zip(out, host["tokens"].tolist(), strict=True):
                o.token_id = t
        return StepResult(self.rank, out, self.expert_counts, self._prompt_logprobs())

    def _prompt_logprobs(self) -> dict | None:
        if not self.scored:
            return None
        cols = [self.host[k].tolist() for k in _SCORED]
        out, row = {}, 0
        for rid, first, count in self.scored:
            out[rid] = (first, *(c[row : row + count] for c in cols))
            row += count
        return out


_SCORED = ("p_chosen", "p_rank", "p_top_ids", "p_top_lp")  # PendingStep's prompt logprobs


class LateStep:
    """A launched step whose guided rows wait for their masks (``LATE_MASK``): its logits are
    computed (queued), ``ModelRunner.sample_late`` samples them once the masks come."""

    def __init__(self, logits, seqs: list[SeqWork], expert_counts=None, scored=None) -> None:
        self.logits, self.seqs, self.expert_counts = logits, seqs, expert_counts
        self.scored = scored


class ModelRunner:
    forward = staticmethod(forward)  # the decoder; DeepSeek replaces it in __init__

    def __init__(self, cfg: EngineConfig, comm: Comm, num_kv_blocks_ep: int) -> None:
        self.cfg = cfg
        self.model = cfg.model
        self.comm = comm
        self.rank = comm.rank
        self.device = torch.device(
            f"cuda:{torch.cuda.current_device()}" if cfg.device == "cuda" else "cpu"
        )
        self.dtype = resolve_dtype(cfg)
        self.layout = Layout(
            cfg.layout if comm.world_size > 1 else "tp", comm.rank, comm.world_size
        )
        self.layer_modes = [self.layout.mode] * cfg.model.num_layers  # differ mid-switch
        self.inflight: deque[PendingStep] = deque()  # launched by a rank process, not finished
        self._tables: dict[str, list[int]] = {}  # request id -> block table, last step's seqs
        self._penalty_counts: PenaltyCounts | None = None  # made at the first penalised row
        self.weight_group = None  # a trainer's group for weight updates (engine/weight_sync.py)
        t0 = time.perf_counter()
        self.weights = load_weights(
            self.model, cfg.model_dir, self.layout, self.dtype, self.device, seed=cfg.seed
        )
        self.load_seconds = time.perf_counter() - t0
        self.kv: KVPool | None = None
        if num_kv_blocks_ep:
            self.allocate_kv(num_kv_blocks_ep)
        self.rotary = Rotary(
            self.model.head_dim, self.model.rope_theta, cfg.context_len + 1, self.device
        )
        if self.model.is_mla:  # the architecture hook: DeepSeek's decoder and rope tables
            self.forward = deepseek.forward
            self.rotary = MLARotary(self.model, cfg.context_len + 1, self.device)

    def allocate_kv(self, num_blocks_ep: int) -> None:
        """Allocate the KV pool once; its address never changes afterwards."""
        assert self.kv is None, "the KV pool is allocated once"
        self.kv = KVPool(
            self.model,
            self.comm.world_size,
            num_blocks_ep,
            self.cfg.block_size,
            self.dtype,
            self.device,
        )
        self.graphs = None
        # Graphs need the pool. The bf16 expert kernels (Triton fused / grouped GEMM) are
        # capturable; the float32 reference loop syncs. MLA decode is capturable through its
        # Triton kernel. Ranks > 1 capture both layouts (the collectives inside the graphs),
        # except EP under the all-to-all exchange, whose sizes cross to the host every layer.
        capturable = self.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
        if self.device.type == "cuda" and not self.cfg.enforce_eager and capturable:
            from moebius.engine.cuda_graphs import MAX_GRAPH_BATCH, DecodeGraphs

            n = self.comm.world_size
            modes = ["tp"] if n == 1 or self.comm.ep_exchange == "alltoall" else ["tp", "ep"]
            self.graphs = DecodeGraphs(self, max_batch=min(self.cfg.max_num_seqs, MAX_GRAPH_BATCH))
            for mode in modes:
                self.graphs.capture(Layout(mode, self.rank, n))

    # ------------------------------------------------------------------ step
    def _reports_here(self) -> bool:
        """Under TP every rank samples the same tokens (identical logits: NCCL's all-reduce
        gives every rank the same bits, the sampler's noise is a function of the request);
        rank 0 reports them, the others keep theirs as the next step's in-flight inputs."""
        return not self.layout.is_tp or self.rank == 0

    def execute(self, step: StepInput) -> StepResult:
        return self.finish(self.launch(step))

    @torch.inference_mode()
    def launch(self, step: StepInput) -> PendingStep:
        """Queue the step on the device and return at once (on GPU: no host sync on the
        decode-graph path); ``finish`` waits for its tokens. A token id ``INFLIGHT`` in a
        sequence's input is the token the previous launch sampled for it, read on the device
        (the engine schedules step N+1 before step N's tokens reach the host)."""
        self._full_tables(step.seqs)
        if step.layer_modes is not None and len(set(step.layer_modes)) > 1:
            assert step.layer_modes == self.layer_modes, "layer modes out of step"
            return PendingStep(self.rank, done=self._execute_mixed(step))
        assert step.layout == self.layout.mode or self.comm.world_size == 1, "layout mismatch"
        bucket = self._graph_bucket(step)
        if bucket:
            ids = self.graphs.stage(self.layout, step.seqs, bucket)
            self._fill_inflight(ids, step.seqs)
            logits = self.graphs.replay(self.layout, bucket, len(step.seqs))
            if not step.seqs:
                return PendingStep(self.rank)
            keep = [i for i, s in enumerate(step.seqs) if s.sample]
            if len(keep) < len(step.seqs):
                logits = logits[self._h2d(keep)]
            return self._sample_or_wait(logits, step.seqs)
        input_ids, positions, meta, sample_rows = self._prepare(step.seqs)
        self._fill_inflight(input_ids, step.seqs)
        t_max = max(step.num_tokens_per_rank) if step.num_tokens_per_rank else len(input_ids)
        expert_ids: list[torch.Tensor] | None = [] if step.record_experts else None
        hidden = self.forward(
            self.weights,
            self.model,
            self.layout,
            self.comm,
            self.rotary,
            self.kv,
            input_ids,
            positions,
            meta,
            t_max,
            expert_ids,
        )
        counts = self._expert_counts(step.seqs, expert_ids) if expert_ids else None
        scored = self._score_prompts(hidden, step.seqs, self._reports_here())
        if not sample_rows:
            return PendingStep(self.rank, expert_counts=counts, scored=scored)
        logits = (hidden[self._h2d(sample_rows)] @ self.weights.lm_head.t()).float()
        return self._sample_or_wait(logits, step.seqs, counts, scored)

    def _sample_or_wait(self, logits, seqs: list[SeqWork], counts=None, scored=None):
        """Sample now, or (a guided row's mask follows) keep the logits for ``sample_late``."""
        if any(s.token_mask == LATE_MASK for s in seqs if s.sample):
            return LateStep(logits, seqs, counts, scored)
        return self._sample(logits, seqs, counts=counts, scored=scored)

    def _score_prompts(self, hidden, seqs: list[SeqWork], report: bool):
        """The prompt logprobs the sequences ask (``SeqWork.prompt_logprobs``) from ``hidden``
        (their flat rows in order), on the rank that reports them: ((request id, first
        position, count) each, ``score_tokens``' tensors), or None."""
        if not report:
            return None
        heads, rows, targets, num_top, start = [], [], [], 0, 0
        for s in seqs:
            if s.prompt_logprobs is not None:
                n, following = s.prompt_logprobs
                heads.append((s.request_id, s.start_pos + 1, len(following)))
                rows += range(start, start + len(following))
                targets += following
                num_top = max(num_top, n)
            start += len(s.token_ids)
        if not heads:
            return None
        return heads, score_tokens(hidden[self._h2d(rows)], self.weights.lm_head,
                                   self._h2d(targets), num_top)

    @torch.inference_mode()
    def sample_late(self, late: LateStep | PendingStep, masks: dict[str, bytes]) -> PendingStep:
        """Sample a ``LateStep`` with its guided rows' masks (request id -> packed mask; a
        row without one, a request that finished meanwhile, samples unmasked and is
        dropped). The device queues the sampling behind the step's forward: the host
        computed the masks while that ran. Under EP a rank whose rows have no guide sampled
        at launch: its PendingStep comes back as it is."""
        if not isinstance(late, LateStep):
            return late
        for s in late.seqs:
            if s.token_mask == LATE_MASK:
                s.token_mask = masks.get(s.request_id)
        return self._sample(late.logits, late.seqs, counts=late.expert_counts,
                            scored=late.scored)

    def _full_tables(self, seqs: list[SeqWork]) -> None:
        """Complete each sequence's block table in place: one that carries only the blocks
        appended since the step before (``blocks_from`` > 0) gets the first ``blocks_from``
        from this rank's copy of that step's table. Keeps this step's tables for the next."""
        tables = {}
        for s in seqs:
            if s.blocks_from:
                held = self._tables.get(s.request_id)
                if held is None or len(held) != s.blocks_from:
                    raise RuntimeError(
                        f"rank {self.rank}: {s.request_id} sent {s.blocks_from} blocks as known, "
                        f"this rank holds {None if held is None else len(held)}"
                    )
                held += s.block_ids
                s.block_ids, s.blocks_from = held, 0
            tables[s.request_id] = s.block_ids
        self._tables = tables

    def finish(self, pending: PendingStep) -> StepResult:
        """Wait for a launched step's tokens and bring them to the host."""
        return pending.result()

    def _h2d(self, data: list, dtype=torch.long) -> torch.Tensor:
        """A host list on this device without a stream sync (pinned staging on GPU)."""
        if self.device.type == "cpu":
            return torch.tensor(data, dtype=dtype)
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

    def _fill_inflight(self, input_ids: torch.Tensor, seqs: list[SeqWork]) -> None:
        """Write into the flat ``input_ids`` of ``seqs``, on the device, the token the last
        launch sampled for each ``INFLIGHT`` input (no wait on that launch)."""
        dst, rids, start = [], [], 0
        for s in seqs:
            if s.token_ids[-1] == INFLIGHT:
                dst.append(start + len(s.token_ids) - 1)
                rids.append(s.request_id)
            start += len(s.token_ids)
        self._copy_inflight(input_ids, dst, rids)

    def _copy_inflight(self, out: torch.Tensor, positions: list[int], rids: list[str]) -> None:
        """Write at ``positions`` of the flat ``out`` the tokens the last launch sampled for
        requests ``rids``, on the device (no wait on that launch)."""
        if positions:
            src = [self._last_rows[r] for r in rids]
            out.index_copy_(0, self._h2d(positions), self._last_tokens[self._h2d(src)])

    def _graph_bucket(self, step: StepInput) -> int:
        """The captured batch size this step replays, or 0 to run eagerly. Every rank derives
        it from what all ranks were told (the per-rank counts, decode-only), so all replay the
        same graph and their collectives match; a rank without sequences replays pad rows.
        (Decode-only: one token a sequence, so the largest count is the largest batch.)"""
        if self.graphs is None or step.record_experts or not step.decode_only:
            return 0
        return self.graphs.bucket(self.layout, max(step.num_tokens_per_rank))

    def _execute_mixed(self, step: StepInput) -> StepResult:
        """A step during a progressive switch: every rank has the whole batch for its TP layers
        and its own sequences for its EP layers (see ``decoder.forward_mixed``)."""
        from moebius.model.decoder import forward_mixed

        rank, seqs = self.rank, step.seqs
        primary_is_tp = step.layout == "tp"
        tp_table = (lambda s: s.block_ids) if primary_is_tp else (lambda s: s.alt_block_ids)
        ep_table = (lambda s: s.alt_block_ids) if primary_is_tp else (lambda s: s.block_ids)
        own = [s for s in seqs if s.owner == rank]
        ids_tp, pos_tp, meta_tp, rows_tp = self._prepare(seqs, tp_table)
        ids_ep, pos_ep, meta_ep, rows_ep = self._prepare(own, ep_table)
        t_max = max(step.num_tokens_per_rank)
        own_rows, gather, seen = [], [], [0] * self.comm.world_size
        start = 0
        for s in seqs:
            n = len(s.token_ids)
            if s.owner == rank:
                own_rows += range(start, start + n)
            gather += range(s.owner * t_max + seen[s.owner], s.owner * t_max + seen[s.owner] + n)
            seen[s.owner] += n
            start += n
        dev = self.device
        tp = {
            "ids": ids_tp,
            "positions": pos_tp,
            "meta": meta_tp,
            "own_rows": torch.tensor(own_rows, dtype=torch.long, device=dev),
        }
        ep = {
            "ids": ids_ep,
            "positions": pos_ep,
            "meta": meta_ep,
            "t_max": t_max,
            "gather": torch.tensor(gather, dtype=torch.long, device=dev),
        }
        hidden, rep = forward_mixed(
            self.weights, self.model, step.layer_modes, self.comm, self.rotary, self.kv, tp, ep
        )
        sampled = seqs if rep == "tp" else own
        rows = rows_tp if rep == "tp" else rows_ep
        report = rep != "tp" or rank == 0
        scored = self._score_prompts(hidden, sampled, report)
        if not report or not rows:
            return PendingStep(rank, scored=scored).result()
        logits = (hidden[torch.tensor(rows, device=dev)] @ self.weights.lm_head.t()).float()
        return self._sample(logits, sampled, report=True, scored=scored).result()

    def _expert_counts(self, seqs: list[SeqWork], expert_ids: list[torch.Tensor]) -> dict | None:
        """request_id -> (B, num_moe_layers, E) int64 numpy counts of this step's top-k picks,
        split at KV-block boundaries: row j counts the tokens of block start_pos // block_size
        + j (so the prefix cache can keep each block's counts). Under TP every rank routes
        every token: rank 0 alone reports."""
        if not self._reports_here():
            return None
        ids = torch.stack(expert_ids).cpu()  # (num_moe_layers, T, k)
        num_layers, num_experts = ids.shape[0], self.model.num_experts
        bs = self.cfg.block_size
        layer = torch.arange(num_layers)[:, None, None]
        out, start = {}, 0
        for s in seqs:
            n = len(s.token_ids)
            part = ids[:, start : start + n]  # (num_moe_layers, n, k)
            block = torch.arange(s.start_pos, s.start_pos + n) // bs - s.start_pos // bs
            num_blocks = int(block[-1]) + 1
            flat = (block[None, :, None] * num_layers + layer) * num_experts + part
            counts = torch.bincount(flat.flatten(), minlength=num_blocks * num_layers * num_experts)
            out[s.request_id] = counts.view(num_blocks, num_layers, num_experts).numpy()
            start += n
        return out

    def _prepare(self, seqs: list[SeqWork], table=lambda s: s.block_ids):
        """Flat inputs and attention metadata of ``seqs``, reading each one's block table
        through ``table`` (the primary view's, or the other one during a progressive switch)."""
        bs = self.cfg.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        dec_idx, dec_tables, dec_lens = [], [], []
        prefills: list[PrefillChunk] = []
        sample_rows: list[int] = []
        for s in seqs:
            start = len(ids)
            n = len(s.token_ids)
            ids += s.token_ids
            p = range(s.start_pos, s.start_pos + n)
            pos += p
            blocks = table(s)
            slots += [blocks[i // bs] * bs + i % bs for i in p]
            nb = (s.start_pos + n + bs - 1) // bs
            if n == 1:
                dec_idx.append(start)
                dec_tables.append(blocks[:nb])
                dec_lens.append(s.start_pos + 1)
            else:
                t = torch.tensor(blocks[:nb], dtype=torch.long, device=self.device)
                prefills.append(PrefillChunk(start, n, s.start_pos, t))
            if s.sample:
                sample_rows.append(start + n - 1)
        width = max((len(t) for t in dec_tables), default=0)
        dev = self.device
        meta = AttentionMeta(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            decode_token_idx=torch.tensor(dec_idx, dtype=torch.long, device=dev),
            decode_block_tables=padded_table(dec_tables, width, 0, pinned=False).to(dev),
            decode_ctx_lens=torch.tensor(dec_lens, dtype=torch.long, device=dev),
            prefills=prefills,
            decode_max_context=max(dec_lens, default=0),
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        return input_ids, positions, meta, sample_rows

    def _sample(self, logits, seqs: list[SeqWork], report: bool | None = None, counts=None,
                scored=None) -> PendingStep:
        """Sample one token for each sequence with ``sample`` set (logits (n_sample, V)) on the
        device; the tokens stay there as the next launch's ``INFLIGHT`` inputs.

        The logits change in place, in vLLM v1's order (v1/sample/sampler.py): a guided
        request's mask and allowed_token_ids (the others -inf), min_tokens' bans of stop tokens
        and logit_bias (these commute: a bias is finite), then the penalties (repetition, then
        presence and frequency); then ``sample`` divides by the temperature and filters
        (top-k/p, min-p), eager or fused (Triton on CUDA), greedy rows taking the argmax of the
        same logits. Logprobs are of the logits after the penalties, before the temperature
        (vLLM returns the raw model output's by default): a masked token's is -inf."""
        work = [s for s in seqs if s.sample]
        self._apply_masks(logits, work)
        self._apply_rules(logits, work)
        for i, s in enumerate(work):
            if s.banned_token_ids:
                logits[i].index_fill_(0, self._h2d(s.banned_token_ids), float("-inf"))
        self._penalize(logits, work)
        all_greedy = all(s.temperature == 0 for s in work)
        st = SamplingTensors(
            temperature=self._h2d([s.temperature for s in work], torch.float32),
            top_k=self._h2d([s.top_k for s in work]),
            top_p=self._h2d([s.top_p for s in work], torch.float32),
            min_p=self._h2d([s.min_p for s in work], torch.float32),
            seeds=self._h2d([s.seed for s in work]),
            steps=self._h2d([s.output_index for s in work]),
            need_filter=any(s.top_k > 0 or s.top_p < 1 or s.min_p > 0 for s in work),
            all_greedy=all_greedy,
        ) if not all_greedy else SamplingTensors(*(None,) * 6, False, True)
        tokens = sample(logits, st)
        self._last_tokens = tokens
        self._last_rows = {s.request_id: i for i, s in enumerate(work)}
        want = [i for i, s in enumerate(work) if s.num_logprobs >= 0]
        lps = None
        if want:
            n = max(work[i].num_logprobs for i in want)
            rows_t = self._h2d(want)
            lps = (want, *logprobs_of(logits[rows_t], tokens[rows_t], n))
        if not (self._reports_here() if report is None else report):
            return PendingStep(self.rank, expert_counts=counts)
        return PendingStep(self.rank, work, tokens, lps, counts, scored=scored)

    def _apply_masks(self, logits, work: list[SeqWork]) -> None:
        """Guided rows: every token their packed mask leaves out becomes -inf."""
        rows = [i for i, s in enumerate(work) if s.token_mask is not None]
        if not rows:
            return
        packed = np.frombuffer(b"".join(work[i].token_mask for i in rows), dtype=np.uint8)
        packed = torch.from_numpy(packed.reshape(len(rows), -1).copy())
        if self.device.type != "cpu":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        apply_token_masks(logits, self._h2d(rows), packed)

    def _apply_rules(self, logits, work: list[SeqWork]) -> None:
        """allowed_token_ids and logit_bias of the rows that set them (``logit_rules``)."""
        allowed_rows, allowed_at, allowed_ids, bias_rows, bias_ids, bias = [], [], [], [], [], []
        for i, s in enumerate(work):
            if s.logit_rules is None:
                continue
            allowed, lb = s.logit_rules
            if allowed:
                allowed_at.extend([len(allowed_rows)] * len(allowed))
                allowed_rows.append(i)
                allowed_ids.extend(allowed)
            if lb:
                bias_rows.extend([i] * len(lb))
                bias_ids.extend(lb)
                bias.extend(lb.values())
        if not (allowed_rows or bias_rows):
            return
        h2d, none = self._h2d, (None, None, None)
        a = (h2d(allowed_rows), h2d(allowed_at), h2d(allowed_ids)) if allowed_rows else none
        b = (h2d(bias_rows), h2d(bias_ids), h2d(bias, logits.dtype)) if bias_rows else none
        apply_logit_rules(logits, *a, *b)

    def _penalize(self, logits, work: list[SeqWork]) -> None:
        """Repetition, presence and frequency penalties of the rows that set them, over the
        outputs counted on this device (``PenaltyCounts``: each output sent once) plus, once
        there is one, the newest: this step's last input token, read on the device where it
        is still in flight (as ``_copy_inflight``)."""
        rows = [i for i, s in enumerate(work) if s.penalties is not None]
        if not rows:
            if self._penalty_counts is not None:
                self._penalty_counts.forget()
            return
        if self._penalty_counts is None:
            self._penalty_counts = PenaltyCounts(logits.shape[1], self.device)
        V = logits.shape[1]
        newest, dst, rids = [], [], []
        for j, i in enumerate(rows):
            s = work[i]
            last = s.token_ids[-1] if s.output_index > 0 else V  # no output yet: nothing
            if last == INFLIGHT:
                dst.append(j)
                rids.append(s.request_id)
                last = V
            newest.append(last)
        slots = self._penalty_counts.update([work[i].request_id for i in rows],
                                            [work[i].penalties[3:] for i in rows], self._h2d)
        newest_t = self._h2d(newest)
        self._copy_inflight(newest_t, dst, rids)
        counts = self._penalty_counts.counts[slots]
        counts.scatter_add_(1, newest_t[:, None], torch.ones(len(rows), 1, device=self.device))
        repeats = any(work[i].penalties[2] != 1 for i in rows)
        apply_penalties(
            logits,
            self._h2d(rows),
            self._h2d([work[i].penalties[0] for i in rows], logits.dtype),
            self._h2d([work[i].penalties[1] for i in rows], logits.dtype),
            self._h2d([work[i].penalties[2] for i in rows], logits.dtype),
            counts[:, :V].to(logits.dtype),
            self._penalty_counts.in_prompt[slots][:, :V] if repeats else None,
        )

    # ------------------------------------------------------------------ disaggregation
    def _token_slots(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        bs = self.cfg.block_size
        pos = torch.arange(num_tokens)
        table = torch.tensor(block_ids, dtype=torch.long)
        return (table[pos // bs] * bs + pos % bs).to(self.device)

    def _holds(self, owner: int) -> bool:
        return self.layout.is_tp or self.comm.world_size == 1 or owner == self.rank

    def export_kv(self, owner: int, block_ids: list[int], num_tokens: int):
        """This rank's part of one request's KV, or None where it holds none (EP, not the
        owner): (first KV head, (L, P, T, kvh_local, d)). On CPU when ranks > 1 (it crosses a
        pipe), on this rank's device otherwise."""
        if not self._holds(owner):
            return None
        slots = self._token_slots(block_ids, num_tokens)
        layers = []
        for layer in range(self.model.num_layers):
            planes = self.kv.view(layer, self.layout)
            layers.append(torch.stack([p.flatten(0, 1)[slots] for p in planes]))
        kv = torch.stack(layers)
        kv = kv.cpu() if self.comm.world_size > 1 else kv
        return self.layout.kv_heads(self.model).start, kv

    def import_kv(self, owner: int, block_ids: list[int], kv: torch.Tensor) -> None:
        """Write one request's KV (L, P, T, all KV heads, d) into ``block_ids`` (this rank's
        head slice under TP; only on the owner under EP)."""
        if not self._holds(owner):
            return
        heads = self.layout.kv_heads(self.model)
        slots = self._token_slots(block_ids, kv.shape[2])
        kv = kv[:, :, :, heads.start : heads.stop].to(self.device, self.dtype)
        for layer in range(self.model.num_layers):
            for p, plane in enumerate(self.kv.view(layer, self.layout)):
                plane.flatten(0, 1).index_copy_(0, slots, kv[layer, p])

    # ------------------------------------------------------------------ switch
    def reshard(self, switch: SwitchInput):
        """Move all layers (or ``switch.layers``, a progressive switch) into the target."""
        from moebius.parallel.reshard import execute_switch

        result = execute_switch(self, switch)
        if all(m == switch.target for m in self.layer_modes):
            self.layout = Layout(switch.target, self.rank, self.comm.world_size)
        return result

    @torch.inference_mode()
    def update_weights(self, source) -> dict:
        """Write new weights into this rank's tensors in place, for the current layout, every
        address kept (CUDA graphs replay the new values): ``source`` a checkpoint folder of the
        same model, or (Hugging Face name, tensor) pairs (any subset). Every name and shape is
        checked first (``update_plan``), so a bad source changes nothing and answers
        ``{"error": ...}``; the engine goes on. Then tensor by tensor: no second copy of the
        weights anywhere."""
        assert len(set(self.layer_modes)) == 1, "weights are updated between switches"
        t0 = time.perf_counter()
        writer = WeightWriter(self.model, self.layout, self.weights)
        try:
            plan = (group_plan(writer, self.weight_group, source.specs, self.device)
                    if isinstance(source, GroupSource) else update_plan(writer, source))
        except Exception as e:  # noqa: BLE001 - nothing was written yet: refuse, keep serving
            return {"error": f"{type(e).__name__}: {e}"}
        t1 = time.perf_counter()
        for name, get in plan:
            writer.assign(name, get())
        for lw in self.weights.layers:
            router_fold.refresh(lw)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"check_seconds": t1 - t0, "write_seconds": time.perf_counter() - t1,
                "tensors": len(plan)}

    def weights_digest(self) -> str:
        """A hash of the expert buffers' bytes and a few dense tensors' (tests: switches must
        restore the experts exactly; a weight update must give a fresh load's bytes)."""
        import hashlib

        h = hashlib.sha256()
        w = self.weights
        dense = [w.embed, w.lm_head] + [lw.qkv_proj if lw.qkv_proj is not None else lw.o_proj
                                        for lw in w.layers]
        for t in (w.experts.w13, w.experts.w2, *dense):
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def buffer_addresses(self) -> tuple[int, int, int]:
        """Addresses of the expert buffers and the KV pool: fixed for the engine's life."""
        e = self.weights.experts
        return e.w13.data_ptr(), e.w2.data_ptr(), self.kv.buf.data_ptr()

    def memory_report(self) -> dict:
        """Per-rank memory: weights, KV pool, switch staging, workspace (CUDA), capacities."""
        workspace = None
        if self.device.type == "cuda":
            fixed = self.weights.dense_nbytes() + self.weights.experts.nbytes() + self.kv.nbytes()
            workspace = torch.cuda.max_memory_allocated(self.device) - fixed
        return {
            "rank": self.rank,
            "dense_weight_bytes": self.weights.dense_nbytes(),
            "expert_weight_bytes": self.weights.experts.nbytes(),
            "switch_staging_bytes": self.weights.experts.staging_nbytes(),
            "kv_pool_bytes": self.kv.nbytes(),
            "workspace_bytes": workspace,
            "kv_blocks_tp": self.kv.num_blocks(Layout("tp", self.rank, self.comm.world_size)),
            "kv_blocks_ep": self.kv.num_blocks(Layout("ep", self.rank, self.comm.world_size)),
            "load_seconds": self.load_seconds,
            "graph_capture_seconds": self.graphs.capture_seconds if self.graphs else 0.0,
            "graph_buckets": self.graphs.buckets if self.graphs else [],
        }
