"""What every front end (the Gradio page, its API, the OpenAI-compatible routes) does with a
chat request: check the input, clamp the settings, hand it to the engine, describe the result.

No Gradio here, so the OpenAI routes share exactly the same rules and limits as the page.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from .admission import RequestGate
from ..intake.message import InputError, InputRules, build_conversation
from ..intake.conversation import DOWNSAMPLE_MODES, MAX_NUM_FRAMES, MAX_SLICE_NUMS, PromptOptions
from ..engine import ReplyStats, ReplyStream, SamplingParams
from ..engine.contract import ServingEngine
from ..engine.request import MAX_REPETITION_PENALTY, MAX_TEMPERATURE
from ..system.gpu import GpuMemory, describe_gpus, process_rss_mb
from ..intake.images import ImageLimits
from ..intake.videos import VideoLimits
from ..config.settings import MAX_STREAM_INTERVAL, Settings

ASSETS = Path(__file__).resolve().parents[2] / "assets"
# What the page starts with for the settings the checkpoint does not name.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.8


class ChatService:
    """Checks requests and submits them to the engine with the server's limits."""

    def __init__(self, engine: ServingEngine, settings: Settings, gpu: GpuMemory,
                 checkpoint_sampling: Mapping[str, float] | None = None) -> None:
        """`checkpoint_sampling`: the sampling settings the checkpoint names (see
        `LoadedModel.sampling_defaults`); they become `defaults`, clamped like a client's."""
        self.engine = engine
        self.settings = settings
        self.gpu = gpu
        self.gate = RequestGate(settings.concurrency, settings.queue_size)
        self.rules = InputRules(
            image_limits=ImageLimits(max_file_bytes=int(settings.max_file_mb * 1024 * 1024)),
            max_images=settings.max_images,
            allowed_roots=(upload_root(), str(ASSETS)),
            max_message_chars=settings.max_message_chars,
            max_history_messages=settings.max_history_messages,
            max_history_chars=settings.max_history_chars,
            video_limits=VideoLimits(max_file_bytes=int(settings.max_video_mb * 1024 * 1024),
                                     max_seconds=settings.max_video_seconds)
            if engine.reads_video else None,
            max_videos=settings.max_videos,
            video_frames=settings.video_frames,
        )
        # The settings a client that sends none gets, and the page's sliders start at: the
        # checkpoint's where it names them (clamped like a client's), the server's own elsewhere.
        named = {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P, **(checkpoint_sampling or {})}
        self.defaults = self._clamped(SamplingParams(), settings.default_new_tokens, named["temperature"],
                                      named["top_p"], named.get("top_k"), named.get("repetition_penalty"))

    def params(self, max_new_tokens=None, temperature=None, top_p=None, top_k=None,
               repetition_penalty=None) -> SamplingParams:
        """Clamp what a client sends to the server's limits; refuse what is not a finite number.

        A setting the client leaves out (None) is the server's default (`defaults`). Clamping
        keeps sliders and sloppy clients working (temperature 5 becomes 2), but a NaN or an
        infinity has no nearest allowed value: it is refused with a message (InputError).
        """
        return self._clamped(self.defaults, max_new_tokens, temperature, top_p, top_k, repetition_penalty)

    def _clamped(self, base: SamplingParams, max_new_tokens, temperature, top_p, top_k,
                 repetition_penalty) -> SamplingParams:
        """`params` with `base` for what is None."""
        tokens = _finite("max new tokens", max_new_tokens, base.max_new_tokens)
        return SamplingParams(
            max_new_tokens=int(min(max(tokens, 1), self.settings.max_new_tokens)),
            temperature=min(max(_finite("temperature", temperature, base.temperature), 0.0), MAX_TEMPERATURE),
            top_p=min(max(_finite("top_p", top_p, base.top_p), 0.01), 1.0),
            top_k=int(max(_finite("top_k", top_k, base.top_k), 0)),
            repetition_penalty=min(max(_finite("repetition penalty", repetition_penalty, base.repetition_penalty),
                                       0.01), MAX_REPETITION_PENALTY),
        )

    def options(self, enable_thinking=None, downsample_mode=None, max_slice_nums=None,
                max_num_frames=None) -> PromptOptions:
        """How the prompt is built, from what a client sends; None keeps the checkpoint's default.

        Numbers are clamped into range like the sampling settings (frames to the server's
        --max-video-frames); a choice that is not one of
        the allowed ones (a detail mode, a non-boolean thinking switch) is refused with a message.
        """
        if enable_thinking is not None and not isinstance(enable_thinking, bool):
            raise InputError(f"The thinking setting must be true or false, not {str(enable_thinking)[:40]!r}.")
        if downsample_mode not in (None, *DOWNSAMPLE_MODES):
            raise InputError(f"The detail setting (downsample_mode) must be one of {', '.join(DOWNSAMPLE_MODES)}, "
                             f"not {str(downsample_mode)[:40]!r}.")
        return PromptOptions(
            enable_thinking=enable_thinking,
            downsample_mode=downsample_mode or DOWNSAMPLE_MODES[0],
            max_slice_nums=_whole_within("max slices", max_slice_nums, MAX_SLICE_NUMS),
            max_num_frames=_whole_within("max frames", max_num_frames,
                                         min(self.settings.max_video_frames, MAX_NUM_FRAMES)),
        )

    def submit(self, message, history, params: SamplingParams, system_prompt: str = "", *,
               options: PromptOptions = PromptOptions(),
               exit_gate: Callable[[], None] | None = None) -> tuple[ReplyStream, list[str]]:
        """Queue a reply; returns its stream and notices for the user. Raises InputError.

        The request counts in `gate` until its reply ends: `exit_gate` when the caller waited
        for its turn there (the API), else it is counted as already admitted (the page).
        """
        exit_gate = exit_gate or self.gate.enter_admitted()
        try:
            conversation, notices = build_conversation(message, history, system_prompt=system_prompt or "",
                                                       rules=self.rules, options=options)
            stream = self.engine.submit(conversation, params)
        except BaseException:
            exit_gate()
            raise
        stream.when_done(exit_gate)
        return stream, notices + stream.notices

    def current_stream_interval(self) -> float:
        """Seconds between one reply's streamed updates, now.

        Each update costs the server interpreter time that the engine thread shares (Gradio's
        queue, JSON, the socket), so the total rate is capped: with more replies being generated
        at once, each one's updates come further apart (0.08 s each at 8 replies with the
        default 100 per second) and generation keeps its share. The cap never stretches the
        interval beyond MAX_STREAM_INTERVAL, so text still flows visibly.
        """
        base, budget = self.settings.stream_interval, self.settings.max_stream_updates
        if budget <= 0:
            return base
        return max(base, min(self.engine.active_rows / budget, MAX_STREAM_INTERVAL))

    def memory_snapshot(self) -> dict:
        """What /gpu_memory returns: GPUs, torch counters, process memory, engine queue and batch."""
        snapshot = self.gpu.snapshot()
        state = self.engine.state()
        snapshot["engine"] = {"queue_depth": state.queue_depth, "batch_size": state.batch_size,
                              "batch_ceiling": state.batch_ceiling, "tokens_per_s": state.tokens_per_s,
                              "alive": state.alive}
        return snapshot

    def stats_line(self, stats: ReplyStats) -> str:
        """The small line under a reply: where it ran, memory, batch, speed."""
        if stats.from_cache:
            return "answered from the reply cache (same image and question as a recent greedy reply)"
        reading = self.gpu.read()
        parts = [describe_gpus(reading)]
        if not reading.gpus and reading.note is None:
            parts.append(f"process memory {process_rss_mb():,.0f} MB")
        if stats.peak_memory_mb is not None:
            shared = " (peak during this batch)" if stats.batch_size > 1 else ""
            parts.append(f"peak {stats.peak_memory_mb:,.0f} MB{shared}")
        parts.append(f"batch {stats.batch_size}")
        parts.append(f"{stats.tokens} tokens · {stats.tokens_per_s:.1f} tok/s · {stats.seconds:.1f} s")
        return " · ".join(parts)


def _finite(name: str, value, default: float) -> float:
    """`value` as a finite float; None (not sent) gives `default`."""
    if value is None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"The {name} setting must be a number, not {str(value)[:40]!r}.") from None
    if not math.isfinite(number):
        raise InputError(f"The {name} setting must be a finite number, not {value!r}.")
    return number


def _whole_within(name: str, value, high: int) -> int | None:
    """`value` clamped to a whole number in 1..high; None (not sent) stays None."""
    if value is None:
        return None
    return int(min(max(round(_finite(name, value, 1)), 1), high))


def upload_root() -> str:
    """Gradio's upload cache: the only place files in a request may come from."""
    return os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")
