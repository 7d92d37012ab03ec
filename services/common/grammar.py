"""JSON schemas as grammars (llguidance), checked without a tokenizer: the router refuses a
schema the last stage could not compile before any work starts."""

from __future__ import annotations

import llguidance


def check_schema(schema: str) -> str:
    """What is wrong with a JSON schema as a grammar ('' if nothing)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    except Exception as exc:  # noqa: BLE001 - any refusal is the client's schema
        return str(exc)[:200]
    return str(llguidance.LLMatcher.validate_grammar(grammar) or "")[:200]
