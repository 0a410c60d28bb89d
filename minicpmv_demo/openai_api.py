"""OpenAI-compatible routes (`POST /v1/chat/completions`, `GET /v1/models`) on the same server.

Many users already have OpenAI clients. These routes go through the same `ChatService` as the
page, so API requests are batched with UI users in the one engine, and obey the same input
checks, limits and login. Images come as `image_url` parts: `data:` URLs, or URLs of files
uploaded to this server (`.../gradio_api/file=<path>`).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from urllib.parse import unquote, urlparse

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from .chat_input import InputError, content_parts
from .chat_service import ChatService, upload_root
from .engine import FinishReason, ReplyError, ReplyStream
from .http_guard import api_key_ok

MAX_DATA_URL_BYTES = 30 * 1024 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def add_openai_routes(app: FastAPI, service: ChatService, model_name: str) -> None:
    """Register the routes on the FastAPI app that Gradio runs."""

    def models(request: Request) -> JSONResponse:
        try:
            _authorize(request, service)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": 0, "owned_by": "minicpmv-demo"}]})

    def chat_completions(request: Request, body: dict):
        try:
            _authorize(request, service)
            # The same bound as Gradio's --queue-size: beyond it, "busy" instead of a long wait.
            if service.engine.state()["queue_depth"] >= service.settings.queue_size:
                raise ApiError(503, "The server is busy. Please try again.", "server_busy")
            stream = _submit(service, body)
        except ApiError as exc:
            return _error(exc)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            # The background task also runs when the client hangs up before the first chunk.
            return StreamingResponse(_sse(stream, completion_id, model_name, service),
                                     media_type="text/event-stream", background=BackgroundTask(stream.cancel))
        try:
            text = stream.result()
        except ReplyError as exc:
            return _error(ApiError(500, str(exc), "server_error"))
        finally:
            stream.cancel()
        return JSONResponse(_completion(completion_id, model_name, text, stream))

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])


def _authorize(request: Request, service: ChatService) -> None:
    """With --auth, the API key. `HttpGuard` checks it already, before the body is read; this
    check keeps the routes closed on an app without the guard."""
    pair = service.settings.auth_pair
    if pair is not None and not api_key_ok(request.headers.get("authorization", ""), pair):
        raise ApiError(401, "Missing or wrong API key: use the password given with --auth.", "authentication_error")


def _submit(service: ChatService, body: dict) -> ReplyStream:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list.")
    params = service.params(body.get("max_tokens") or body.get("max_completion_tokens")
                            or service.settings.default_new_tokens,
                            body.get("temperature", 1.0), body.get("top_p", 1.0))
    scratch = tempfile.mkdtemp(prefix="openai-", dir=_scratch_root())
    try:
        system, history = [], []
        for message in messages:
            role = message.get("role") if isinstance(message, dict) else None
            if role in ("system", "developer"):
                system.append(_text_only(message.get("content")))
            elif role in ("user", "assistant"):
                history.append({"role": role, "content": _parts(message.get("content"), scratch)})
            else:
                raise ApiError(400, f"Unsupported message role: {role!r}.")
        if not history or history[-1]["role"] != "user":
            raise ApiError(400, "The last message must be the user's.")
        texts, files = content_parts(history.pop()["content"])
        question = {"text": "\n".join(texts), "files": files}
        try:
            stream, _ = service.submit(question, history, params, "\n".join(system))
        except InputError as exc:
            raise ApiError(400, str(exc)) from None
        return stream
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # images are decoded into memory by now


def _scratch_root() -> str:
    """Decoded data URLs live briefly in the upload folder, the only place images may come from."""
    root = os.path.join(upload_root(), "openai")
    os.makedirs(root, exist_ok=True)
    return root


def _text_only(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _parts(content, scratch: str) -> list[dict]:
    """OpenAI content parts as the chat input reader wants them: text and file parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(400, "Message content must be a string or a list of parts.")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            parts.append({"type": "file", "file": {"path": _image_path(url, scratch)}})
        else:
            raise ApiError(400, f"Unsupported content part: {kind!r} (use 'text' or 'image_url').")
    return parts


def _image_path(url: str, scratch: str) -> str:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or len(payload) > MAX_DATA_URL_BYTES * 4 // 3 + 4:
            raise ApiError(400, "Images must be base64 data URLs (data:image/png;base64,...) of at most 30 MB.")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "An image data URL is not valid base64.") from None
        path = os.path.join(scratch, f"image-{uuid.uuid4().hex}")
        with open(path, "wb") as file:
            file.write(data)
        return path
    marker = "file="
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https") and marker in parsed.path:
        return unquote(parsed.path.split(marker, 1)[1])  # checked against the upload folder later
    raise ApiError(400, "image_url must be a data: URL or the URL of a file uploaded to this server.")


def _sse(stream: ReplyStream, completion_id: str, model: str, service: ChatService) -> Iterator[str]:
    """Server-sent events in OpenAI's chunk format; a client that hangs up cancels the request."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    sent = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        for text in stream.updates(service.current_stream_interval):
            yield chunk({"content": text[len(sent):]})
            sent = text
        yield chunk({}, _finish_reason(stream))
    except ReplyError as exc:
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
    finally:
        stream.cancel()
    yield "data: [DONE]\n\n"


def _finish_reason(stream: ReplyStream) -> str:
    stats = stream.stats
    return "length" if stats is not None and stats.finish_reason == FinishReason.LENGTH else "stop"


def _completion(completion_id: str, model: str, text: str, stream: ReplyStream) -> dict:
    tokens = stream.stats.tokens if stream.stats else 0
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _finish_reason(stream)}],
            "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}}


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": str(exc), "type": exc.kind}}, status_code=exc.status)
