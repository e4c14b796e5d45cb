"""Chat messages -> prompt text, with the model's own template when it has one.

Lifecycle: the frontends call ``load_chat_renderer(source)`` once at start.
A model directory whose ``tokenizer_config.json`` holds a ``chat_template``
(a Jinja template, as Hugging Face ships them) gets that template, rendered
in a sandbox with ``add_generation_prompt=True``; presets and models without
one get Baton's documented default (``cluster.validation.render_chat``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cluster.validation import render_chat

ChatRenderer = Callable[[list[tuple[str, str]]], str]


def load_chat_renderer(source: str) -> ChatRenderer:
    config = Path(source) / "tokenizer_config.json"
    if not config.is_file():
        return render_chat
    data = json.loads(config.read_text())
    template = data.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        return render_chat
    return _jinja_renderer(template, _token_text(data.get("bos_token")),
                           _token_text(data.get("eos_token")))


def _token_text(token) -> str:
    return token.get("content", "") if isinstance(token, dict) else token or ""


def _jinja_renderer(template: str, bos: str, eos: str) -> ChatRenderer:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages: list[tuple[str, str]]) -> str:
        try:
            return compiled.render(messages=[{"role": r, "content": c} for r, c in messages],
                                   add_generation_prompt=True, bos_token=bos, eos_token=eos)
        except TemplateError as exc:
            from cluster.validation import InvalidRequest

            raise InvalidRequest("messages", f"the model's chat template refused them: {exc}") \
                from None

    return render
