"""The one error path: every failure becomes an OpenAI-shaped error body.

Endpoints raise APIError; `add_exception_handlers` turns it, Starlette's own HTTP errors and
anything unexpected into the same `ErrorResponse`. Every failure a client can cause maps to a 4xx
(a malformed body, an engine refusal, a SamplingParams check); only our own bugs are 500s. Once a
stream has started its status line is gone, so a failure there is the same body as an SSE event.
"""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvpilot_engine.llm_engine import InvalidRequestError
from kvpilot_engine.server.async_engine import EngineOverloadedError, EngineUnavailableError
from kvpilot_engine.server.protocol import ErrorInfo, ErrorResponse

log = structlog.get_logger("kvpilot.server")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def sse_error(e: Exception) -> str:
    """The engine failed mid-stream: the error as the stream's last event."""
    log.error("stream failed", exc_info=e)
    body = ErrorResponse(error=ErrorInfo(message=str(e), type="server_error", code=500))
    return f"data: {body.model_dump_json()}\n\n"


def validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    loc = [str(x) for x in err.get("loc", ())]
    if err["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {err['msg']}", code="invalid_json")
    where = ".".join(loc)
    msg = f"{where}: {err['msg']}" if where else err["msg"]
    return APIError(400, msg, param=loc[0] if loc else None, code="invalid_value")


def from_engine_error(e: Exception) -> APIError:
    if isinstance(e, InvalidRequestError):
        code = "context_length_exceeded" if "context length" in str(e) else "invalid_value"
        return APIError(400, str(e), param=e.param, code=code)
    if isinstance(e, EngineOverloadedError):
        headers = {"Retry-After": str(e.retry_after)}
        return APIError(503, str(e), code="overloaded", headers=headers)
    if isinstance(e, EngineUnavailableError):
        return APIError(503, str(e), code="unavailable", headers={"Retry-After": "5"})
    if isinstance(e, ValueError):  # SamplingParams' own checks, or a chat template refusing
        return APIError(400, str(e), code="invalid_value")
    raise e


def add_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        if e.status >= 500:
            log.warning("request refused", status=e.status, reason=e.message)
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error", exc_info=e)
        return error_response(500, "internal server error; see the server log", code="internal")
