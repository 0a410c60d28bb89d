"""The backend's answers to the status probe, read and checked before anything uses them.

Whatever answers at the backend's address may send anything: a body of gigabytes, JSON nested
thousands deep, a list of strings where models should be, text where numbers should be. Each
answer is read up to a bound, parsed, and checked field by field; anything else is a
`BadAnswer` whose text says what was wrong in a few words (never the backend's address, which
/health may show). Nothing here raises anything else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import httpx

from ..system.gpu import GpuInfo

# What one answer may weigh: a model list or this app's memory snapshot is a few hundred bytes
# (a server with many adapters a few KB); vLLM's Prometheus text is tens of KB.
JSON_ANSWER_BYTES = 64 * 1024
METRICS_ANSWER_BYTES = 1024 * 1024
MAX_MODELS = 1000
MAX_GPUS = 64
MAX_NAME_CHARS = 256


class BadAnswer(ValueError):
    """The backend answered, but not something this app can use; str() says why, briefly."""


@dataclass(frozen=True)
class ListedModel:
    id: str
    owned_by: str


@dataclass(frozen=True)
class AppLoad:
    """What another instance of this app says about itself on /v1/gpu_memory."""

    queue_depth: int
    batch_size: int
    batch_ceiling: int
    gpus: tuple[GpuInfo, ...]
    rss_mb: float | None


def read_capped(client: httpx.Client, url: str, path: str, limit: int) -> bytes:
    """GET `url` and return its body; BadAnswer for an error status or a body past `limit`
    (reading stops there). `path` names the route in messages (the URL is not repeated)."""
    with client.stream("GET", url) as answer:
        if answer.status_code >= 400:
            raise BadAnswer(f"{path} answered HTTP {answer.status_code}")
        body = bytearray()
        for piece in answer.iter_bytes():
            body += piece
            if len(body) > limit:
                raise BadAnswer(f"{path} answered more than {limit // 1024} KB")
        return bytes(body)


def parse_json(body: bytes, path: str) -> object:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadAnswer(f"{path} did not answer JSON") from None
    except RecursionError:
        raise BadAnswer(f"{path} answered JSON nested too deeply") from None


def model_list(payload: object) -> list[ListedModel]:
    """OpenAI's `{"data": [{"id": "...", "owned_by": "..."}, ...]}`, checked."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or len(data) > MAX_MODELS:
        raise BadAnswer("/v1/models did not answer a model list")
    models = []
    for entry in data:
        model_id = entry.get("id") if isinstance(entry, dict) else None
        if not _name(model_id):
            raise BadAnswer("/v1/models lists a model without a usable id")
        owner = entry.get("owned_by")
        models.append(ListedModel(id=model_id, owned_by=owner if _name(owner) else "openai-compatible"))
    if not models:
        raise BadAnswer("the backend lists no model")
    return models


def app_load(payload: object) -> AppLoad:
    """This app's `/v1/gpu_memory` snapshot, checked (see `ChatService.memory_snapshot`)."""
    engine = payload.get("engine") if isinstance(payload, dict) else None
    gpus = payload.get("gpus") if isinstance(payload, dict) else None
    if not isinstance(engine, dict) or not isinstance(gpus, list) or len(gpus) > MAX_GPUS:
        raise BadAnswer("/v1/gpu_memory did not answer a memory snapshot")
    process = payload.get("process")
    rss = process.get("rss_mb") if isinstance(process, dict) else None
    return AppLoad(queue_depth=_count(engine.get("queue_depth")), batch_size=_count(engine.get("batch_size")),
                   batch_ceiling=_count(engine.get("batch_ceiling")), gpus=tuple(_gpu(gpu) for gpu in gpus),
                   rss_mb=_number(rss) if rss is not None else None)


def _gpu(entry: object) -> GpuInfo:
    if not isinstance(entry, dict) or not _name(entry.get("name")):
        raise BadAnswer("/v1/gpu_memory lists a GPU without a name")
    utilization, temperature = entry.get("utilization_pct"), entry.get("temperature_c")
    return GpuInfo(index=_count(entry.get("index")), name=entry["name"],
                   memory_used_mb=_number(entry.get("memory_used_mb")),
                   memory_total_mb=_number(entry.get("memory_total_mb")),
                   memory_free_mb=_number(entry.get("memory_free_mb")),
                   utilization_pct=float("nan") if utilization is None else _number(utilization),
                   temperature_c=None if temperature is None else _number(temperature))


def _name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS and value.isprintable()


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadAnswer("/v1/gpu_memory holds a value that is not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        raise BadAnswer("/v1/gpu_memory holds a number that is not finite")
    return number


def _count(value: object) -> int:
    number = _number(value)
    if number < 0 or number != int(number) or number > 2**31:
        raise BadAnswer("/v1/gpu_memory holds a count that is not a whole number")
    return int(number)
