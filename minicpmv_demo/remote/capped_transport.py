"""The backend client's HTTP transport, which never reads more of an answer than it can use.

The `openai` client reads an error answer's whole body to quote it, and buffers a streamed
line until its newline: a backend (or whatever answers at its address) that sends a 500 with
10 GB, or a stream line that never ends, would have it all in memory. Under the client, this
transport cuts an error body after a few KB (the client quotes the start) and ends a stream
whose line grows past a bound with a protocol error, which fails that reply alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

# Bytes of an error answer read: the OpenAI-style message a user sees is at its start.
ERROR_BODY_BYTES = 4096
# One line of a streamed reply: a chunk is a few hundred bytes of JSON around a token or two.
STREAM_LINE_BYTES = 256 * 1024


class CappedTransport(httpx.AsyncBaseTransport):
    """`inner` with every answer's body capped as said in the module's docstring."""

    def __init__(self, inner: httpx.AsyncBaseTransport, error_bytes: int = ERROR_BODY_BYTES,
                 line_bytes: int = STREAM_LINE_BYTES) -> None:
        self.inner, self.error_bytes, self.line_bytes = inner, error_bytes, line_bytes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = response.stream  # an AsyncByteStream: this transport is only used by async clients
        if response.status_code >= 400:
            response.stream = _Truncated(body, self.error_bytes)
        else:
            response.stream = _LineLimited(body, self.line_bytes)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Truncated(httpx.AsyncByteStream):
    """The first `limit` bytes of a body; the rest is never read (the connection is dropped)."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int) -> None:
        self.inner, self.limit = inner, limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        left = self.limit
        async for piece in self.inner:
            yield piece[:left]
            left -= len(piece)
            if left <= 0:
                break

    async def aclose(self) -> None:
        await self.inner.aclose()


class _LineLimited(httpx.AsyncByteStream):
    """The body as it comes, failed once a line (bytes between newlines) passes `limit`."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int) -> None:
        self.inner, self.limit = inner, limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        line = 0  # bytes since the last newline
        async for piece in self.inner:
            newline = piece.rfind(b"\n")
            line = len(piece) - newline - 1 if newline >= 0 else line + len(piece)
            if line > self.limit:
                raise httpx.RemoteProtocolError(f"the backend sent a line longer than {self.limit // 1024} KB")
            yield piece

    async def aclose(self) -> None:
        await self.inner.aclose()
