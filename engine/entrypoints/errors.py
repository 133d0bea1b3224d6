"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import re
from typing import Any

from engine.utils import short_repr

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable",
}
_FIELD = re.compile(r"\b(?:SamplingParams|PoolingParams)\.(\w+)")


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else
                                       "invalid_request_error")

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @classmethod
    def bad_value(cls, exc: Exception, param: str | None = None) -> APIError:
        """A 400 for an engine ValueError; the field is read from messages like
        ``SamplingParams.top_p must be ...`` when `param` is not given."""
        message = str(exc)
        if param is None:
            match = _FIELD.search(message)
            param = match.group(1) if match else None
        return cls(400, message, param=param)


def json_response(error: APIError) -> Any:
    from starlette.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.payload(), status_code=error.status, headers=headers)


def validation_error(errors: list[dict[str, Any]], content_type: str | None = None) -> APIError:
    """A 400 from FastAPI/pydantic request-validation errors, naming the first bad
    field (``messages[0].role``), or the request's `content_type` when that is why
    the body was not read as JSON."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return APIError(400, f"the request body is not valid JSON: {detail}")
    if not loc:
        media_type = (content_type or "").split(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            # FastAPI reads a body as JSON only when the header says so (curl -d
            # sends application/x-www-form-urlencoded)
            got = f"'Content-Type: {content_type}'" if content_type else "no Content-Type"
            return APIError(400, f"the request body must be JSON sent with 'Content-Type: "
                                 f"application/json' (got {got}; with curl add "
                                 "-H 'Content-Type: application/json')")
        return APIError(400, "the request body must be a JSON object")
    param = _dotted(loc)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "missing":
        return APIError(400, f"{param}: this field is required", param=param)
    if "input" in first and kind != "value_error":
        message += f" (got {short_repr(first['input'])})"
    return APIError(400, f"{param}: {message}", param=param)


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
