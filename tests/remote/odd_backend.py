"""A real HTTP server on loopback that answers like a broken or hostile OpenAI-compatible backend.

`OddBackend.models` is what `/v1/models` answers (status and body), `chat` how
`/v1/chat/completions` behaves: "keepalive" (SSE comments, never a token), "endless" (tokens
without end), "huge error" (a 500 whose body goes on for 256 MB), "long line" (a stream
line without end). Bodies are produced as they are sent, so the server never holds them; it
counts what it managed to send, which tells a test how much the client read.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GOOD_MODELS = json.dumps({"object": "list", "data": [{"id": "odd", "object": "model", "owned_by": "odd-server"}]})
PIECE = 64 * 1024
SENT_AT_MOST = 256 * 1024 * 1024  # every endless answer ends here, whatever the client does


class OddBackend:
    def __init__(self) -> None:
        self.models: tuple[int, bytes | str] = (200, GOOD_MODELS)
        self.chat = "endless"
        self.sent = 0  # bytes of chat answers sent so far
        self.closed_by_client = threading.Event()  # the client hung up on a chat answer
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def chat_answer(self) -> tuple[int, Iterator[bytes]]:
        if self.chat == "huge error":
            return 500, _repeat(b'{"error": {"message": "' + b"x" * PIECE)
        if self.chat == "long line":
            return 200, _repeat(b"data: {" + b"x" * PIECE)
        if self.chat == "keepalive":
            return 200, _keepalive()
        return 200, _endless_tokens()


def _repeat(first: bytes) -> Iterator[bytes]:
    yield first
    filler = b"x" * PIECE
    while True:
        yield filler


def _keepalive() -> Iterator[bytes]:
    while True:
        yield b": keep-alive\n\n"
        time.sleep(0.02)


def _endless_tokens() -> Iterator[bytes]:
    index = 0
    while True:
        chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "odd",
                 "choices": [{"index": 0, "delta": {"content": f" w{index}"}, "finish_reason": None}]}
        yield f"data: {json.dumps(chunk)}\n\n".encode()
        index += 1


def _handler(backend: OddBackend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # bodies end when the connection closes

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/v1/models":
                self._answer(404, [b'{"error": {"message": "no such route"}}'])
                return
            status, body = backend.models
            self._answer(status, [body.encode() if isinstance(body, str) else body])

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            status, pieces = backend.chat_answer()
            self._answer(status, pieces, chat=True, content_type="text/event-stream" if status == 200 else None)

        def _answer(self, status: int, pieces, chat: bool = False, content_type: str | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type or "application/json")
            self.send_header("connection", "close")
            self.end_headers()
            try:
                for piece in pieces:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    if chat:
                        backend.sent += len(piece)
                        if backend.sent > SENT_AT_MOST:
                            break
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                if chat:
                    backend.closed_by_client.set()

    return Handler
