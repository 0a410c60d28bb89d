"""The page's typed API for `gradio_client`: `/chat` (a streamed reply) and `/gpu_memory`.

Hidden components give /chat its typed, keyword-friendly signature; every argument after
`message` may be left out, and then the server's default is used (the function's defaults are
None, which is how Gradio tells `gradio_client` that a parameter is optional).
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from ..engine import ReplyError, ReplyStats
from ..intake.message import InputError
from .chat_service import ChatService

VIDEO_TYPES = [".mp4", ".webm", ".mov"]


def stream_reply(service: ChatService, message, history, sampling: tuple, system_prompt: str = "",
                 options: dict | None = None) -> Iterator[tuple[str, ReplyStats | None]]:
    """/chat's stream: (text so far, stats when done); problems become Gradio errors for the client.

    `sampling` is (max new tokens, temperature, top-p, top-k, repetition penalty) as sent;
    `options` the prompt options as sent (keyword arguments of `ChatService.options`).
    Closing the iterator (a client that cancels or hangs up) cancels the request in the engine.
    """
    try:
        stream, notices = service.submit(message, history, service.params(*sampling), system_prompt,
                                         options=service.options(**(options or {})))
    except InputError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    try:
        for notice in notices:
            gr.Warning(notice)
        for text in stream.updates(service.current_stream_interval):
            yield text, None
        yield stream.text, stream.stats
    except ReplyError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    finally:
        stream.cancel()  # no-op when finished; frees the row after a cancel or a hang-up


def add_chat_api(service: ChatService, model_event: dict) -> None:
    """Add /chat and /gpu_memory to the Blocks being built (call inside its context)."""

    def gpu_memory() -> dict:
        """GPU and process memory and the engine's queue and batch, as JSON."""
        return service.memory_snapshot()

    gr.api(gpu_memory, api_name="gpu_memory", queue=False)

    def chat(message, history=None, max_new_tokens=None, temperature=None, top_p=None, top_k=None,
             repetition_penalty=None, enable_thinking=None, downsample_mode=None, max_slice_nums=None,
             max_num_frames=None):
        """Answer `message` ({"text", "files"}) after `history`; streams the partial reply.

        Every argument after `message` may be left out (no history; the server's default for
        each setting); the prompt options follow vLLM's names: enable_thinking,
        downsample_mode ("16x" or "4x"), max_slice_nums, max_num_frames.
        """
        sampling = (max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        options = {"enable_thinking": enable_thinking, "downsample_mode": downsample_mode or None,
                   "max_slice_nums": max_slice_nums, "max_num_frames": max_num_frames}
        sent = None
        for text, _ in stream_reply(service, message, history or [], sampling, options=options):
            if text != sent:  # the stats that come with the end change nothing here
                sent = text
                yield text

    with gr.Group(visible=False):
        inputs = [gr.MultimodalTextbox(file_count="multiple", file_types=["image", *VIDEO_TYPES]), gr.JSON()]
        # No `precision`: Gradio's rounding would refuse "abc" with a bare "Error"; the
        # service checks every setting and says what is wrong.
        inputs += [gr.Number() for _ in range(5)]  # max new tokens, temperature, top-p, top-k, penalty
        inputs += [gr.JSON(), gr.JSON(), gr.Number(), gr.Number()]  # thinking, detail, slices, frames
        reply = gr.Textbox()
        trigger = gr.Button()
    trigger.click(chat, inputs, reply, api_name="chat", **model_event)
