"""spec.engine.toolCallParser: the engine's `--enable-auto-tool-choice --tool-call-parser`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.operator.test_manifests import make_service, rendered, serve_namespace


def engine_args(**engine: object) -> list[str]:
    objs = rendered(make_service(engine=engine))
    return objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]


def test_tool_call_parser_reaches_kvpilot_serve() -> None:
    ns = serve_namespace(engine_args(toolCallParser="hermes"))
    assert ns.enable_auto_tool_choice is True and ns.tool_call_parser == "hermes"
    ns = serve_namespace(engine_args())
    assert ns.enable_auto_tool_choice is False and ns.tool_call_parser is None


def test_bad_values_and_managed_flags_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"toolCallParser|tool_call_parser"):
        make_service(engine={"toolCallParser": "xml"})
    with pytest.raises(ValidationError, match=r"spec\.engine\.toolCallParser"):
        make_service(engine={"extraArgs": ["--tool-call-parser=hermes"]})
