"""Chat prompts: the model's own Jinja template when its tokenizer_config.json
has one (rendered in a sandbox), Baton's documented default otherwise."""

from __future__ import annotations

import json

import pytest

from cluster.chat_template import load_chat_renderer
from cluster.validation import InvalidRequest, render_chat

TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def write_config(tmp_path, **data):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(data))
    return str(tmp_path)


def test_the_models_template_is_used(tmp_path):
    render = load_chat_renderer(write_config(tmp_path, chat_template=TEMPLATE,
                                             bos_token={"content": "<s>"}))
    assert render([("system", "Be brief."), ("user", "Hi")]) == \
        "<s>[system] Be brief.\n[user] Hi\n[assistant] "


def test_named_templates_use_the_default_one(tmp_path):
    render = load_chat_renderer(write_config(tmp_path, chat_template=[
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": TEMPLATE}]))
    assert render([("user", "x")]) == "[user] x\n[assistant] "


def test_presets_and_models_without_a_template_get_the_default(tmp_path):
    assert load_chat_renderer("tiny") is render_chat
    assert load_chat_renderer(write_config(tmp_path, bos_token="<s>")) is render_chat
    assert render_chat([("user", "Hi")]) == "<|user|>\nHi\n<|assistant|>\n"


def test_a_template_that_refuses_is_an_invalid_request(tmp_path):
    refusing = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    render = load_chat_renderer(write_config(tmp_path, chat_template=refusing))
    with pytest.raises(InvalidRequest) as err:
        render([("assistant", "hello")])
    assert err.value.field == "messages" and "user first" in str(err.value)


def test_the_sandbox_blocks_attribute_escapes(tmp_path):
    escape = "{{ messages.__class__.__mro__ }}"
    render = load_chat_renderer(write_config(tmp_path, chat_template=escape))
    with pytest.raises(InvalidRequest, match="unsafe|undefined"):
        render([("user", "x")])
