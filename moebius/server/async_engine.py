"""An asyncio front for the synchronous ``LLMEngine``.

One background thread owns the engine loop: it calls ``step()`` while there is work (or an
abort or a switch to apply) and sleeps on a condition otherwise. Each request has an asyncio
queue on the event loop; the engine thread hands outputs over with
``loop.call_soon_threadsafe``. Outputs are cumulative, so a slow consumer skips to the latest
one and loses nothing.

Admission: at most ``max_queue`` requests may wait for their first token (``QueueFullError``);
nothing is admitted while draining or after the engine failed (``EngineUnavailableError``).
Leaving ``generate()`` early (a client disconnect) aborts the request, which frees its KV at
the next step boundary. An engine failure (e.g. ``WorkerError``) fails every in-flight request
with ``EngineDeadError`` and marks the engine unhealthy for good.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

from moebius.core import RequestOutput, SamplingParams

log = logging.getLogger("moebius.server")


class QueueFullError(RuntimeError):
    """Too many requests are waiting for their first token; retry later."""


class EngineUnavailableError(RuntimeError):
    """The server is draining or its engine is gone; retry elsewhere or later."""


class EngineDeadError(EngineUnavailableError):
    """The engine failed (a worker died or raised); in-flight requests cannot finish."""


class AsyncEngine:
    """Runs ``engine`` (an ``LLMEngine``) in a background thread; see the module docstring."""

    def __init__(self, engine, max_queue: int = 1024, metrics=None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.error: str | None = None
        self.draining = False
        self._cond = threading.Condition()
        self._wake = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # touched only on the event loop:
        self._queues: dict[str, asyncio.Queue] = {}
        self._num_queued = 0  # admitted, first output not yet received
        self._idle: asyncio.Event | None = None
        self._switch_waiters: list[tuple[str, asyncio.Future]] = []
        self._num_switches_seen = len(engine.switches)
        self._update_waiter: asyncio.Future | None = None  # the weight update asked, if any
        self._num_updates_seen = len(engine.weight_updates)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="moebius-engine", daemon=True)
        self._thread.start()
        if self.metrics:
            self.metrics.observe_engine(self.engine.stats())

    @property
    def healthy(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return self.error is None and alive

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    async def drain(self, grace_seconds: float) -> bool:
        """Stop admitting; wait up to ``grace_seconds`` for in-flight requests, then abort the
        rest. Returns True when everything finished within the grace period."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
            return True
        except TimeoutError:
            log.warning(
                "drain: aborting %d requests after %.1f s", len(self._queues), grace_seconds
            )
            for rid in list(self._queues):
                self.engine.abort(rid)
            self._notify()
            try:
                await asyncio.wait_for(self._idle.wait(), 10)
            except TimeoutError:
                pass
            return False

    async def shutdown(self) -> None:
        """Stop the engine thread and the engine (its worker processes)."""
        self.draining = True
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 60)
        await asyncio.to_thread(self.engine.shutdown)

    # ------------------------------------------------------------------ requests
    def check_admission(self) -> None:
        """Raise unless a new request may be admitted now."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        if self.draining or self._stop:
            raise EngineUnavailableError("the server is shutting down")
        if self._num_queued >= self.max_queue:
            raise QueueFullError(
                f"the request queue is full ({self.max_queue} requests waiting); retry later"
            )

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Admit one prompt and yield its cumulative outputs until it finishes. Raises
        ``QueueFullError``/``EngineUnavailableError`` before admission, input errors from
        ``add_request``, and ``EngineDeadError`` if the engine fails while it runs."""
        self.check_admission()
        arrival = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue  # before add_request: no output can be missed
        try:
            self.engine.add_request(prompt, params, request_id, priority=priority)
        except BaseException:
            del self._queues[request_id]
            raise
        self._num_queued += 1
        self._idle.clear()
        self._notify()
        finished, waiting_first = False, True
        last_time, num_tokens, first_time, scheduled = None, 0, 0.0, 0.0
        try:
            while True:
                out, step_start = await self._next(queue)
                now = time.monotonic()
                if waiting_first:
                    waiting_first, first_time = False, now
                    self._num_queued -= 1
                    scheduled = out.metrics.get("first_scheduled_time") or step_start
                    if self.metrics:
                        self.metrics.observe_first_token(
                            now - arrival,
                            max(scheduled - arrival, 0.0),
                            len(out.prompt_token_ids),
                        )
                total = sum(len(c.token_ids) for c in out.outputs)
                if self.metrics:
                    gap = None if last_time is None else now - last_time
                    self.metrics.observe_tokens(total - num_tokens, gap)
                last_time, num_tokens = now, total
                if out.finished:
                    finished = True
                    if self.metrics:
                        reasons = [c.finish_reason for c in out.outputs]
                        self.metrics.observe_finish(now - arrival, reasons)
                        self.metrics.observe_request(len(out.prompt_token_ids), total,
                                                     max(first_time - scheduled, 0.0),
                                                     now - first_time)
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if waiting_first:
                self._num_queued -= 1
            if not finished and self.error is None:
                self.engine.abort(request_id)  # frees its KV at the next step boundary
                self._notify()
                if self.metrics:
                    self.metrics.observe_finish(time.monotonic() - arrival, ["abort"])
            if not self._queues:
                self._idle.set()

    @staticmethod
    async def _next(queue: asyncio.Queue) -> tuple[RequestOutput, float]:
        """The newest output in ``queue`` (outputs are cumulative); raise a queued error."""
        item = await queue.get()
        while not queue.empty():
            nxt = queue.get_nowait()
            item = item if isinstance(item, BaseException) else nxt
        if isinstance(item, BaseException):
            raise item
        return item

    async def switch(self, target: str, timeout: float = 120.0):
        """Switch the layout at the next step boundary and wait for it. Returns the
        ``SwitchRecord``, or None when ``target`` is already the layout."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        self.engine.switch(target)  # validates: ValueError for a bad target or one rank
        if self.engine.layout == target:
            return None
        fut = self._loop.create_future()
        self._switch_waiters.append((target, fut))
        self._notify()
        return await asyncio.wait_for(fut, timeout)

    async def update_weights(self, model_dir: str, timeout: float = 600.0):
        """Load new weights of the served model from ``model_dir`` once the running requests
        have finished (new ones wait meanwhile) and return the ``WeightUpdate``; ValueError
        for another model's checkpoint, or one the ranks refused (the weights stay)."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        self.engine.request_weight_update(model_dir)  # ValueError: another model, or one waits
        fut = self._update_waiter = self._loop.create_future()
        self._notify()
        record = await asyncio.wait_for(fut, timeout)
        if record.error:
            raise ValueError(f"the checkpoint at {model_dir!r} was refused: {record.error}")
        return record

    # ------------------------------------------------------------------ engine thread
    def _notify(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._stop or self._wake or engine.has_unfinished()):
                    self._cond.wait()
                if self._stop:
                    return
                self._wake = False
            step_start = time.monotonic()
            try:
                outs = engine.step()
                stats = engine.stats()
            except BaseException as e:  # WorkerError and anything else: the engine is gone
                self.error = f"the engine failed: {type(e).__name__}: {e}"
                log.exception("engine step failed; failing all in-flight requests")
                self._loop.call_soon_threadsafe(self._fail_all)
                return
            if self.metrics:
                for rec in engine.switches[self._num_switches_seen :]:
                    self.metrics.observe_switch(rec)
                self.metrics.observe_engine(stats)
            self._num_switches_seen = len(engine.switches)
            last = engine.switches[-1] if engine.switches else None
            if len(engine.weight_updates) != self._num_updates_seen:
                self._num_updates_seen = len(engine.weight_updates)
                self._loop.call_soon_threadsafe(self._updated, engine.weight_updates[-1])
            self._loop.call_soon_threadsafe(self._dispatch, outs, step_start, stats["layout"], last)
            if not outs:
                time.sleep(0.0005)  # nothing progressed (e.g. a prefill chunk): don't spin hot

    def _dispatch(
        self, outs: list[RequestOutput], step_start: float, layout: str, last_switch
    ) -> None:
        for out in outs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait((out, step_start))
        keep = []
        for target, fut in self._switch_waiters:
            if fut.done():
                continue
            if target == layout:
                fut.set_result(last_switch)
            else:
                keep.append((target, fut))
        self._switch_waiters = keep

    def _updated(self, record) -> None:
        fut, self._update_waiter = self._update_waiter, None
        if fut is not None and not fut.done():
            fut.set_result(record)

    def _fail_all(self) -> None:
        err = EngineDeadError(self.error)
        for queue in self._queues.values():
            queue.put_nowait(err)
        for _, fut in self._switch_waiters:
            if not fut.done():
                fut.set_exception(err)
        self._switch_waiters = []
        if self._update_waiter is not None and not self._update_waiter.done():
            self._update_waiter.set_exception(err)
        self._update_waiter = None
