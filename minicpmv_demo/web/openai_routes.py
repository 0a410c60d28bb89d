"""OpenAI-compatible routes (`POST /v1/chat/completions`, `GET /v1/models`) on the same server.

Many users already have OpenAI clients. These routes go through the same `ChatService` as the
page, so API requests are batched with UI users in the one engine, and obey the same input
checks, limits and login. Images come as `image_url` parts and videos as `video_url` parts:
`data:` URLs, or URLs of files uploaded to this server (`.../gradio_api/file=<path>`).

Reasoning follows vLLM's conventions, so clients move between servers unchanged: a request
switches it with `chat_template_kwargs: {"enable_thinking": true|false}`; a reply carries it in
`reasoning_content` beside `content` (stream deltas carry one or the other); reasoning that a
client sends back in earlier assistant messages is never shown to the model. Every reply has
`usage`; a stream sends it in a last chunk when asked (`stream_options: {"include_usage": true}`).
Visual settings follow them too: `mm_processor_kwargs: {"downsample_mode": "16x"|"4x",
"max_slice_nums": N, "max_num_frames": N}`. `stop` strings end a reply before them (see
stop_text.py); what the server does not do (tools, JSON formats, several choices, another
model) is refused by name (see openai_fields.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from urllib.parse import unquote, urlparse

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from .admission import Busy
from .api_errors import ApiError, error_response
from .openai_fields import check_model, refuse_unsupported, request_seed, stop_strings
from .stop_text import StopText
from ..intake.message import InputError, content_parts
from .chat_service import ChatService, upload_root
from ..engine import FinishReason, ReplyError, ReplyStream, SamplingParams
from .http_guard import api_key_ok
from ..engine.reasoning import split_reasoning
from ..intake.videos import VIDEO_MIME_SUFFIXES

MAX_DATA_URL_BYTES = 30 * 1024 * 1024
# Seconds a client told "busy" is asked to wait before trying again.
RETRY_AFTER_S = 2
# Threads that read and encode API requests at once.
READER_THREADS = 4
# How often a request waiting for its reply checks that its client is still there.
DISCONNECT_CHECK_S = 0.25
# The `mm_processor_kwargs` this server reads; the numbers must be whole numbers.
MM_PROCESSOR_KWARGS = ("downsample_mode", "max_slice_nums", "max_num_frames")


def add_openai_routes(app: FastAPI, service: ChatService, model_name: str, aliases: tuple[str, ...] = ()) -> None:
    """Register the routes on the FastAPI app that Gradio runs; the model answers to its name
    and to `aliases` (all listed by /v1/models), and replies name it `model_name`.

    The handlers are `async`: a request waiting for its turn or its reply holds no worker
    thread (250 waiting clients must not starve `/health` or the page); only the reading of its
    images and the encoding of its chat run on a thread.
    """

    # Reading images and encoding chats is CPU work under one interpreter lock: a few threads do
    # it as fast as many, and leave the server's other threads (and /health) room to answer.
    readers = anyio.CapacityLimiter(READER_THREADS)
    names = tuple(dict.fromkeys((model_name, *aliases)))

    def models(request: Request) -> JSONResponse:
        try:
            _authorize(request, service)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "minicpmv-demo"} for name in names]})

    async def chat_completions(request: Request):
        try:
            _authorize(request, service)
            body = await _json_body(request)
            check_model(body, names)
            refuse_unsupported(body)
            streaming = _options(body)
            include_usage = _include_usage(body)
            stop = StopText(stop_strings(body))
            exit_gate = await service.gate.enter()
        except Busy:
            return error_response(ApiError(503, "The server is busy. Please try again in a moment.", "server_busy"),
                                  headers={"Retry-After": str(RETRY_AFTER_S)})
        except ApiError as exc:
            return error_response(exc)
        try:
            stream = await anyio.to_thread.run_sync(_submit, service, body, exit_gate, limiter=readers)
        except ApiError as exc:
            return error_response(exc)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if streaming:
            # The background task also runs when the client hangs up before the first chunk.
            return StreamingResponse(_sse(stream, completion_id, model_name, service, request, include_usage, stop),
                                     media_type="text/event-stream", background=BackgroundTask(stream.cancel))
        try:
            if not await _ended(stream, request, stop, service):
                return error_response(ApiError(499, "The client closed the request.", "cancelled"))
            text = stop.visible(stream.result(timeout=0), ended=True)
        except ReplyError as exc:
            # A request the engine or the backend refused is the client's to change (a 500 would
            # be retried unchanged by the openai SDK).
            return error_response(ApiError(400, str(exc)) if exc.refused else ApiError(500, str(exc), "server_error"))
        finally:
            stream.cancel()  # no-op once finished; frees the row of a client that left
        return JSONResponse(_completion(completion_id, model_name, text, stream, stop))

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])


async def _json_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The request body must be JSON.") from None
    except RecursionError:  # the parser's own limit (about 1,000 levels); no request needs that
        raise ApiError(400, "The request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _options(body: dict) -> bool:
    """Check the options this server reads besides the messages; returns whether to stream."""
    streaming = body.get("stream", False)
    if not isinstance(streaming, bool) and streaming is not None:
        raise ApiError(400, "'stream' must be true or false.")
    choices = body.get("n", 1)
    if choices not in (None, 1) or isinstance(choices, bool):
        raise ApiError(400, f"'n' must be 1: this server returns one choice per request (got {str(choices)[:40]!r}).",
                       param="n")
    return bool(streaming)


def _include_usage(body: dict) -> bool:
    """`stream_options.include_usage`: a stream's last chunk carries the usage, as OpenAI sends it."""
    options = body.get("stream_options") or {}
    include = options.get("include_usage") if isinstance(options, dict) else "not an object"
    if include is not None and not isinstance(include, bool):
        raise ApiError(400, "'stream_options' must look like {\"include_usage\": true}.")
    return bool(include)


def _thinking_switch(body: dict) -> bool | None:
    """`chat_template_kwargs.enable_thinking` (vLLM's switch); None when not sent: the model's
    default. The template's other variables are not the client's to set, so they are ignored."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, "'chat_template_kwargs' must be an object, e.g. {\"enable_thinking\": false}.")
    switch = kwargs.get("enable_thinking")
    if switch is not None and not isinstance(switch, bool):
        raise ApiError(400, f"'chat_template_kwargs.enable_thinking' must be true or false, not {str(switch)[:40]!r}.")
    return switch


class _EndSignal:
    """The reply's end, awaitable on the event loop: a waiting request holds no thread."""

    def __init__(self, stream: ReplyStream) -> None:
        loop = asyncio.get_running_loop()
        self._ended = asyncio.Event()
        stream.when_done(lambda: loop.call_soon_threadsafe(self._ended.set))

    async def wait(self, seconds: float) -> bool:
        """Whether the reply ended within `seconds`."""
        try:
            await asyncio.wait_for(self._ended.wait(), seconds)
        except TimeoutError:
            pass
        return self._ended.is_set()


async def _ended(stream: ReplyStream, request: Request, stop: StopText, service: ChatService) -> bool:
    """Wait for the reply's end; False (and the request cancelled) if the client hung up
    first, so its row does not go on generating for nobody. A stop string ends the reply early:
    it is looked for as often as a stream is updated."""
    end = _EndSignal(stream)
    while not await end.wait(service.current_stream_interval() if stop.stops else DISCONNECT_CHECK_S):
        if await request.is_disconnected():
            stream.cancel()
            return False
        _cancel_at_stop(stream, stop)
    return True


def _cancel_at_stop(stream: ReplyStream, stop: StopText) -> None:
    """Once a stop string has come, the rest of the reply is for nobody: the engine drops it."""
    stop.visible(stream.text)
    if stop.stopped:
        stream.cancel()


def _authorize(request: Request, service: ChatService) -> None:
    """With --auth, the API key. `HttpGuard` checks it already, before the body is read; this
    check keeps the routes closed on an app without the guard."""
    pair = service.settings.auth_pair
    if pair is not None and not api_key_ok(request.headers.get("authorization", ""), pair):
        raise ApiError(401, "Missing or wrong API key: use the password given with --auth.", "authentication_error")


def _submit(service: ChatService, body: dict, exit_gate: Callable[[], None]) -> ReplyStream:
    """Read the messages (images decoded, chat encoded) and queue the reply; runs on a thread.

    `exit_gate` is called when the reply ends, or at once if it never starts.
    """
    try:
        return _read_and_submit(service, body, exit_gate)
    except BaseException:
        exit_gate()
        raise


def _read_and_submit(service: ChatService, body: dict, exit_gate: Callable[[], None]) -> ReplyStream:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list.")
    params = _sampling(service, body)
    try:
        options = service.options(enable_thinking=_thinking_switch(body), **_mm_processor_kwargs(body))
    except InputError as exc:
        raise ApiError(400, str(exc)) from None
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
                raise ApiError(400, f"Unsupported message role: {str(role)[:40]!r}.")
        if not history or history[-1]["role"] != "user":
            raise ApiError(400, "The last message must be the user's.")
        texts, files = content_parts(history.pop()["content"])
        question = {"text": "\n".join(texts), "files": files}
        try:
            stream, _ = service.submit(question, history, params, "\n".join(system), options=options,
                                       exit_gate=exit_gate)
        except InputError as exc:
            raise ApiError(400, str(exc)) from None
        if stream.done and stream.refused:  # refused at the door (a prompt longer than the context)
            raise ApiError(400, stream.error or "The request was refused.")
        return stream
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # pictures and video frames are in memory by now


def _mm_processor_kwargs(body: dict) -> dict:
    """The request's visual settings from `mm_processor_kwargs` (vLLM's field), for
    `service.options` (which clamps the numbers like the page's and refuses a bad detail mode);
    400 for a key this server does not read or a number that is not a whole number."""
    kwargs = body.get("mm_processor_kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, "'mm_processor_kwargs' must be an object, e.g. {\"downsample_mode\": \"4x\"}.")
    unknown = sorted(set(kwargs) - set(MM_PROCESSOR_KWARGS))
    if unknown:
        raise ApiError(400, f"Unsupported mm_processor_kwargs: {', '.join(map(str, unknown))[:80]} "
                            f"(this server reads {', '.join(MM_PROCESSOR_KWARGS)}).")
    for name in ("max_slice_nums", "max_num_frames"):
        value = kwargs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ApiError(400, f"mm_processor_kwargs.{name} must be a whole number, not {str(value)[:40]!r}.")
    return dict(kwargs)


def _sampling(service: ChatService, body: dict) -> SamplingParams:
    """The request's sampling settings: OpenAI's, plus `top_k` and `repetition_penalty` as extra
    body fields (as vLLM takes them; top_k -1 or 0 is off). What the client leaves out is the
    server's default, which is the checkpoint's own (`ChatService.defaults`), as vLLM does."""
    try:
        params = service.params(_first_given(body, "max_tokens", "max_completion_tokens"), body.get("temperature"),
                                body.get("top_p"), body.get("top_k"), body.get("repetition_penalty"))
    except InputError as exc:
        raise ApiError(400, str(exc)) from None
    return replace(params, seed=request_seed(body))


def _first_given(body: dict, *names: str):
    """The first of `names` the client sent (None when none was): 0 is sent, not missing."""
    return next((body[name] for name in names if body.get(name) is not None), None)


def _scratch_root() -> str:
    """Decoded data URLs live briefly in the upload folder, the only place images may come from."""
    root = os.path.join(upload_root(), "openai")
    os.makedirs(root, exist_ok=True)
    return root


def _text_only(content) -> str:
    """A system message's text: a string, or the text parts of a list."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "\n".join(_part_text(part) for part in content if isinstance(part, dict) and part.get("type") == "text")
    raise ApiError(400, "A system message's content must be a string or a list of text parts.")


def _part_text(part: dict) -> str:
    text = part.get("text", "")
    if not isinstance(text, str):
        raise ApiError(400, "A text part's 'text' must be a string.")
    return text


def _parts(content, scratch: str) -> list[dict]:
    """OpenAI content parts as the chat input reader wants them: text and file parts (a video's
    file keeps a video suffix, which is how the reader tells it from a picture)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(400, "Message content must be a string or a list of parts.")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _part_text(part)})
        elif kind in ("image_url", "video_url"):
            media, example = ("image", "data:image/png;base64,...") if kind == "image_url" else (
                "video", "data:video/mp4;base64,...")
            wrapper = part.get(kind)
            url = wrapper.get("url") if isinstance(wrapper, dict) else None
            if not isinstance(url, str):
                raise ApiError(400, f"A {kind} part must look like {{\"{kind}\": {{\"url\": \"{example}\"}}}}.")
            parts.append({"type": "file", "file": {"path": _file_path(url, scratch, media)}})
        else:
            raise ApiError(400, f"Unsupported content part: {str(kind)[:40]!r} "
                                "(use 'text', 'image_url' or 'video_url').")
    return parts


def _file_path(url: str, scratch: str, media: str) -> str:
    """Where the file of an `image_url` or `video_url` lies: a data URL is written to `scratch`
    (a video with the suffix of its type), a URL of this server's uploads names its file."""
    if url.startswith("data:"):
        return _write_data_url(url, scratch, media)
    marker = "file="
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https") and marker in parsed.path:
        return unquote(parsed.path.split(marker, 1)[1])  # checked against the upload folder later
    raise ApiError(400, f"{media}_url must be a data: URL or the URL of a file uploaded to this server.")


def _write_data_url(url: str, scratch: str, media: str) -> str:
    header, _, payload = url.partition(",")
    example = "data:image/png;base64,..." if media == "image" else "data:video/mp4;base64,..."
    if ";base64" not in header or len(payload) > MAX_DATA_URL_BYTES * 4 // 3 + 4:
        raise ApiError(400, f"{media.capitalize()}s must be base64 data URLs ({example}) of at most 30 MB.")
    suffix = ""
    if media == "video":
        mime = header[len("data:"):].split(";", 1)[0].strip().lower()
        if mime not in VIDEO_MIME_SUFFIXES:
            raise ApiError(400, f"Videos must be {', '.join(VIDEO_MIME_SUFFIXES)} data URLs, not {mime[:40]!r}.")
        suffix = VIDEO_MIME_SUFFIXES[mime]
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"The {media} data URL is not valid base64.") from None
    path = os.path.join(scratch, f"{media}-{uuid.uuid4().hex}{suffix}")
    with open(path, "wb") as file:
        file.write(data)
    return path


class _ReplyDeltas:
    """What a streamed reply added since the last chunk, its reasoning apart from its answer:
    reasoning deltas carry `reasoning_content`, answer deltas `content`, as vLLM streams them."""

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking  # the prompt opened `<think>`: the reply starts as reasoning
        self.sent = {"reasoning_content": "", "content": ""}

    def new(self, text: str) -> list[dict]:
        """Deltas for the reply so far, `text` (a part held back while a tag arrives is sent later)."""
        parts = split_reasoning(text, self.thinking)
        deltas = []
        for key, now in (("reasoning_content", parts.reasoning or ""), ("content", parts.answer)):
            if len(now) > len(self.sent[key]):
                deltas.append({key: now[len(self.sent[key]):]})
                self.sent[key] = now
        return deltas


async def _sse(stream: ReplyStream, completion_id: str, model: str, service: ChatService,
               request: Request, include_usage: bool, stop: StopText) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; a client that hangs up cancels the request.

    Tokens are coalesced like the page's (one chunk per stream interval at most); the end is
    sent as soon as it happens.
    """
    created = int(time.time())

    def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    deltas = _ReplyDeltas(stream.thinking)
    end = _EndSignal(stream)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            ended = await end.wait(service.current_stream_interval())
            if await request.is_disconnected():
                return  # the client left: `finally` frees its row
            for delta in deltas.new(stop.visible(stream.text, ended)):
                yield chunk(delta)
            _cancel_at_stop(stream, stop)
            if ended:
                break
        stream.result(timeout=0)  # raises the engine's error, if any
        yield chunk({}, _finish_reason(stream, stop))
        if include_usage:
            yield chunk(None, usage=_usage(stream))  # OpenAI's shape: no choices, the usage
    except ReplyError as exc:
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
    finally:
        stream.cancel()
    yield "data: [DONE]\n\n"


def _finish_reason(stream: ReplyStream, stop: StopText) -> str:
    stats = stream.stats
    long = not stop.stopped and stats is not None and stats.finish_reason == FinishReason.LENGTH
    return "length" if long else "stop"


def _completion(completion_id: str, model: str, text: str, stream: ReplyStream, stop: StopText) -> dict:
    parts = split_reasoning(text, stream.thinking)
    message = {"role": "assistant", "content": parts.answer, "reasoning_content": parts.reasoning}
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(stream, stop)}],
            "usage": _usage(stream)}


def _usage(stream: ReplyStream) -> dict:
    """Tokens read (the encoded prompt, pictures' tokens included) and written (reasoning
    included, the stop token not) by one finished reply. A reply cut at a stop string counts
    what was generated until the engine dropped it: the stop string, and the few tokens after it
    made within one stream interval, before the cut was seen."""
    completion = stream.stats.tokens if stream.stats else 0
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": completion,
            "total_tokens": stream.prompt_tokens + completion}

