"""Chat templates rendered the way transformers renders them, without importing transformers.

The environment mirrors transformers' `utils/chat_template_utils.py` (`_compile_jinja_template`,
`render_jinja_template`): an immutable Jinja sandbox with trim_blocks and lstrip_blocks, the
`raise_exception` and `strftime_now` globals, its `tojson` filter (no HTML escaping), the guarded
`dict` and `namespace` globals, loop controls and the `{% generation %}` tag. The template sees
`messages`, `tools`, `documents`, `add_generation_prompt` and the special-token variables
(`bos_token`, `eos_token`, ...) as `apply_chat_template` passes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


class TemplateRejected(jinja2.exceptions.TemplateError):
    """The template called `raise_exception`: it refuses these messages (bad input)."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant
    masks; rendering text only, the tag is its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise TemplateRejected(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers replaces Jinja's tojson, which escapes HTML characters.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    # Only calling and fromkeys: no attribute access to break out of the sandbox with.
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces reject underscore names, which would reach CPython internals.
    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"got {name[:48]!r}"
            )


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in transformers' environment; each distinct source once."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def find_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """The model's default chat template, where transformers looks for it: chat_template.jinja
    (and additional_chat_templates/*.jinja) before tokenizer_config.json's `chat_template`."""
    templates: dict[str, str] = {}
    default_file = path / CHAT_TEMPLATE_FILE
    if default_file.is_file():
        templates["default"] = default_file.read_text(encoding="utf-8")
    extra_dir = path / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    if not templates:
        value = config.get("chat_template")
        if isinstance(value, str):
            return value or None
        if isinstance(value, list):
            templates = {t["name"]: t["template"] for t in value}
    # Without tools, transformers uses the one named "default" (and refuses if there is none).
    return templates.get("default") or None


class ChatTemplate:
    """One model's chat template, compiled once, with its special-token variables."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        self.source = source
        self.template = compile_template(source)
        self.special_tokens = dict(special_tokens)

    def render(
        self, messages: Iterable[tuple[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """The text `apply_chat_template(..., tokenize=False)` renders for these messages."""
        return self.template.render(
            messages=[{"role": role, "content": content} for role, content in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )
