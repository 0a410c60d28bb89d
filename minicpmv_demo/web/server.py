"""Assembling the demo: model -> engine -> UI, and launching it with the settings' limits.

`app.py` (the command line) and the tests build the app the same way, through `build_app`.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from dataclasses import asdict, dataclass

import anyio
import gradio as gr
import torch
from fastapi.responses import JSONResponse
from starlette.middleware import Middleware

from .chat_service import ChatService
from ..engine import Engine
from ..engine.contract import ServingEngine
from ..system.gpu import GpuMemory
from .http_guard import HttpGuard
from ..model import LoadedModel, load_model
from ..system.monitor import ServerMonitor
from .openai_routes import add_openai_routes
from ..system.process_memory import return_large_blocks_on_free
from ..remote import BackendClientError, BackendProbe, RemoteEngine
from ..remote.memory import BackendMemory
from ..config.settings import Settings
from .page import build_ui
from .page_sessions import keep_sessions_lean
from .style import FAVICON, page_css, page_head
from ..system.zerogpu import zerogpu_batch_call

log = logging.getLogger(__name__)

SHARE_WARNING = ("WARNING: --share makes this demo public (anyone with the link can use it) and no "
                 "--auth is set. Add --auth user:password to require a login.")


@dataclass
class App:
    settings: Settings
    loaded: LoadedModel
    engine: ServingEngine
    demo: gr.Blocks
    monitor: ServerMonitor
    service: ChatService

    def launch(self, block: bool = False, **overrides):
        """Start serving; returns what `Blocks.launch` returns (app, local url, share url).

        With `block`, serve until interrupted (the command line); otherwise return at once.
        """
        settings = self.settings
        warning = share_warning(settings)
        if warning:
            log.warning(warning)
            print(warning, flush=True)
        options = {
            # None lets Gradio apply GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (Spaces sets them).
            "server_name": settings.host or None,
            "server_port": settings.port or None,
            "share": settings.share,
            "auth": settings.auth_pair,
            "max_file_size": int(settings.max_upload_mb * 1024 * 1024),  # a picture or a video
            # A streaming event holds a worker thread for its whole reply.
            "max_threads": settings.concurrency + 16,
            # Refusals raised inside Gradio itself (a file path that was never uploaded, a value
            # a component cannot read) reach the client with their text instead of a bare "Error".
            # Our own handlers turn every failure into a message of their own.
            "show_error": True,
            # Given to FastAPI when Gradio creates the app: Starlette builds its middleware stack on
            # the first request, which launch() itself makes, so add_middleware() after it raises.
            "app_kwargs": {"middleware": [Middleware(HttpGuard, settings=settings)]},
            # Static-file worker processes (GRADIO_NUM_WORKERS, behind SSR's proxy) would take
            # uploads around the guard.
            "num_workers": 0,
            "css": page_css(settings),
            "head": page_head(settings),
            "favicon_path": str(FAVICON),
            # Browser sessions whose page state is kept; each keeps only the page's own state.
            "state_session_capacity": settings.page_sessions,
        }
        options.update(overrides)
        # Gradio's uvicorn rewrites the client's address from X-Forwarded-For for the peers this
        # variable names (127.0.0.1 unless set), before any middleware of ours runs: a client on
        # this machine could pose as any address to the login throttle. Only --trusted-proxy may.
        os.environ["FORWARDED_ALLOW_IPS"] = ",".join(settings.trusted_proxies)
        launched = self.demo.launch(prevent_thread_lock=True, **options)
        keep_sessions_lean(launched[0], self.demo)
        launched[0].add_api_route("/health", self.health, methods=["GET"])
        # Plain JSON twin of the page's gpu_memory API: what a front end reads when this app is
        # its backend. Under /v1/, so --auth's API key guards it like the chat route.
        launched[0].add_api_route("/v1/gpu_memory", self.gpu_memory, methods=["GET"])
        add_openai_routes(launched[0], self.service, self.loaded.public_name, settings.model_alias_names)
        # Everything built so far (model, tokenizer, Gradio's app: millions of objects) lives as
        # long as the server. Frozen, the collector stops rescanning it: a full collection
        # during a burst of requests took ~300 ms on the tiny model and stalled every request.
        gc.freeze()
        if block:
            self.demo.block_thread()
        return launched

    async def health(self) -> JSONResponse:
        """Plain HTTP, outside the queue and auth, for load balancers and uptime checks.

        Anyone may ask, so with --auth it says only up or down; the rest is for an open demo,
        except the backend's address (--show-backend-url), which tells a stranger where the
        model server lies. `async` on purpose: it reads counters only, so it answers on the event loop even while
        every worker thread is busy.
        """
        state = self.engine.state()
        down = "backend down" if state.backend is not None else "engine down"
        body = {"status": "ok" if state.alive else down}
        if self.settings.auth_pair is None:
            body |= {"model": self.loaded.public_name, "model_loaded": True, "engine_alive": state.alive,
                     "queue_depth": state.queue_depth, "batch_size": state.batch_size,
                     "engine_restarts": state.restarts}
            if state.backend is not None:
                backend = asdict(state.backend)
                if not self.settings.show_backend_url:
                    del backend["url"]
                body["backend"] = backend
        return JSONResponse(body, status_code=200 if state.alive else 503)

    async def gpu_memory(self) -> JSONResponse:
        return JSONResponse(await anyio.to_thread.run_sync(self.service.memory_snapshot))

    def close(self) -> None:
        self.demo.close()
        self.monitor.stop()
        self.engine.shutdown()


def share_warning(settings: Settings) -> str | None:
    """What to print when a public link is about to be made without a login."""
    return SHARE_WARNING if settings.share and not settings.auth else None


# The exit status after the GPU broke for good (EX_TEMPFAIL: try again), and how long /health
# says "engine down" before the process goes, so a load balancer sees it.
RESTART_EXIT_CODE = 75
RESTART_GRACE_S = 2.0


def exit_for_restart(reason: str) -> None:
    """The engine's device broke (a sticky CUDA error): exit, so that the supervisor, the
    container or the Space starts a fresh process. Nothing is cleaned up on the way out: a broken
    CUDA context can hang a normal shutdown."""
    log.critical("exiting in %.0f s so that the server is restarted: %s", RESTART_GRACE_S, reason)
    threading.Timer(RESTART_GRACE_S, os._exit, args=(RESTART_EXIT_CODE,)).start()


def build_app(settings: Settings, loaded: LoadedModel | None = None) -> App:
    """Load the model (unless given), start the engine, build the page with its queue.

    With `--backend` nothing is loaded: a `RemoteEngine` takes the engine's place.
    """
    return_large_blocks_on_free()  # before any upload is decoded
    if settings.backend:
        return _assemble(settings, *_remote_engine(settings))
    loaded = loaded or load_model(settings)
    threads = settings.torch_threads or (1 if loaded.is_tiny else 0)
    if threads:
        torch.set_num_threads(threads)
    batch_call = zerogpu_batch_call()
    if batch_call is not None:
        log.info("ZeroGPU: each batch runs in one @spaces.GPU call")
    engine = Engine(loaded.runner, max_batch=settings.max_batch, cache_size=settings.cache_size,
                    gpu_memory_utilization=settings.gpu_memory_utilization, seed=settings.seed, batch_call=batch_call,
                    on_fatal=exit_for_restart,
                    max_thinking_tokens=settings.max_thinking_tokens, max_model_len=settings.max_model_len,
                    enforce_eager=settings.enforce_eager).start()
    return _assemble(settings, loaded, engine, GpuMemory())


def _remote_engine(settings: Settings) -> tuple[LoadedModel, RemoteEngine, BackendMemory]:
    """The backend's stand-in for the engine. The app starts even when the backend is down: the
    page and /health say so, and chats work once it answers."""
    probe = BackendProbe(settings.backend, settings.backend_api_key, settings.backend_model,
                         interval_s=settings.panel_interval, timeout_s=min(5.0, settings.backend_timeout)).start()
    engine = RemoteEngine(probe, api_key=settings.backend_api_key, timeout_s=settings.backend_timeout,
                          reply_seconds=settings.backend_reply_seconds,
                          max_batch=settings.concurrency)
    try:
        engine.start()
    except BackendClientError:
        probe.stop()
        raise
    model_name = probe.status.model or settings.backend_model or "remote model"
    return LoadedModel.remote(model_name, settings.default_thinking), engine, BackendMemory(GpuMemory(), probe)


def _assemble(settings: Settings, loaded: LoadedModel, engine, gpu) -> App:
    """The service, the monitor and the page around a started engine."""
    monitor = ServerMonitor(engine, gpu, interval_s=settings.panel_interval).start()
    service = ChatService(engine, settings, gpu, loaded.sampling_defaults)
    demo = build_ui(service, loaded, monitor)
    # api_open=False: no REST route may reach the model around the queue and its limits.
    demo.queue(max_size=settings.queue_size, api_open=False, default_concurrency_limit=settings.concurrency)
    return App(settings=settings, loaded=loaded, engine=engine, demo=demo, monitor=monitor, service=service)
