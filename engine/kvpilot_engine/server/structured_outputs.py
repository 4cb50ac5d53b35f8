"""From a request body to StructuredOutputsParams, and the policy for fields we do not serve.

One request may constrain its output one way: OpenAI's `response_format` (`json_object`,
`json_schema`), vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`
extras, or vLLM's newer `structured_outputs` object; tool calls with `tool_choice` `required`
or a named function constrain it too (server/tools.py). Two at once is a 400 naming both.

Unknown top-level fields are ignored with a logged warning (vLLM's behaviour: a newer client's
fields do not break requests); fields we know but do not implement are a 400 naming them, so a
client never believes it got a behaviour it did not.
"""

from __future__ import annotations

from typing import Any

import structlog

from kvpilot_engine.server.errors import APIError
from kvpilot_engine.server.protocol import ChatCompletionRequest, CompletionRequest
from kvpilot_engine.structured import StructuredOutputsParams

log = structlog.get_logger("kvpilot.server")

# Fields of OpenAI's or vLLM's APIs that change what the answer is, and that kvpilot does not
# implement: refused when set to anything but their off value.
NOT_IMPLEMENTED: dict[str, str] = {
    "audio": "audio output",
    "modalities": "output modalities other than text",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "functions": "the legacy functions API (send tools)",
    "function_call": "the legacy function_call API (send tool_choice)",
    "use_beam_search": "beam search",
    "prompt_logprobs": "prompt logprobs",
    "guided_whitespace_pattern": "a whitespace pattern for guided JSON",
    "structural_tag": "structural tags",
    "reasoning_effort": "reasoning effort (no reasoning models are served)",
}
# Off values: a client that sends the default explicitly is not asking for anything.
_OFF: tuple[Any, ...] = (None, False, "", [], {}, ["text"])


def check_extra_fields(req: CompletionRequest | ChatCompletionRequest) -> None:
    """400 for implemented-elsewhere fields, a warning for the unknown ones (and for unknown
    fields on messages, which clients echo back from earlier responses)."""
    extra = dict(req.model_extra or {})
    refused = sorted(k for k, v in extra.items() if k in NOT_IMPLEMENTED and v not in _OFF)
    if refused:
        what = "; ".join(f"{k} ({NOT_IMPLEMENTED[k]})" for k in refused)
        raise APIError(
            400, f"not supported by this server: {what}", param=refused[0], code="unsupported"
        )
    ignored = sorted(k for k in extra if k not in NOT_IMPLEMENTED)
    if isinstance(req, ChatCompletionRequest):
        for i, m in enumerate(req.messages):
            ignored += [f"messages[{i}].{k}" for k, v in (m.model_extra or {}).items() if v]
    if ignored:
        log.warning("ignored_unknown_fields", fields=ignored)


def structured_outputs(
    req: CompletionRequest | ChatCompletionRequest,
) -> StructuredOutputsParams | None:
    """The request's output constraint from its structured-output fields (not tools), or None."""
    found: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        else:
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(
                    400,
                    "response_format of type json_schema needs json_schema.schema",
                    param="response_format",
                    code="invalid_value",
                )
            # `strict` or not, the schema is enforced: a grammar never makes it optional.
            found.append(("response_format", {"json": rf.json_schema.schema_}))
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, name)
        if value is not None:
            found.append((name, {key: value}))
    so = req.structured_outputs
    if so is not None:
        fields = so.model_dump(by_alias=True, exclude_none=True)
        found.append(("structured_outputs", fields))
    if not found:
        return None
    if len(found) > 1:
        names = [n for n, _ in found]
        raise APIError(
            400,
            f"a request takes one output constraint; got {' and '.join(names)}",
            param=names[1],
            code="invalid_value",
        )
    param, fields = found[0]
    return make_params(param, fields)


def make_params(param: str, fields: dict[str, Any]) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**fields, source_param=param)
    except (TypeError, ValueError) as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None
