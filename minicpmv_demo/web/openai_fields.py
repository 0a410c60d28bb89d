"""The OpenAI request fields that are not messages or sampling settings: what the server does
with each, checked before a request waits for its turn.

A field a client sends is either done or refused, never accepted and ignored: a client that
asks for tools, a JSON schema or several choices would otherwise take a plain answer for what
it asked. The refusal is a 400 that names the field (OpenAI's `param`).
"""

from __future__ import annotations

from ..engine.request import MAX_SEED, MIN_SEED
from .api_errors import ApiError

# OpenAI takes up to 4 stop sequences; a longer one than this is not a stop word but a payload.
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
# Fields this server cannot honour: why, and the values that ask nothing of it (an empty tool
# list, a choice of no tool). `n` > 1 is refused with the other options.
UNSUPPORTED: dict[str, tuple[str, tuple]] = {
    "tools": ("this server does not call tools", ([],)),
    "functions": ("this server does not call functions", ([],)),
    "tool_choice": ("this server does not call tools", ("none", "auto")),
    "function_call": ("this server does not call functions", ("none", "auto")),
    # The sampler could compute them (a log-softmax a step for the rows that ask), but carrying
    # them token by token beside the streamed text, its reasoning split and its stop cut is not
    # done: refused rather than answered without them.
    "logprobs": ("this server does not return log probabilities", (False,)),
    "top_logprobs": ("this server does not return log probabilities", (0,)),
}


def refuse_unsupported(body: dict) -> None:
    """400 for what the request asks that this server does not do: tools and functions (an
    empty list or `tool_choice: "none"` asks nothing), a `response_format` other than text."""
    for name, (reason, harmless) in UNSUPPORTED.items():
        value = body.get(name)
        if value is None or value in harmless:
            continue
        raise ApiError(400, f"'{name}' is not supported: {reason}. Send the request without it.", param=name)
    response_format = body.get("response_format")
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind != "text":
        raise ApiError(400, f"'response_format' {str(kind if kind is not None else response_format)[:40]!r} is not "
                            "supported: this server answers in plain text only ({\"type\": \"text\"}).",
                       param="response_format")


def stop_strings(body: dict) -> tuple[str, ...]:
    """`stop`: a string or a list of up to four non-empty strings; () when not sent."""
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings of 1 to "
                            f"{MAX_STOP_CHARS} characters.", param="stop")
    return tuple(dict.fromkeys(stops))


def request_seed(body: dict) -> int | None:
    """`seed`: a whole number (64-bit); the same seed gives the same sampled reply."""
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not MIN_SEED <= seed <= MAX_SEED):
        raise ApiError(400, f"'seed' must be a whole number from {MIN_SEED} to {MAX_SEED}, not {str(seed)[:40]!r}.",
                       param="seed")
    return seed


def check_model(body: dict, names: tuple[str, ...]) -> None:
    """404 for a model this server does not serve, as the OpenAI API answers; no model given
    means the one served (as vLLM takes it)."""
    model = body.get("model")
    if model is None or model in names:
        return
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string.", param="model")
    raise ApiError(404, f"The model {model[:80]!r} does not exist on this server; it serves "
                        f"{', '.join(map(repr, names))} (see /v1/models).", param="model", code="model_not_found")
