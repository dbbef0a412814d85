"""Turns OpenAI requests into engine requests and engine outputs into OpenAI responses: whole
JSON bodies, or server-sent-event chunks ending with ``data: [DONE]``.

A request with several prompts (completions) becomes one engine request per prompt; their
outputs are merged as they come. Choice ``i * n + j`` is completion ``j`` of prompt ``i``.
While streaming, text that could still turn out to be the start of a stop string is held back,
so a streamed text always equals the non-streamed one. Completions' ``echo`` puts each prompt
(and, with logprobs, the prompt's logprobs) before its completions (docs/server.md).

Tool calls (chat requests with tools, on a server with a tool-call parser): a choice whose text
holds calls answers ``message.tool_calls`` and ``finish_reason: "tool_calls"``; streamed, its
content stops at the first call's start tag and the calls follow as ``delta.tool_calls``
chunks once it finishes (moebius/server/tool_parsers.py). tool_choice "required" or a named
function needs no parser: the calls are forced and read as moebius/server/tool_choice.py says.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from moebius.core import RequestOutput, SamplingParams
from moebius.server import protocol as P
from moebius.server.async_engine import AsyncEngine
from moebius.server.reasoning import ReasoningParser
from moebius.server.reasoning import make as make_reasoning
from moebius.server.tool_choice import ForcedCalls, ForcedStream
from moebius.server.tool_parsers import ParsedOutput, ToolCallConfig, ToolCallStream, ToolParser


@dataclass
class Job:
    """A validated request, ready to run."""

    kind: str  # "completion" or "chat"
    id: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    num_logprobs: int | None = None
    token_ids_as_tokens: bool = False
    include_usage: bool = False
    # vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries
    # the usage so far, ``usage_now``
    continuous_usage: bool = False
    usage_now: P.Usage | None = None
    # vLLM's return_token_ids: the prompt's and the output's ids beside the text (streamed:
    # the prompt's in each choice's first chunk, the new ids in every chunk)
    return_token_ids: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    tool_parser: ToolParser | None = None  # chat with tools: find calls in the output
    parallel_tool_calls: bool = True
    reasoning: ReasoningParser | None = None  # chat on a --reasoning-parser server
    # completions' echo: each prompt's text goes before its completions (``echo_only``:
    # max_tokens 0, the prompt alone), with its logprobs where logprobs are asked
    echo: list[str] | None = None
    echo_only: bool = False
    prompt_logprobs: bool = False  # asked by name: the response's prompt_logprobs field
    priority: int = 0

    def parse_tools(self, text: str) -> ParsedOutput:
        parsed = self.tool_parser.parse(text)
        if not self.parallel_tool_calls and len(parsed.tool_calls) > 1:
            return ParsedOutput(parsed.content, parsed.tool_calls[:1])
        return parsed


class Responder:
    def __init__(
        self, aengine: AsyncEngine, model_name: str, tool_calls: ToolCallConfig | None = None
    ) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.tokenizer = aengine.engine.tokenizer
        self.model_name = model_name
        self.tool_calls = tool_calls or ToolCallConfig()
        self.tool_parser = self.tool_calls.make_parser()
        self.reasoning = make_reasoning(self.tool_calls.reasoning_parser)

    # ---------------------------------------------------------------- requests
    def prepare_completion(self, req: P.CompletionRequest) -> Job:
        if req.suffix:
            raise ValueError("suffix is not supported")
        if req.best_of is not None and req.best_of != req.n:
            raise ValueError("best_of must equal n (best-of sampling is not supported)")
        echo_only = req.max_tokens == 0
        if echo_only and not req.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo: the prompt "
                             "alone)")
        raw = req.prompts()
        prompts = [self.encode_prompt(p) for p in raw]
        job = self._job("completion", P.random_id("cmpl"), req, prompts,
                        1 if echo_only else req.max_tokens, req.logprobs)
        if req.echo:  # a text prompt as sent; token ids as they decode, as vLLM echoes them
            job.echo = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in raw]
            job.echo_only = echo_only
        return job

    def prepare_chat(self, req: P.ChatCompletionRequest) -> Job:
        parser = self._tool_parser(req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        job = self._job(
            "chat",
            P.random_id("chatcmpl"),
            req,
            [self.chat_prompt(req)],
            max_tokens,
            req.num_logprobs(),
        )
        job.tool_parser, job.parallel_tool_calls = parser, req.parallel_tool_calls
        if not any(p.guided for p in job.params):  # a guided output has no reasoning block
            job.reasoning = self.reasoning
        return job

    def _tool_parser(self, req: P.ChatCompletionRequest) -> ToolParser | None:
        """The parser for this request's output (None: no tools, or tool_choice "none");
        ValueError (a 400) for a tool_choice this server cannot serve, as vLLM answers."""
        mode = req.tool_mode()
        if mode == "none":
            return None
        if mode == "auto" and not self.tool_calls.enable_auto_tool_choice:
            raise ValueError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set"
            )
        if mode == "auto":
            return self.tool_parser
        # required / named: forced by the schema the request's sampling parameters carry
        return ForcedCalls(req.tool_choice.function.name if mode == "named" else None)

    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """A completion prompt's ids (a string gets the tokenizer's BOS, if it adds one, as
        vLLM's does); /v1/completions' and /tokenize's one path."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return list(prompt)

    def chat_prompt(self, req: P.ChatTemplateFields, add_special_tokens: bool = False) -> list[int]:
        """A conversation's prompt ids: /v1/chat/completions' and /tokenize's one path. Without
        ``add_special_tokens`` (chat requests never set it) no BOS is added: the template
        writes its own."""
        text = self.tokenizer.apply_chat_template(
            req.rendered_messages(),
            req.add_generation_prompt,
            req.chat_template_kwargs,
            req.template_tools(),
            req.continue_final_message,
        )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _job(self, kind, rid, req, prompts, max_tokens, num_logprobs) -> Job:
        self.engine.check_priority(req.priority)
        context = self.engine.cfg.context_len
        params = []
        for ids in prompts:
            limit = max_tokens if max_tokens is not None else max(context - len(ids), 1)
            sp = req.sampling_params(limit, num_logprobs)
            self.engine.check_prompt(ids, sp)
            if len(ids) + limit > context:
                raise ValueError(
                    f"This model's maximum context length is {context} tokens. However, you "
                    f"requested {len(ids) + limit} tokens ({len(ids)} in the prompt, {limit} "
                    f"for the completion). Please reduce the prompt or max_tokens."
                )
            params.append(sp)
        opts = req.stream_options
        return Job(
            kind,
            rid,
            prompts,
            params,
            num_logprobs,
            req.return_tokens_as_token_ids,
            bool(req.stream and opts and opts.include_usage),
            prompt_logprobs=req.prompt_logprobs is not None,
            priority=req.priority,
            continuous_usage=bool(req.stream and opts and opts.include_usage
                                  and opts.continuous_usage_stats),
            return_token_ids=bool(req.return_token_ids),
        )

    # ---------------------------------------------------------------- running
    async def _run(self, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as they come, for every prompt of ``job``."""
        gens = [
            self.aengine.generate(ids, sp, f"{job.id}-{i}", job.priority)
            for i, (ids, sp) in enumerate(zip(job.prompts, job.params, strict=True))
        ]
        if len(gens) == 1:
            async with aclosing(gens[0]) as gen:
                async for out in gen:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, gen):
            try:
                async for out in gen:
                    queue.put_nowait((i, out))
            except Exception as e:
                queue.put_nowait((i, e))
            queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        try:
            live = len(tasks)
            while live:
                i, item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, job: Job) -> dict:
        finals: dict[int, RequestOutput] = {}
        async with aclosing(self._run(job)) as outs:
            async for i, out in outs:
                if out.finished:
                    finals[i] = out
        choices = []
        for i in sorted(finals):
            for c in finals[i].outputs:
                index = i * job.params[i].n + c.index
                lps = self._logprobs(job, c.token_ids, c.logprobs, 0, c.text)
                if job.kind == "chat":
                    text, reasoning = c.text, None
                    if job.reasoning is not None:
                        reasoning, text = job.reasoning.split(c.text)
                    content = text if text or reasoning is None else None
                    message = P.AssistantMessage(content=content, reasoning_content=reasoning)
                    finish = c.finish_reason
                    parsed = job.parse_tools(text) if job.tool_parser else None
                    if parsed and parsed.tool_calls:
                        calls = [P.MessageToolCall(**t.to_openai()) for t in parsed.tool_calls]
                        message = P.AssistantMessage(content=parsed.content, tool_calls=calls,
                                                     reasoning_content=reasoning)
                        finish = job.tool_parser.finish_reason or finish
                    choices.append(
                        P.ChatChoice(
                            index=index,
                            message=message,
                            logprobs=lps,
                            finish_reason=finish,
                            stop_reason=c.stop_reason,
                            token_ids=list(c.token_ids) if job.return_token_ids else None,
                        )
                    )
                else:
                    text, finish = c.text, c.finish_reason
                    if job.echo is not None:
                        text, lps, finish = self._echoed(job, i, finals[i], c)
                    choices.append(
                        P.CompletionChoice(
                            index=index,
                            text=text,
                            logprobs=lps,
                            finish_reason=finish,
                            stop_reason=c.stop_reason,
                            prompt_logprobs=self._prompt_logprobs(job, finals[i]),
                            **(dict(prompt_token_ids=job.prompts[i], token_ids=[] if
                                    job.echo_only else list(c.token_ids))
                               if job.return_token_ids else {}),
                        )
                    )
        cls = P.ChatCompletionResponse if job.kind == "chat" else P.CompletionResponse
        resp = cls(
            id=job.id,
            created=job.created,
            model=self.model_name,
            choices=choices,
            usage=self._usage(job, finals),
        )
        if job.kind == "chat":
            resp.prompt_logprobs = self._prompt_logprobs(job, finals[0])
            if job.return_token_ids:
                resp.prompt_token_ids = job.prompts[0]
        return resp.model_dump()

    def _echoed(self, job: Job, i: int, out: RequestOutput, c):
        """A completion choice under echo: (its text, logprobs and finish reason), the
        prompt's first; with max_tokens 0 the prompt's alone (the one token the engine
        sampled to score it is dropped)."""
        ids, lps, text = list(c.token_ids), c.logprobs, c.text
        if job.echo_only:
            ids, lps, text = [], [], ""
        if job.num_logprobs is not None:
            ids, lps = out.prompt_token_ids + ids, list(out.prompt_logprobs) + list(lps)
        text = job.echo[i] + text
        finish = "length" if job.echo_only else c.finish_reason
        return text, self._logprobs(job, ids, lps, 0, text), finish

    def _echo_chunk(self, job: Job, i: int, out: RequestOutput, index: int) -> str:
        """A streamed completion's first chunk under echo: the prompt's text, and its
        logprobs where logprobs are asked (the prompt is scored by the first output)."""
        lps = None
        if job.num_logprobs is not None:
            lps = self._logprobs(job, out.prompt_token_ids, out.prompt_logprobs, 0, job.echo[i])
        return self._chunk(job, index, job.echo[i], lps)

    def _prompt_logprobs(self, job: Job, out: RequestOutput) -> P.PromptLogprobs | None:
        if not job.prompt_logprobs or out.prompt_logprobs is None:
            return None
        return [None if d is None else {
            t: P.PromptLogprob(logprob=_json_logprob(v.logprob), rank=v.rank,
                               decoded_token=self._token(job, t)) for t, v in d.items()
        } for d in out.prompt_logprobs]

    async def stream(self, job: Job) -> AsyncIterator[str]:
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        finals: dict[int, RequestOutput] = {}
        closed: set[int] = set()
        tool_streams: dict[int, ToolCallStream] = {}
        forced: dict[int, ForcedStream] = {}
        sent_reasoning: dict[int, int] = {}
        echoed: set[int] = set()
        latest: dict[int, RequestOutput] = {}  # continuous usage: each prompt's newest output
        try:
            async with aclosing(self._run(job)) as outs:
                async for i, out in outs:
                    if job.continuous_usage:
                        latest[i] = out
                        job.usage_now = self._usage(job, latest)
                    hold = max((len(s) for s in job.params[i].stop), default=1) - 1
                    for c in out.outputs:
                        index = i * job.params[i].n + c.index
                        if index in closed:
                            continue
                        if index not in sent_text:
                            prompt_ids = job.prompts[i] if job.return_token_ids else None
                            if job.kind == "chat":
                                yield self._chunk(job, index, {"role": "assistant",
                                                               "content": ""},
                                                  prompt_ids=prompt_ids)
                            elif prompt_ids is not None:
                                yield self._chunk(job, index, "", prompt_ids=prompt_ids)
                            sent_text[index] = 0
                        done = c.finish_reason is not None
                        if done:
                            closed.add(index)
                        if job.echo is not None:
                            if index not in echoed:  # the prompt (and its logprobs) first
                                echoed.add(index)
                                yield self._echo_chunk(job, i, out, index)
                            if job.echo_only:
                                if done:
                                    yield self._chunk(job, index, "", None, "length")
                                continue
                        safe = len(c.text) if done else max(len(c.text) - hold, 0)
                        if isinstance(job.tool_parser, ForcedCalls):  # calls, never content
                            async for chunk in self._forced_chunks(
                                    job, index, c, safe, forced, sent_tokens):
                                yield chunk
                            continue
                        base, said = 0, False  # where the content begins (after reasoning)
                        if job.reasoning is not None:
                            r0, r1, base = job.reasoning.split_at(c.text[:safe], done)
                            r_from = max(sent_reasoning.get(index, 0), r0)
                            if r1 > r_from:
                                reasoning = {"reasoning_content": c.text[r_from:r1]}
                                yield self._chunk(job, index, reasoning)
                                sent_reasoning[index], said = r1, True
                            if base is None:  # still reasoning: no content yet
                                safe = sent_text[index]
                            else:
                                sent_text[index] = max(sent_text[index], base)
                        calls = None
                        if job.tool_parser is not None and base is not None:  # content stops
                            if done:  # at a call's start tag
                                parsed = job.parse_tools(c.text[base:])
                                if parsed.tool_calls:
                                    calls = parsed.tool_calls
                                    safe = base + len(parsed.content or "")
                            else:
                                if index not in tool_streams:
                                    tool_streams[index] = ToolCallStream(job.tool_parser, base)
                                safe = tool_streams[index].content_end(c.text[:safe])
                        start, tok_start = sent_text.get(index, 0), sent_tokens.get(index, 0)
                        if safe <= start and len(c.token_ids) == tok_start and not done:
                            continue
                        delta = c.text[start:safe] if safe > start else ""
                        sent_text[index], sent_tokens[index] = max(safe, start), len(c.token_ids)
                        new_ids = c.token_ids[tok_start:]
                        lps = self._logprobs(
                            job,
                            new_ids,
                            c.logprobs[tok_start:] if c.logprobs else None,
                            start + (len(job.echo[i]) if job.echo is not None else 0),
                            delta,
                        )
                        if said and not delta and lps is None and not done and not (
                                job.return_token_ids and new_ids):
                            continue  # this step's text was all reasoning, sent above
                        if calls:
                            if delta or new_ids:
                                yield self._chunk(job, index, delta, lps, token_ids=new_ids)
                            for k, call in enumerate(calls):
                                tool_delta = {"tool_calls": [{"index": k, **call.to_openai()}]}
                                yield self._chunk(job, index, tool_delta)
                            finish = job.tool_parser.finish_reason or c.finish_reason
                            yield self._chunk(job, index, "", None, finish)
                            continue
                        yield self._chunk(job, index, delta, lps, c.finish_reason if done else None,
                                          token_ids=new_ids)
                    if out.finished:
                        finals[i] = out
            if job.include_usage:
                yield self._event(job, [], self._usage(job, finals))
        except Exception as e:  # after the headers: report in the stream, as vLLM does
            from moebius.server.api import to_api_error

            err = to_api_error(e)
            info = P.ErrorInfo(message=err.message, type=err.type, code=err.status)
            yield f"data: {json.dumps({'error': info.model_dump()})}\n\n"
        yield "data: [DONE]\n\n"

    # ---------------------------------------------------------------- formatting
    async def _forced_chunks(self, job, index, c, safe, forced, sent_tokens):
        """A forced call's stream step (moebius/server/tool_choice.py): the tool-call entries
        its text completes, the new tokens' logprobs (in a chunk of no content), and at the
        end the text as content if it holds no call, then the finish reason."""
        stream = forced.setdefault(index, job.tool_parser.stream())
        for entry in stream.feed(c.text[:safe]):
            yield self._chunk(job, index, {"tool_calls": [entry]})
        start = sent_tokens.get(index, 0)
        sent_tokens[index] = len(c.token_ids)
        new_ids = c.token_ids[start:]
        lps = self._logprobs(job, new_ids, c.logprobs[start:] if c.logprobs else None, 0, "")
        if (lps is not None and lps.content) or (job.return_token_ids and new_ids):
            yield self._chunk(job, index, {}, lps, token_ids=new_ids)
        if c.finish_reason is not None:
            if not stream.calls:
                yield self._chunk(job, index, c.text)
            yield self._chunk(job, index, "", None, c.finish_reason)

    def _chunk(self, job: Job, index: int, delta, logprobs=None, finish=None, token_ids=(),
               prompt_ids=None) -> str:
        """One choice's chunk; under return_token_ids it carries ``token_ids`` (the ids new
        since the last chunk) and, the first chunk of a choice, ``prompt_ids`` (a completion
        choice's ``prompt_token_ids``; a chat chunk's, at the top as vLLM sends them)."""
        if job.kind == "chat":
            d = (
                delta
                if isinstance(delta, dict)
                else ({"content": delta} if not finish or delta else {})
            )
            choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
        top = None
        if job.return_token_ids:
            choice["token_ids"] = list(token_ids)
            if prompt_ids is not None and job.kind == "chat":
                top = {"prompt_token_ids": prompt_ids}
            elif prompt_ids is not None:
                choice["prompt_token_ids"] = prompt_ids
        return self._event(job, [choice], None, top)

    def _event(self, job: Job, choices: list, usage: P.Usage | None, top=None) -> str:
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        body = {
            "id": job.id,
            "object": obj,
            "created": job.created,
            "model": self.model_name,
            "choices": [_dump(c) for c in choices],
            **(top or {}),
        }
        if job.include_usage:
            usage = usage or (job.usage_now if choices else None)
            body["usage"] = usage.model_dump() if usage else None
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def _usage(self, job: Job, finals: dict[int, RequestOutput]) -> P.Usage:
        prompt = sum(len(job.prompts[i]) for i in finals)
        completion = 0 if job.echo_only else sum(
            len(c.token_ids) for o in finals.values() for c in o.outputs)
        return P.Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _token(self, job: Job, tid: int) -> str:
        if job.token_ids_as_tokens:
            return f"token_id:{tid}"
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def _logprobs(self, job: Job, ids: list[int], lps, offset: int, text: str):
        if job.num_logprobs is None or lps is None:
            return None
        if job.kind == "chat":
            content = []
            for tid, d in zip(ids, lps, strict=False):
                tops = sorted(d.items(), key=lambda kv: -kv[1].logprob)[: job.num_logprobs]
                tok = self._token(job, tid)
                content.append(
                    P.TokenLogprob(
                        token=tok,
                        logprob=_json_logprob(d[tid].logprob),
                        bytes=list(tok.encode()),
                        top_logprobs=[
                            P.TopLogprob(
                                token=self._token(job, t),
                                logprob=_json_logprob(v.logprob),
                                bytes=list(self._token(job, t).encode()),
                            )
                            for t, v in tops
                        ],
                    )
                )
            return P.ChoiceLogprobs(content=content)
        out = P.CompletionLogprobs()
        for tid, d in zip(ids, lps, strict=False):
            tok = self._token(job, tid)
            out.tokens.append(tok)
            if d is None:  # an echoed prompt's first token: nothing precedes it
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                out.token_logprobs.append(_json_logprob(d[tid].logprob))
                out.top_logprobs.append(
                    {self._token(job, t): _json_logprob(v.logprob) for t, v in d.items()}
                )
            out.text_offset.append(offset)
            offset += len(tok)
        return out


def _json_logprob(lp: float) -> float:
    """-inf (a token that allowed_token_ids or min_tokens masked) as -9999.0, which JSON can
    carry: vLLM's and OpenAI's value."""
    return max(lp, -9999.0)


def _dump(choice) -> dict:
    if isinstance(choice, dict):
        lp = choice.get("logprobs")
        return {**choice, "logprobs": lp.model_dump() if lp is not None else None}
    return choice.model_dump()
