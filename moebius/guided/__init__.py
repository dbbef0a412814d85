"""Guided decoding: outputs held to a grammar by masking the logits of each sampled token.

JSON mode (OpenAI's ``response_format: {"type": "json_object"}``: the output is one JSON
object), a JSON schema (``"json_schema"``, vLLM's ``guided_json``) and a choice among strings
(vLLM's ``guided_choice``). json_grammar.py is the byte-level JSON automaton, json_schema.py a
schema's, token_bytes.py what each token appends, guide.py the masks; the scheduler asks a
request's ``Guide`` for the mask of each step it samples, and the sampling rank applies it.
"""
