"""Every knob of the demo in one typed place: a command-line flag with an env-var twin.

A Hugging Face Space cannot pass command-line flags, so each flag `--foo-bar` can also be set
with the variable `MINICPMV_FOO_BAR` (a flag given on the command line wins over the variable).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

ENV_PREFIX = "MINICPMV_"
MAX_STREAM_INTERVAL = 0.25  # seconds: the update budget never spaces one reply's updates further
TINY_MODEL = "tiny"


@dataclass(frozen=True)
class Settings:
    """What the app runs with. Defaults work offline on a CPU (they serve the tiny model)."""

    model: str = field(
        default="auto",
        metadata={"help": "hub id or local folder of MiniCPM-V 4.6 / 4.7, 2.6 or 2.5 (e.g. "
                          "openbmb/MiniCPM-Llama3-V-2_5-int4; all run by this project's own code, never the "
                          "checkpoint's); 'auto' = openbmb/MiniCPM-V-4.6 on a CUDA GPU, else the built-in tiny "
                          "test model; 'tiny' = always the tiny model"})
    quant: str = field(
        default="auto", metadata={"help": "auto|none|int4|int8 (int4 = bitsandbytes nf4, double quant)",
                                  "choices": ("auto", "none", "int4", "int8")})
    dtype: str = field(
        default="auto", metadata={"help": "auto|bfloat16|float16|float32",
                                  "choices": ("auto", "bfloat16", "float16", "float32")})
    device_map: str = field(
        default="auto", metadata={"help": "'auto' spreads the model over all GPUs (accelerate); "
                                          "or cpu, cuda, cuda:1"})
    tiny_model_dir: str = field(
        default="", metadata={"help": "where the tiny model is built (default: ~/.cache/minicpmv-demo)"})
    backend: str = field(
        default="", metadata={"help": "base URL of an OpenAI-compatible server (vLLM, SGLang, another "
                                      "instance of this app) to send chats to instead of loading a model, "
                                      "e.g. http://gpu-box:8000/v1"})
    backend_api_key: str = field(default="", metadata={"help": "API key the backend wants (Bearer token)"})
    backend_model: str = field(
        default="", metadata={"help": "model name to ask the backend for; empty = the first it lists"})
    backend_timeout: float = field(
        default=60.0, metadata={"help": "seconds the backend may take to connect, to start a reply, or "
                                        "between two pieces of it, before the user is told it failed"})
    backend_reply_seconds: float = field(
        default=600.0, metadata={"help": "most seconds one reply from the backend may take in all (a backend "
                                         "that only sends keep-alives or never ends is cut off there)"})
    show_backend_url: bool = field(
        default=False, metadata={"help": "with --backend and no --auth, /health also names the backend's URL "
                                         "(off: it says whether the backend is up, its kind and model only)"})

    max_batch: int = field(default=8, metadata={"help": "most requests decoded together in one batch"})
    concurrency: int = field(
        default=64, metadata={"help": "chat events that reach the engine at once; more wait in "
                                      "Gradio's queue and see their position"})
    queue_size: int = field(default=256, metadata={"help": "events allowed to wait; beyond it users "
                                                          "see 'busy, try again'"})
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "share of each GPU's memory this process may use: the weights, the "
                                       "preallocated slots and what prefills take"})
    max_model_len: int = field(
        default=0, metadata={"help": "tokens one request may hold (prompt and reply); the engine preallocates "
                                     "this for each of --max-batch rows. 0 = auto: from the GPU memory budget "
                                     "(half of it for these buffers), 8192 on the CPU; never past the model's "
                                     "context window"})
    enforce_eager: bool = field(
        default=False, metadata={"help": "do not capture decode steps as CUDA graphs (they are captured at "
                                         "start-up on a CUDA GPU, never on the CPU or ZeroGPU)"})
    cache_size: int = field(default=128, metadata={"help": "greedy replies remembered (0 disables)"})
    max_new_tokens: int = field(default=1024, metadata={"help": "server cap on new tokens per reply"})
    max_thinking_tokens: int = field(
        default=2048, metadata={"help": "most tokens one reply may spend reasoning (inside <think>) before the "
                                        "server closes the block so the model answers, and says so; never more "
                                        "than 3/4 of the reply's max new tokens (0 = no cap)"})
    default_thinking: str = field(
        default="auto", metadata={"help": "whether a request that does not choose gets reasoning: auto = on for a "
                                          "Thinking checkpoint (its id or path says 'Thinking'), off otherwise",
                                  "choices": ("auto", "on", "off")})
    default_new_tokens: int = field(default=512, metadata={"help": "initial value of the slider"})
    max_images: int = field(default=4, metadata={"help": "most images in one message"})
    max_file_mb: float = field(default=20.0, metadata={"help": "largest upload accepted"})
    max_videos: int = field(
        default=1, metadata={"help": "most videos in one message (they count among --max-images too)"})
    max_video_mb: float = field(default=20.0, metadata={"help": "largest video file accepted (mp4, webm, mov)"})
    max_video_seconds: float = field(
        default=600.0, metadata={"help": "longest video accepted, in seconds (read from its header before "
                                         "anything is decoded)"})
    video_frames: int = field(
        default=32, metadata={"help": "frames taken from a video when a request names no count (one a "
                                      "second for shorter clips); MiniCPM-V 4.6 reads each as 64 tokens, "
                                      "256 in fine detail"})
    max_video_frames: int = field(
        default=64, metadata={"help": "most frames a request may ask for (max_num_frames is clamped to it)"})
    max_message_chars: int = field(default=100_000, metadata={"help": "longest message text accepted"})
    max_history_messages: int = field(
        default=400, metadata={"help": "most earlier messages a request may carry (the page shows each "
                                       "picture as a message of its own)"})
    max_history_chars: int = field(
        default=1_000_000, metadata={"help": "most characters of text in a request's earlier messages "
                                           "(about the 262k tokens MiniCPM-V 4.6 reads)"})
    max_body_mb: float = field(
        default=40.0, metadata={"help": "largest request body other than an upload (OpenAI API calls, the "
                                        "page's messages), refused with 413 before it is read; 40 MB holds the "
                                        "4 images a message may carry as base64 data URLs of typical photos "
                                        "(up to about 7 MB each, a third larger in base64)"})
    stream_interval: float = field(
        default=0.03, metadata={"help": "least seconds between one reply's streamed updates (coalesces tokens)"})
    max_stream_updates: float = field(
        default=100.0, metadata={"help": "streamed updates per second over all replies being generated; "
                                         "with many at once each one's updates come further apart, but "
                                         f"never more than {MAX_STREAM_INTERVAL} s because of it (0 = no limit)"})

    panel_interval: float = field(default=2.0, metadata={"help": "seconds between server panel refreshes"})
    feedback_log: str = field(
        default="", metadata={"help": "JSON-lines file the page's like/dislike clicks are appended to "
                                      "(default: feedback.jsonl in ~/.cache/minicpmv-demo)"})
    feedback_log_mb: float = field(
        default=50.0, metadata={"help": "largest size of the feedback log; past it the file becomes <name>.1 "
                                        "(replacing the older one) and a new one starts"})
    page_sessions: int = field(
        default=1000, metadata={"help": "browser sessions whose page state the server keeps (Gradio's "
                                        "state_session_capacity); the oldest are forgotten first"})

    host: str = field(default="", metadata={"help": "address to listen on (0.0.0.0 for all); empty = "
                                                    "GRADIO_SERVER_NAME or 127.0.0.1"})
    port: int = field(default=0, metadata={"help": "port to listen on; 0 = GRADIO_SERVER_PORT or 7860"})
    share: bool = field(default=False, metadata={"help": "create a public gradio.live link"})
    auth: str = field(default="", metadata={"help": "user:password required for the UI and the API"})
    login_failures: int = field(
        default=5, metadata={"help": "failed logins (page or API key) one client address may make within "
                                     "60 s; its further attempts get HTTP 429 until they are older than that"})
    trusted_proxy: str = field(
        default="", metadata={"help": "address or network of the reverse proxy in front of the app (several "
                                      "comma-separated, or '*'): only requests from it may name their client "
                                      "with X-Forwarded-For; empty = the header is ignored"})
    model_aliases: str = field(
        default="", metadata={"help": "other model names the OpenAI routes answer to (comma-separated); "
                                      "/v1/models lists them, any other name gets 404"})
    seed: int = field(default=0, metadata={"help": "seed for sampling (temperature > 0)"})
    torch_threads: int = field(
        default=0, metadata={"help": "CPU threads for torch; 0 = auto (1 for the tiny model, whose "
                                     "ops are too small to split; torch's default otherwise)"})

    @property
    def max_upload_mb(self) -> float:
        """Largest single file an upload may carry: a picture or a video."""
        return max(self.max_file_mb, self.max_video_mb)

    @property
    def trusted_proxies(self) -> tuple[str, ...]:
        return _comma_list(self.trusted_proxy)

    @property
    def model_alias_names(self) -> tuple[str, ...]:
        return _comma_list(self.model_aliases)

    @property
    def auth_pair(self) -> tuple[str, str] | None:
        """`--auth user:password` as Gradio wants it, or None when the demo is open."""
        if not self.auth:
            return None
        user, sep, password = self.auth.partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth must look like user:password")
        return user, password


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The CLI; each default shown in --help is the env twin's value when it is set."""
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="MiniCPM-V chat demo: one engine thread owns the model and batches users.",
        epilog=f"Every flag --foo-bar has an environment twin {ENV_PREFIX}FOO_BAR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for spec in fields(Settings):
        help_text = f"{spec.metadata['help']} [env {_env_name(spec.name)}]"
        if spec.type == "bool":
            parser.add_argument(_flag(spec.name), dest=spec.name, action=argparse.BooleanOptionalAction,
                                default=spec.default, help=help_text)
        else:
            parser.add_argument(_flag(spec.name), dest=spec.name, type=_TYPES[spec.type],
                                default=spec.default, choices=spec.metadata.get("choices"),
                                help=help_text)
    return parser


_TYPES = {"str": str, "int": int, "float": float}


def _env_defaults(environ: dict[str, str]) -> dict[str, object]:
    """Values from MINICPMV_* variables, converted to each field's type."""
    values: dict[str, object] = {}
    for spec in fields(Settings):
        raw = environ.get(_env_name(spec.name))
        if raw is None:
            continue
        try:
            values[spec.name] = _parse_bool(raw) if spec.type == "bool" else _TYPES[spec.type](raw)
        except ValueError as exc:
            raise SystemExit(f"error: {_env_name(spec.name)}={raw!r} is not valid: {exc}") from None
    return values


def parse_settings(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Flags win over env vars, env vars over the defaults."""
    parser = build_parser()
    parser.set_defaults(**_env_defaults(dict(os.environ) if environ is None else environ))
    settings = Settings(**vars(parser.parse_args(argv)))
    _check(settings, parser)
    return settings


def _proxy_problems(proxies: tuple[str, ...]) -> list[str]:
    """Each --trusted-proxy entry must be an IP address, a network or '*': uvicorn, which reads
    the list, would silently never match a misspelt one."""
    for proxy in proxies:
        if proxy == "*":
            continue
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            return [f"--trusted-proxy must list IP addresses or networks (e.g. 10.0.0.2, 10.0.0.0/8), not {proxy!r}"]
    return []


def _check(settings: Settings, parser: argparse.ArgumentParser) -> None:
    """Refuse settings that would only fail later, with the flag's name in the message."""
    problems = []
    for name in ("max_batch", "concurrency", "queue_size", "max_new_tokens", "default_new_tokens",
                 "max_images", "max_message_chars", "max_history_messages", "max_history_chars",
                 "login_failures", "max_videos", "page_sessions"):
        if getattr(settings, name) < 1:
            problems.append(f"{_flag(name)} must be at least 1")
    if settings.torch_threads < 0:
        problems.append("--torch-threads must be 0 (auto) or more")
    if settings.max_model_len < 0:
        problems.append("--max-model-len must be 0 (auto) or more")
    if settings.cache_size < 0:
        problems.append("--cache-size must be 0 or more")
    if settings.max_thinking_tokens < 0:
        problems.append("--max-thinking-tokens must be 0 (no cap) or more")
    if not 0.05 <= settings.gpu_memory_utilization <= 1.0:
        problems.append("--gpu-memory-utilization must be between 0.05 and 1")
    if settings.panel_interval <= 0:
        problems.append("--panel-interval must be positive")
    if settings.max_file_mb <= 0:
        problems.append("--max-file-mb must be positive")
    if settings.max_body_mb <= 0:
        problems.append("--max-body-mb must be positive")
    if settings.feedback_log_mb <= 0:
        problems.append("--feedback-log-mb must be positive")
    if settings.backend and not settings.backend.startswith(("http://", "https://")):
        problems.append("--backend must be an http:// or https:// URL")
    if settings.backend_timeout <= 0 or not settings.backend_reply_seconds > 0:
        problems.append("--backend-timeout and --backend-reply-seconds must be positive")
    problems += _proxy_problems(settings.trusted_proxies)
    if settings.max_video_mb <= 0 or settings.max_video_seconds <= 0:
        problems.append("--max-video-mb and --max-video-seconds must be positive")
    from ..intake.conversation import MAX_NUM_FRAMES  # here: `--help` stays free of the picture libraries

    if not 1 <= settings.video_frames <= settings.max_video_frames <= MAX_NUM_FRAMES:
        problems.append(f"--video-frames and --max-video-frames must satisfy 1 <= --video-frames <= "
                        f"--max-video-frames <= {MAX_NUM_FRAMES}")
    try:
        _ = settings.auth_pair  # raises ValueError when it is not user:password
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        parser.error("; ".join(problems))
