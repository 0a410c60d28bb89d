"""The server's front door: checks every HTTP request passes before the app reads its body.

FastAPI reads and parses a JSON body before a route's code runs, and Gradio's upload route
writes every file to disk before anyone counts them, so checks inside the routes come too late:
an unauthenticated 300 MB body was read into memory before its 401. This pure ASGI middleware
sees the request line and headers first and decides there:

- body size: refused with 413 from Content-Length before a byte is read, and counted while the
  body arrives (a chunked body has no Content-Length), stopping at the limit; an event of the
  page or of /chat carries at most a message and a chat within the history limits, so its
  limit is that (about 7 MB), not --max-body-mb;
- the OpenAI routes and FastAPI's schema pages need the API key when --auth is set, before
  their body is read;
- failed logins (the page's and API keys) are counted per client address; past the limit that
  client's further attempts get 429 with Retry-After (see `LoginThrottle`).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets

from starlette.datastructures import Headers
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .login_throttle import LoginThrottle
from ..config.settings import Settings

MB = 1024 * 1024
MULTIPART_SLACK = MB  # part headers and boundaries around the files of one upload request
API_PREFIX = "/v1/"
# FastAPI's own schema routes: an inventory of every route, not for strangers when --auth is set.
SCHEMA_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
LOGIN_PATHS = frozenset({"/login", "/login/"})
UPLOAD_PATHS = frozenset({"/gradio_api/upload", "/gradio_api/upload/"})
# Gradio's event routes: queued events, outside-the-queue events, REST calls of the API.
EVENT_PREFIXES = ("/gradio_api/queue/join", "/gradio_api/run/", "/gradio_api/call/", "/gradio_api/api/")
JSON_BYTES_PER_CHAR = 6  # the longest a character gets in JSON ("\uXXXX")


def api_key_ok(authorization: str, pair: tuple[str, str]) -> bool:
    """Accept `Bearer <password>`, `Bearer user:password` or HTTP Basic for the --auth pair."""
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            credential = base64.b64decode(credential).decode()
        except (binascii.Error, UnicodeDecodeError):
            credential = ""
    accepted = (pair[1], f"{pair[0]}:{pair[1]}")
    return any(secrets.compare_digest(credential.encode(), ok.encode()) for ok in accepted)


class BodyTooLarge(MultiPartException):
    """Raised to the app when the body passes its limit. A MultiPartException so that the
    multipart parsers (Starlette's and Gradio's copy) delete the files they had started."""


class HttpGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.auth = settings.auth_pair
        self.body_limit = int(settings.max_body_mb * MB)
        self.body_message = (f"The request body is larger than {settings.max_body_mb:g} MB "
                             "(the server's --max-body-mb).")
        self.upload_limit = int(settings.max_images * settings.max_upload_mb * MB) + MULTIPART_SLACK
        self.upload_message = (f"Upload too large: one request may carry at most {settings.max_images} files "
                               f"of {settings.max_upload_mb:g} MB (the server's --max-images and --max-file-mb "
                               "or --max-video-mb).")
        # A message and a chat within their limits, written as JSON at its longest, and room for
        # the rest of the event; Gradio keeps an event's body while the event runs, and after.
        text = settings.max_message_chars + settings.max_history_chars
        self.event_limit = min(self.body_limit, text * JSON_BYTES_PER_CHAR + MB)
        self.event_message = (f"The request is larger than {self.event_limit / MB:.0f} MB: more than a message "
                              "and a chat within the server's limits (--max-message-chars, --max-history-chars).")
        self.throttle = LoginThrottle(settings.login_failures)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, headers = scope["path"], Headers(scope=scope)
        client = scope["client"][0] if scope.get("client") else "unknown"
        is_login = scope["method"] == "POST" and path in LOGIN_PATHS
        needs_key = self.auth is not None and (path.startswith(API_PREFIX) or path in SCHEMA_PATHS)
        if is_login or needs_key:
            wait = self.throttle.retry_after(client)
            if wait:
                await _refuse(send, 429, f"Too many failed logins from your address: try again in {wait} s.",
                              "rate_limit_error", {"retry-after": str(wait)})
                return
        if needs_key:
            if not api_key_ok(headers.get("authorization", ""), self.auth):
                self.throttle.failed(client)
                # Basic lets a browser ask for the password on the schema pages.
                challenge = 'Basic realm="API"' if path in SCHEMA_PATHS else "Bearer"
                await _refuse(send, 401, "Missing or wrong API key: use the password given with --auth.",
                              "authentication_error", {"www-authenticate": challenge})
                return
            self.throttle.succeeded(client)
        if path in UPLOAD_PATHS:
            limit, message = self.upload_limit, self.upload_message
        elif path.startswith(EVENT_PREFIXES):
            limit, message = self.event_limit, self.event_message
        else:
            limit, message = self.body_limit, self.body_message
        declared = _content_length(headers)
        if declared is not None and declared > limit:
            await _refuse(send, 413, message)
            return
        if is_login:
            send = self._watching_login(send, client)
        await _BodyLimit(limit, message)(self.app, scope, receive, send)

    def _watching_login(self, send: Send, client: str) -> Send:
        """Gradio's login form answers 4xx for a wrong password: count it against the client."""

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    self.throttle.failed(client)
                elif message["status"] < 300:
                    self.throttle.succeeded(client)
            await send(message)

        return watched


class _BodyLimit:
    """One request's body, counted as it arrives: past the limit the app gets no more of it, and
    the client gets a 413 instead of whatever the app answered to the cut-off body."""

    def __init__(self, limit: int, message: str) -> None:
        self.limit, self.message = limit, message
        self.received = 0
        self.exceeded = self.started = False

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted_receive() -> Message:
            if self.exceeded:
                raise BodyTooLarge(self.message)
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                if self.received > self.limit:
                    self.exceeded = True
                    raise BodyTooLarge(self.message)
            return message

        async def guarded_send(message: Message) -> None:
            if self.exceeded and not self.started:
                return  # the app's answer to a body it was not given whole; ours goes instead
            self.started = self.started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, counted_receive, guarded_send)
        except Exception:
            if not self.exceeded or self.started:
                raise
        if self.exceeded and not self.started:
            await _refuse(send, 413, self.message)


def _content_length(headers: Headers) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


async def _refuse(send: Send, status: int, message: str, kind: str = "invalid_request_error",
                  extra_headers: dict[str, str] | None = None) -> None:
    """An error in the OpenAI API's shape, which the page and Gradio's client show as text too."""
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode()) for name, value in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
