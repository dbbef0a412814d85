"""/tokenize, /detokenize and /v1/models/{id} through the app in process, on checkpoints the
shared live server (test_openai_e2e.py, which covers the endpoints on the real engine) does
not serve: a tokenizer that adds a BOS (Llama/Mixtral-style ``add_bos_token``), a served name
holding "/", and continue_final_message against transformers' own ``apply_chat_template``.
The model is ``ScriptedEngine``: only the prompts and usage matter here."""

from __future__ import annotations

import openai
import pytest

from moebius.server.api import create_app
from moebius.tokenizer import Tokenizer
from tests.conftest import copy_checkpoint
from tests.server.test_tool_calls import ScriptedEngine, open_app

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]
# The final message's content appears twice: the cut must be at the last one. It also ends in
# a space, which the ChatML template keeps and TRIMMED drops.
PREFILL = [{"role": "user", "content": "Say: Paris is"},
           {"role": "assistant", "content": "Paris is "}]
TRIMMED = """{%- for m in messages -%}
{{- '<|im_start|>' + m.role + '\\n' + (m.content | trim) + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"""


@pytest.fixture(scope="module")
def bos_dir(qwen_dir, tmp_path_factory):
    return copy_checkpoint(qwen_dir, str(tmp_path_factory.mktemp("bos") / "ckpt"),
                           bos_token="<|endoftext|>", add_bos_token=True)


@pytest.fixture
def app(request):
    """``app(model_dir, name)`` -> (httpx-style TestClient, openai client), closed after."""
    opened = []

    def start(model_dir: str, name: str = "tiny"):
        return open_app(create_app(ScriptedEngine(model_dir, "ok"), name), opened)

    yield start
    for http in opened:
        http.__exit__(None, None, None)


def test_bos_as_completions_and_chat_add_it(app, bos_dir):
    """A prompt gets the tokenizer's BOS unless add_special_tokens is false, and counts as
    /v1/completions counts it; a chat gets none by default (the template writes its own),
    as /v1/chat/completions encodes it, and one more with add_special_tokens."""
    http, client = app(bos_dir)
    bos = Tokenizer(bos_dir).bos_token_id
    assert bos is not None
    prompt = "Hello, world!"
    r = http.post("/tokenize", json={"model": "tiny", "prompt": prompt}).json()
    assert r["tokens"][0] == bos and r["count"] == len(r["tokens"]) and r["token_strs"] is None
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    assert r["count"] == done.usage.prompt_tokens
    bare = http.post("/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()
    assert bare["tokens"] == r["tokens"][1:]

    chat = http.post("/tokenize", json={"messages": ASK}).json()
    assert chat["tokens"][0] != bos
    done = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1)
    assert chat["count"] == done.usage.prompt_tokens
    with_bos = http.post("/tokenize", json={"messages": ASK, "add_special_tokens": True}).json()
    assert with_bos["tokens"] == [bos, *chat["tokens"]]


def test_a_served_name_with_a_slash(app, qwen_dir):
    http, client = app(qwen_dir, "org/tiny")
    card = client.models.retrieve("org/tiny")  # the client sends org%2Ftiny
    assert card.id == "org/tiny" and card.max_model_len == 4096
    assert http.get("/v1/models/org/tiny").json()["id"] == "org/tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("org/other")
    r = http.post("/tokenize", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert http.post("/tokenize", json={"model": "org/tiny", "prompt": "x"}).status_code == 200


@pytest.mark.parametrize("template", [None, TRIMMED], ids=["chatml", "trimmed"])
def test_continue_final_message_as_transformers(app, qwen_dir, tmp_path, template):
    """The prompt ends where the final message does (no end of turn), as transformers' own
    apply_chat_template(continue_final_message=True) renders it; /v1/chat/completions
    renders the same."""
    from transformers import AutoTokenizer

    folder = copy_checkpoint(qwen_dir, str(tmp_path / "ckpt"), template)
    want = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        PREFILL, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    assert want.endswith("Paris is " if template is None else "Paris is")
    http, client = app(folder)
    body = {"messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True}
    r = http.post("/tokenize", json=body).json()
    assert r["tokens"] == Tokenizer(folder).encode(want, add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": want}
    done = client.chat.completions.create(
        model="tiny", messages=PREFILL, max_tokens=1,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert done.usage.prompt_tokens == r["count"]


def test_a_template_that_drops_the_final_message_is_400(app, qwen_dir, tmp_path):
    folder = copy_checkpoint(qwen_dir, str(tmp_path / "ckpt"), "{{ messages[0].content }}")
    http, _ = app(folder)
    body = {"messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True}
    r = http.post("/tokenize", json=body)
    assert r.status_code == 400 and "does not appear" in r.json()["error"]["message"]
