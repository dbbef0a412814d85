"""vLLM's tokenizer endpoints: POST /tokenize (a prompt, or a conversation) and POST
/detokenize, answered on the event loop: nothing is queued on the engine.

A prompt is encoded by /v1/completions' own path (``Responder.encode_prompt``: the tokenizer's
BOS with ``add_special_tokens``, the default) and a conversation by /v1/chat/completions' own
(``Responder.chat_prompt``: the same messages, tools, ``tool_choice: "none"``,
``chat_template_kwargs`` and ``continue_final_message``), so ``count`` equals the
``usage.prompt_tokens`` those requests report. /detokenize decodes with special tokens kept,
so it inverts /tokenize.
"""

from __future__ import annotations

from moebius.server import protocol as P
from moebius.server.responses import Responder


def tokenize(
    responder: Responder, req: P.TokenizeCompletionRequest | P.TokenizeChatRequest
) -> P.TokenizeResponse:
    """The request's prompt ids; ValueError (a 400) for what the chat path refuses."""
    if isinstance(req, P.TokenizeChatRequest):
        ids = responder.chat_prompt(req, req.add_special_tokens)
    else:
        ids = responder.encode_prompt(req.prompt, req.add_special_tokens)
    strs = responder.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return P.TokenizeResponse(
        count=len(ids),
        max_model_len=responder.engine.cfg.context_len,
        tokens=ids,
        token_strs=strs,
    )


def detokenize(responder: Responder, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
    """The text of ``req.tokens``; ValueError (a 400) for an id the tokenizer has no token for
    (negative ids fail validation before)."""
    vocab_size = responder.tokenizer.vocab_size
    bad = next((t for t in req.tokens if t >= vocab_size), None)
    if bad is not None:
        raise ValueError(f"tokens: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return P.DetokenizeResponse(
        prompt=responder.tokenizer.decode(req.tokens, skip_special_tokens=False)
    )
