"""Structured outputs over HTTP: ``response_format`` (OpenAI's ``json_object`` and
``json_schema``) and ``structured_outputs`` (the engine's `StructuredOutputsParams`
fields) in a completion or chat request body, turned into the request's
`StructuredOutputsParams`; anything malformed is a 400 naming the field."""

from __future__ import annotations

import re
from typing import Any

from engine.entrypoints.errors import APIError

STRUCTURED_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def structured_outputs_from(body: Any) -> Any:
    """The `StructuredOutputsParams` the body asks for, or None.

    Raises `APIError` (400) naming ``response_format...`` or
    ``structured_outputs...`` when the field is malformed, asks for something
    unsupported, or its schema / pattern / grammar does not compile.
    """
    from engine.sampling_params import StructuredOutputsParams

    response_format = getattr(body, "response_format", None)
    structured = getattr(body, "structured_outputs", None)
    kwargs, field = None, None
    if response_format is not None:
        kwargs, field = _from_response_format(response_format), "response_format"
    if structured is not None:
        if kwargs is not None:
            raise APIError(400, "give response_format or structured_outputs, not both",
                           param="structured_outputs")
        kwargs, field = _from_structured(structured), "structured_outputs"
    if kwargs is None:
        return None
    try:
        return StructuredOutputsParams(**kwargs)
    except ValueError as exc:
        raise structured_error(exc, field, "json" in kwargs) from None


def structured_error(exc: ValueError, field: str, is_json: bool | None = None) -> APIError:
    """The 400 of a `StructuredOutputsParams` ValueError, its message and param
    naming `field` (``response_format`` or ``structured_outputs``)."""
    message = str(exc).replace("StructuredOutputsParams", field)
    named = re.match(rf"{field}\.(\w+)", message)
    if field == "response_format":
        if is_json is None:
            is_json = bool(named) and named.group(1) == "json"
        param = "response_format.json_schema.schema" if is_json else field
    else:
        param = f"{field}.{named.group(1)}" if named else field
    return APIError(400, message, param=param)


def _from_response_format(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        raise APIError(400, "response_format must be an object with a 'type'",
                       param="response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema "
                                "object", param="response_format.json_schema.schema")
        return {"json": spec["schema"]}
    raise APIError(400, f"response_format.type {kind!r} is not supported (use 'text', "
                        "'json_object' or 'json_schema')", param="response_format.type")


def _from_structured(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise APIError(400, "structured_outputs must be an object with one of "
                            f"{', '.join(STRUCTURED_KEYS)}", param="structured_outputs")
    unknown = sorted(set(value) - set(STRUCTURED_KEYS))
    if unknown:
        raise APIError(400, f"structured_outputs.{unknown[0]} is not supported (known: "
                            f"{', '.join(STRUCTURED_KEYS)})",
                       param=f"structured_outputs.{unknown[0]}")
    return {k: v for k, v in value.items() if v is not None}
