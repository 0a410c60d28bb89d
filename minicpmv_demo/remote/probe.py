"""What the backend says about itself: up or down, which server it is, its load and its memory.

Polled on a daemon thread every few seconds, never on a user's request: the page's panel, the
reply's memory line and /health read the last answer. Three kinds of backend are told apart by
what `/v1/models` says owns the model:
- another instance of this app (`owned_by: minicpmv-demo`): its `/health` and `/v1/gpu_memory`;
- vLLM (`owned_by: vllm`): its Prometheus `/metrics` (KV-cache usage, running and waiting);
- anything else: "not reported by the backend".
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field, replace

import httpx

from ..system.gpu import GpuInfo
from .answers import JSON_ANSWER_BYTES, METRICS_ANSWER_BYTES, BadAnswer, app_load, model_list, parse_json, read_capped

log = logging.getLogger(__name__)

THIS_APP = "minicpmv-demo"
VLLM = "vllm"


@dataclass(frozen=True)
class BackendStatus:
    """One poll's result. `error` is None when the backend answered."""

    reachable: bool = False
    error: str | None = "not asked yet"
    kind: str = ""  # THIS_APP, VLLM, or what /v1/models says owns the model
    model: str = ""
    queue_depth: int | None = None
    batch_size: int | None = None
    batch_ceiling: int | None = None
    gpus: tuple[GpuInfo, ...] = ()
    kv_cache_pct: float | None = None  # vLLM: share of its KV-cache blocks in use
    extra: dict = field(default_factory=dict)

    @property
    def memory_note(self) -> str:
        """One line about the backend's memory for people (the reply line, the panel)."""
        if not self.reachable:
            return f"backend unreachable: {self.error}"
        if self.gpus:
            return "backend " + " · ".join(f"{gpu.name} {gpu.memory_used_mb:,.0f} / {gpu.memory_total_mb:,.0f} MB"
                                           for gpu in self.gpus)
        if self.kv_cache_pct is not None:
            return f"backend ({self.kind}) KV cache {self.kv_cache_pct:.0f}% used"
        if self.kind == THIS_APP:
            return "backend runs on CPU"
        return "backend memory: not reported by the backend"


class BackendProbe:
    """Asks the backend how it is, every `interval_s`, on its own thread."""

    def __init__(self, base_url: str, api_key: str = "", model: str = "", *, interval_s: float = 2.0,
                 timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url.removesuffix("/v1")
        self.wanted_model = model
        self.interval_s = interval_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=timeout_s)
        self._status = BackendStatus()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged: str | None = self._status.error  # "not asked yet": the first answer is logged, up or down

    @property
    def status(self) -> BackendStatus:
        return self._status

    def start(self) -> BackendProbe:
        self.poll()  # the page built at start-up says at once whether the backend is there
        self._thread = threading.Thread(target=self._loop, name="backend-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 6)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> BackendStatus:
        """Ask once; never raises, whatever the backend sends (a failure is the status)."""
        try:
            status = self._ask()
        except (httpx.HTTPError, BadAnswer) as exc:
            status = self._unreachable(_short(exc))
        except Exception as exc:  # noqa: BLE001 - the probe must outlive any answer: /health relies on it
            log.exception("backend probe failed on an answer it did not expect")
            status = self._unreachable(f"unreadable answer ({type(exc).__name__})")
        if status.error != self._logged:
            if status.reachable:
                log.info("backend %s is up (%s, model %s)", self.base_url, status.kind, status.model)
            else:
                log.warning("backend %s unreachable: %s", self.base_url, status.error)
            self._logged = status.error
        self._status = status
        return status

    def _unreachable(self, error: str) -> BackendStatus:
        return BackendStatus(reachable=False, error=error, kind=self._status.kind, model=self._status.model)

    def _ask(self) -> BackendStatus:
        path = "/v1/models"
        models = model_list(parse_json(read_capped(self._client, f"{self.base_url}/models", path,
                                                   JSON_ANSWER_BYTES), path))
        chosen = next((m for m in models if m.id == self.wanted_model), None) if self.wanted_model else models[0]
        if chosen is None:
            listed = ", ".join(m.id for m in models[:10])
            raise BadAnswer(f"the backend does not serve {self.wanted_model!r} (it lists {listed[:300]})")
        base = BackendStatus(reachable=True, error=None, kind=chosen.owned_by, model=chosen.id)
        try:
            if chosen.owned_by == THIS_APP:
                return self._this_app(base)
            if chosen.owned_by == VLLM:
                return self._vllm(base)
        except (httpx.HTTPError, BadAnswer) as exc:
            log.debug("backend load and memory unreadable: %s", exc)  # chats still work
        return base

    def _this_app(self, base: BackendStatus) -> BackendStatus:
        path = "/v1/gpu_memory"
        load = app_load(parse_json(read_capped(self._client, f"{self.base_url}/gpu_memory", path,
                                               JSON_ANSWER_BYTES), path))
        return replace(base, queue_depth=load.queue_depth, batch_size=load.batch_size,
                       batch_ceiling=load.batch_ceiling, gpus=load.gpus,
                       extra={} if load.rss_mb is None else {"process_rss_mb": load.rss_mb})

    def _vllm(self, base: BackendStatus) -> BackendStatus:
        text = read_capped(self._client, f"{self.root_url}/metrics", "/metrics", METRICS_ANSWER_BYTES)
        metrics = prometheus_values(text.decode("utf-8", errors="replace"))
        usage = metrics.get("vllm:kv_cache_usage_perc", metrics.get("vllm:gpu_cache_usage_perc"))
        running, waiting = metrics.get("vllm:num_requests_running"), metrics.get("vllm:num_requests_waiting")
        return replace(base, queue_depth=_whole(waiting), batch_size=_whole(running),
                       kv_cache_pct=None if usage is None or not math.isfinite(usage) else 100 * usage)


def _whole(value: float | None) -> int | None:
    """A Prometheus gauge as a count; None when absent or not a sane count."""
    return int(value) if value is not None and math.isfinite(value) and 0 <= value < 2**31 else None


def prometheus_values(text: str) -> dict[str, float]:
    """Each metric's value summed over its label sets, from Prometheus' text format."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, rest = line.partition(" ") if "{" not in line else line.partition("} ")
        name = name_part.split("{", 1)[0]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        values[name] = values.get(name, 0.0) + value
    return values


def _short(exc: BaseException) -> str:
    """One line about a failure, without the backend's address (/health may show the error
    where --show-backend-url hides the address)."""
    if isinstance(exc, BadAnswer):
        return str(exc)[:200]
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or no route"
    return f"connection failed ({type(exc).__name__})"
