"""The engine's place taken by a remote OpenAI-compatible server (`--backend URL`).

Front ends cannot tell the difference: `submit` returns the same `ReplyStream`, which fills as
the backend streams; `cancel` on it (Stop, a closed tab, an API client hanging up) closes the
upstream stream, which is how vLLM, SGLang and this app free the row. Requests are I/O here, not
model work, so they run as tasks of one asyncio loop on a daemon thread, each independent: a
slow or failing reply never holds up another.

A backend is trusted with nothing it could use to hold this server: each reply has an overall
deadline (a stream of keep-alives never ends by itself), reading stops at the token count that
was asked for (a stream without end), and no answer is read past a bound (capped_transport.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx
import openai

try:  # openai 3.x runs on httpx2; a transport error it does not wrap is one of those
    import httpx2

    HTTP_ERRORS: tuple[type[BaseException], ...] = (httpx.HTTPError, httpx2.HTTPError)
except ImportError:  # openai 2.x: httpx alone
    HTTP_ERRORS = (httpx.HTTPError,)

from ..intake.conversation import Conversation
from ..engine import FinishReason, ReplyStats, ReplyStream, SamplingParams
from ..engine.contract import BackendState, EngineState
from ..engine.meter import TokenMeter
from ..engine.reasoning import THINK_CLOSE, THINK_OPEN
from .capped_transport import CappedTransport
from .probe import BackendProbe
from .wire import request_body

log = logging.getLogger(__name__)

# How often a running reply looks at its stream's cancel flag (set from another thread).
CANCEL_CHECK_S = 0.2
# Stream chunks read beyond the tokens asked for: the role's first chunk, the finish and the
# usage come without a token. (Servers send one chunk per token or fewer.)
CHUNK_SLACK = 8
# Characters of text per token asked for, at most: the longest tokens of real vocabularies
# (runs of spaces or punctuation) are far shorter.
MAX_CHARS_PER_TOKEN = 256

FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}


class RemoteEngine:
    """Sends each request to the backend; keeps the local bookkeeping the page shows."""

    def __init__(self, probe: BackendProbe, *, api_key: str = "", timeout_s: float = 60.0,
                 reply_seconds: float = 600.0, max_batch: int = 64) -> None:
        """`timeout_s`: the most the backend may keep silent (to connect, to start, between two
        pieces); `reply_seconds`: the most one reply may take in all."""
        self.probe = probe
        self.max_batch = max_batch  # the page says "up to N users at once": the backend decides
        self.reads_video = True  # sent on as clips; a backend that cannot read them says so
        self.restarts = 0
        self._timeout_s = timeout_s
        self._reply_seconds = reply_seconds
        self._api_key = api_key or "none"  # the client insists on one; servers without keys ignore it
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._active = 0
        self._lock = threading.Lock()
        self.meter = TokenMeter()  # the panel's tokens/s, counted as the local engine counts

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> RemoteEngine:
        """Start the client's loop thread; raises BackendClientError (one line) if the installed
        `openai` cannot build a client, instead of every chat failing later."""
        self._thread = threading.Thread(target=self._loop.run_forever, name="backend-client", daemon=True)
        self._thread.start()
        try:
            self._client = asyncio.run_coroutine_threadsafe(self._make_client(), self._loop).result()
        except Exception as exc:  # noqa: BLE001 - any failure here is a broken install, said in one line
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise BackendClientError(
                f"the installed openai {openai.__version__} cannot build its client ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); install the locked versions with "
                "`pip install -r requirements.txt` (or `make run`)") from None
        return self

    async def _make_client(self) -> openai.AsyncOpenAI:
        # A plain number of seconds: openai 2.x (httpx) and 3.x (httpx2) both take one, while each
        # refuses the other HTTP stack's Timeout object. Both take an httpx client, which carries
        # the capped transport; its limits are the SDK's own defaults.
        transport = CappedTransport(httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100)))
        http_client = httpx.AsyncClient(transport=transport, timeout=self._timeout_s, follow_redirects=True)
        return openai.AsyncOpenAI(base_url=self.probe.base_url, api_key=self._api_key, timeout=self._timeout_s,
                                  max_retries=0, http_client=http_client)

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self.probe.stop()

    @property
    def alive(self) -> bool:
        return self.probe.status.reachable

    # -- the handlers' side --------------------------------------------------------------------
    def submit(self, conversation: Conversation, params: SamplingParams) -> ReplyStream:
        """Start streaming a reply from the backend; returns at once with the stream."""
        stream = ReplyStream()
        with self._lock:
            self._active += 1
        asyncio.run_coroutine_threadsafe(self._reply(conversation, params, stream), self._loop)
        return stream

    @property
    def active_rows(self) -> int:
        return self._active

    def state(self) -> EngineState:
        """What the local engine reports, from the backend's last answer where it gave one."""
        status = self.probe.status
        return EngineState(
            alive=status.reachable,
            queue_depth=status.queue_depth if status.queue_depth is not None else 0,
            batch_size=status.batch_size if status.batch_size is not None else self._active,
            batch_ceiling=status.batch_ceiling or self.max_batch,
            max_batch=status.batch_ceiling or self.max_batch,
            tokens_per_s=self.meter.per_second(), cache_hits=0, restarts=self.restarts,
            backend=BackendState(url=self.probe.base_url, reachable=status.reachable, error=status.error,
                                 kind=status.kind, model=status.model))

    # -- the loop's side -----------------------------------------------------------------------
    async def _reply(self, conversation: Conversation, params: SamplingParams, stream: ReplyStream) -> None:
        reader = asyncio.ensure_future(self._stream_reply(conversation, params, stream))
        deadline = time.monotonic() + self._reply_seconds
        try:
            while not reader.done():
                await asyncio.wait({reader}, timeout=CANCEL_CHECK_S)
                late = time.monotonic() > deadline
                if (stream.cancelled or late) and not reader.done():
                    reader.cancel()  # closes the HTTP response: the backend frees the row
            if reader.cancelled() and not stream.cancelled:
                raise ReplyTooLong(self._reply_seconds)
            if reader.cancelled():
                stream.finish(ReplyStats(tokens=0, seconds=time.perf_counter() - stream.submitted_at,
                                         batch_size=1, peak_memory_mb=None, finish_reason=FinishReason.CANCELLED))
            else:
                reader.result()
        except Exception as exc:  # noqa: BLE001 - every failure becomes this one reply's message
            if not stream.done:
                stream.fail(failure_message(exc), refused=refused_by_backend(exc))
        finally:
            with self._lock:
                self._active -= 1

    async def _stream_reply(self, conversation: Conversation, params: SamplingParams, stream: ReplyStream) -> None:
        # Blocking work (a probe's HTTP call, encoding pictures and videos) runs off the loop,
        # which every other reply's stream shares.
        model = self.probe.status.model or (await asyncio.to_thread(self.probe.poll)).model
        if not model:
            raise BackendDown(self.probe.status.error or "no model")
        body = await asyncio.to_thread(request_body, conversation, params, model)
        extra = {key: body.pop(key) for key in list(body) if key not in STANDARD_FIELDS}
        started = time.perf_counter()
        counted, usage_tokens, finish, thinking = 0, None, FinishReason.STOP, False
        chunks, most_chars = 0, params.max_new_tokens * MAX_CHARS_PER_TOKEN
        response = await self._client.chat.completions.create(**body, extra_body=extra or None)
        async with response:
            async for chunk in response:
                chunks += 1
                if chunks > params.max_new_tokens + CHUNK_SLACK or len(stream.text) > most_chars:
                    finish = FinishReason.LENGTH  # the backend went on past what was asked
                    break
                if chunk.usage is not None:
                    usage_tokens = chunk.usage.completion_tokens
                    stream.prompt_tokens = chunk.usage.prompt_tokens
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = choice.delta
                reasoning = _reasoning(delta)
                if reasoning:
                    if not thinking:
                        stream.append(THINK_OPEN)
                        thinking = True
                    stream.append(reasoning)
                if delta.content:
                    if thinking:
                        stream.append(THINK_CLOSE)
                        thinking = False
                    stream.append(delta.content)
                if reasoning or delta.content:
                    self.meter.count(1)  # servers stream about one token per chunk
                    counted += 1
                if choice.finish_reason:
                    finish = FINISH_REASONS.get(choice.finish_reason, FinishReason.STOP)
        stream.finish(ReplyStats(tokens=counted if usage_tokens is None else usage_tokens, seconds=time.perf_counter() - started,
                                 batch_size=max(1, self.probe.status.batch_size or 1),
                                 peak_memory_mb=None, finish_reason=finish))


# What the `openai` client takes as keyword arguments; everything else goes in `extra_body`.
STANDARD_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "temperature", "top_p",
                             "seed"})


class BackendDown(RuntimeError):
    """The backend could not be asked at all."""


class ReplyTooLong(RuntimeError):
    """The reply passed its overall deadline (--backend-reply-seconds)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"more than {seconds:g} s in all")


class BackendClientError(RuntimeError):
    """The OpenAI client cannot be built with the installed packages; str() says what to do."""


def _reasoning(delta) -> str:
    """vLLM's `reasoning_content` (newer servers also say `reasoning`) from a stream delta."""
    extra = delta.model_extra or {}
    return extra.get("reasoning_content") or extra.get("reasoning") or ""


def refused_by_backend(exc: BaseException) -> bool:
    """The backend refused the request itself (a 4xx other than rate limits and timeouts): it
    would refuse it again unchanged, so an API passes the refusal on as a 400."""
    return (isinstance(exc, openai.APIStatusError) and 400 <= exc.status_code < 500
            and exc.status_code not in (408, 409, 429))


def failure_message(exc: BaseException) -> str:
    """What the user reads when the backend failed this reply."""
    if isinstance(exc, BackendDown):
        return f"The model server is not reachable ({exc}). Please try again in a moment."
    if isinstance(exc, ReplyTooLong):
        return f"The model server took too long to answer ({exc}), so the reply was stopped. Please try again."
    if isinstance(exc, openai.RateLimitError) or (isinstance(exc, openai.APIStatusError) and exc.status_code == 503):
        return "The model server is busy right now. Please try again in a moment."
    if isinstance(exc, openai.APITimeoutError):
        return "The model server took too long to answer. Please try again."
    if isinstance(exc, openai.APIConnectionError):
        return "The connection to the model server was lost. Please try again in a moment."
    if isinstance(exc, openai.APIStatusError):
        detail = _error_detail(exc)
        if 400 <= exc.status_code < 500:
            return f"The model server refused this request: {detail}"
        return f"The model server failed ({exc.status_code}): {detail}. Please try again."
    if isinstance(exc, (*HTTP_ERRORS, openai.APIError)):
        return "The connection to the model server was lost. Please try again in a moment."
    log.exception("backend reply failed", exc_info=exc)
    return "Something went wrong while talking to the model server. Please try again."


def _error_detail(exc: openai.APIStatusError) -> str:
    """The server's own words: OpenAI-style bodies nest them in `error.message`."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    return str(error.get("message") or exc.message)[:300]
