"""StructuredOutputsParams: what a request's output must match (vLLM's names and shape)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """Exactly one of the fields is set. `json` is a JSON Schema (a dict or its text), `regex` a
    regular expression, `choice` a list of strings (the output is one of them), `grammar` an
    EBNF grammar (GBNF, as llama.cpp and xgrammar write it), `json_object` any JSON object."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # Compact JSON: no whitespace between tokens. Small models given free whitespace can spend
    # their whole budget on newlines; vLLM has the same switch.
    disable_any_whitespace: bool = True
    # The request parameter this came from (response_format, guided_json, tool_choice, ...), so
    # an error compiling it names what the client sent.
    source_param: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("the JSON schema must be a JSON object")
        if self.json_object is False:
            self.json_object = None
        set_ = [k for k in KINDS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(
                "structured outputs take exactly one of json, regex, choice, grammar and "
                f"json_object; got {', '.join(set_) or 'none'}"
            )
        if self.choice is not None and not (
            self.choice and all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def cache_key(self) -> tuple[str, str, bool]:
        value = getattr(self, self.kind)
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return (self.kind, text, self.disable_any_whitespace)


# vLLM's older name for the same thing.
GuidedDecodingParams = StructuredOutputsParams
