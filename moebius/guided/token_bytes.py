"""The bytes each token id appends to the text, read off the checkpoint's tokenizer.json.

Two vocabularies cover the models served here: byte-level BPE (Qwen, GPT-2 style: each byte
is one of 256 printable characters, ``bytes_to_unicode``) and SentencePiece-style pieces
(Mixtral, Llama: "▁" for a space, ``<0xNN>`` for a raw byte). Special and added tokens (EOS,
chat markers) append no text a grammar can read: None, as is any id past the tokenizer's
vocabulary (the model's embedding rows may be padded).
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer as HFTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (the byte-level alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _decoder_kinds(spec) -> set[str]:
    if not spec:
        return set()
    kinds = {spec.get("type", "")}
    for inner in spec.get("decoders") or []:
        kinds |= _decoder_kinds(inner)
    return kinds


def token_bytes(tok: HFTokenizer, vocab_size: int) -> list[bytes | None]:
    """For ids 0 .. vocab_size-1: the bytes the token appends to decoded text, or None (a
    special or added token, an id the tokenizer does not have)."""
    kinds = _decoder_kinds(json.loads(tok.to_str()).get("decoder"))
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    out: list[bytes | None] = [None] * vocab_size
    if "ByteLevel" in kinds:
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        for piece, i in tok.get_vocab(with_added_tokens=False).items():
            if i < vocab_size and piece not in special:
                try:
                    out[i] = bytes(byte_of[c] for c in piece)
                except KeyError:  # not a byte-level piece: leave it out
                    pass
        return out
    for piece, i in tok.get_vocab(with_added_tokens=False).items():
        if i >= vocab_size or piece in special:
            continue
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = bytes([int(piece[3:5], 16)])  # ByteFallback
        else:
            out[i] = piece.replace("\u2581", " ").encode()
    return out
