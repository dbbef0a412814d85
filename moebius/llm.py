"""The offline API with vLLM's shapes: ``LLM(model_dir, ...)``, ``generate``, ``chat``.

A vLLM script runs after changing the import::

    from moebius import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", ranks=2, layout="tp")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

from collections.abc import Sequence

from moebius.config import EngineConfig, ModelConfig
from moebius.core import RequestOutput, SamplingParams
from moebius.engine.llm_engine import LLMEngine


class LLM:
    def __init__(self, model: str | ModelConfig, **kwargs) -> None:
        """``model``: a checkpoint folder, or a ``ModelConfig`` for random weights.
        Keyword arguments are ``EngineConfig`` fields (ranks, layout, device, dtype, ...)."""
        if "switch_schedule" in kwargs:
            kwargs["switch_schedule"] = tuple(tuple(x) for x in kwargs["switch_schedule"])
        if isinstance(model, ModelConfig):
            cfg = EngineConfig(model=model, model_dir=None, **kwargs)
        else:
            cfg = EngineConfig(model=ModelConfig.from_dir(model), model_dir=model, **kwargs)
        self.engine = LLMEngine(cfg)

    @classmethod
    def from_config(cls, cfg: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(cfg)
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]] | list[int],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in order. Prompts are strings or token-id lists;
        ``priority``: one per prompt (scheduling_policy "priority": lower first)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._generate(prompts, sampling_params, use_tqdm, add_special_tokens=True,
                              priority=priority)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template (``chat_template_kwargs``
        become template variables, e.g. Qwen3's ``enable_thinking``; ``tools``, OpenAI's tool
        dicts, its ``tools``), then generate. The text is encoded without special tokens: the
        template writes its own BOS. Tool calls in the output are left in the text."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        render = self.tokenizer.apply_chat_template
        prompts = [render(c, add_generation_prompt, chat_template_kwargs, tools) for c in convs]
        return self._generate(prompts, sampling_params, use_tqdm, add_special_tokens=False)

    def _generate(self, prompts, sampling_params, use_tqdm: bool, add_special_tokens: bool,
                  priority: Sequence[int] | None = None):
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        priority = [0] * len(prompts) if priority is None else list(priority)
        if len(priority) != len(prompts):
            raise ValueError("give one priority per prompt")
        ids: list[str] = []
        try:
            for p, sp, prio in zip(prompts, params, priority, strict=True):
                ids.append(self.engine.add_request(p, sp, final_only=True,
                                                   add_special_tokens=add_special_tokens,
                                                   priority=prio))
        except BaseException:  # a bad prompt or params: none of this call's prompts runs
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in ids:
                        final[out.request_id] = out
                        if bar:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [final[i] for i in ids]

    def switch(self, layout: str) -> None:
        """Switch layout at the next step boundary (callable from any thread)."""
        self.engine.switch(layout)

    def update_weights(self, source):
        """New weights for the running engine, in place (RL: the trainer's latest policy
        between rollouts): a checkpoint folder of the same model, (Hugging Face name, tensor)
        pairs / a state dict (any subset), or a ``GroupSource`` (the tensors a trainer's
        ``WeightSender`` broadcasts: ``join_weight_group`` first). Returns the
        ``WeightUpdate``. Call between ``generate`` calls (moebius/engine/weight_update.py)."""
        return self.engine.update_weights(source)

    def join_weight_group(self, host: str, port: int, world_size: int, rank_offset: int = 1,
                          timeout_s: float = 300.0) -> None:
        """Join a trainer's process group for weight updates over NCCL/gloo; then
        ``update_weights(GroupSource(...))`` receives what the trainer's ``WeightSender``
        broadcasts (moebius/engine/weight_sync.py)."""
        self.engine.join_weight_group(host, port, world_size, rank_offset, timeout_s)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def __del__(self):
        try:
            self.engine.shutdown()
        except Exception:
            pass
