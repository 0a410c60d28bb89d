"""Errors of the OpenAI-compatible routes, in the shape the OpenAI API sends them.

`param` names the request field at fault, as OpenAI does, so a client (or its SDK) can tell
which of its fields was refused without parsing the message.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A request refused with `status`; str() is the message for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def error_response(exc: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    error = {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.code}
    return JSONResponse({"error": error}, status_code=exc.status, headers=headers)
