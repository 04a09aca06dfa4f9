"""Chat templates: a conversation rendered as the checkpoint's jinja template renders it.

The environment is the one transformers' `apply_chat_template` gives a template (a sandbox
with `trim_blocks`, `lstrip_blocks`, loop controls, `tojson`, `raise_exception`,
`strftime_now`), so a template written for transformers renders the same text here:

  text = chat.render(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
  ids = tokenizer.encode(text)   # the template writes BOS itself where the model wants it
"""

import datetime
import functools
import json


# For tokenizers without a template of their own (char, byte, sentencepiece, wordpiece): plain
# text turns. An assistant turn is its content and a newline; instruction tuning appends the
# tokenizer's EOS id to it, so that generation learns where to stop.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% else %}Assistant: {{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}")


class ChatTemplateError(ValueError):
    """A template refused a conversation (its `raise_exception`), or there is no template."""


def _raise(message):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import ext, sandbox  # pylint: disable=import-outside-toplevel

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, template: str = "",
           **extra) -> str:
    """The text of `messages` ({"role", "content"} dicts) under `template` (default
    `tokenizer.chat_template`), with `bos_token`/`eos_token` as the checkpoint names them;
    `add_generation_prompt` ends it with the opening of an assistant turn."""
    template = template or getattr(tokenizer, "chat_template", "")
    if not template:
        raise ChatTemplateError("the tokenizer has no chat template (a Hugging Face folder's "
                                "tokenizer_config.json or chat_template.jinja provides one)")
    bad = [m for m in messages if not isinstance(m, dict) or "role" not in m or "content" not in m]
    if bad:
        raise ChatTemplateError(f"every message needs a role and a content; got {bad[0]!r}")
    settings = getattr(tokenizer, "settings", {})
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=settings.get("bos_token") or "",
                                     eos_token=settings.get("eos_token") or "", **extra)
