"""The Gradio page and API. Handlers only submit to the engine and relay its stream.

Reads top to bottom like the page: banner, chat, input, buttons, settings, examples; then the
events. No handler touches the model, so no combination of clicks and clients can run it twice
at once; every model-calling event still shares one concurrency group so Gradio shows a queue
position beyond `--concurrency` instead of starting unbounded work.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterator

import gradio as gr
import pandas as pd

from .chat_input import InputError, content_parts, file_path
from .chat_service import ASSETS, ChatService
from .engine import Engine, ReplyError, ReplyStats, SamplingParams
from .gpu import GpuMemory, process_rss_mb
from .model import LoadedModel
from .monitor import ServerMonitor
from .settings import Settings

CHAT_GROUP = "model"  # the one concurrency group of every event that reaches the engine

TINY_BANNER = (
    "**This is the built-in tiny test model with random weights**: its answers are random words. "
    "It runs anywhere, offline, to show and test the app. To chat for real, start on a CUDA GPU "
    "(`make run` picks `openbmb/MiniCPM-V-4.6`) or choose a model: "
    "`make run ARGS=\"--model openbmb/MiniCPM-V-4.6 --quant int4\"`."
)
EXAMPLES = [
    ("What were the best and worst months in this chart?", "chart.png"),
    ("What is the total on this receipt, and which item cost the most?", "receipt.png"),
    ("Explain this diagram step by step.", "diagram.png"),
    ("Describe this scene in two sentences.", "scene.png"),
]


def stream_reply(service: ChatService, message, history, sampling: tuple,
                 system_prompt: str = "") -> Iterator[tuple[str, ReplyStats | None]]:
    """Yield (text so far, stats when done), with problems shown as Gradio messages.

    `sampling` is what the client sent as (max new tokens, temperature, top-p), checked here.
    Closing the iterator (stop button, closed tab) cancels the request in the engine.
    """
    try:
        stream, notices = service.submit(message, history, service.params(*sampling), system_prompt)
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
        stream.cancel()  # no-op when finished; frees the row after a stop or a closed tab


def build_ui(service: ChatService, loaded: LoadedModel, monitor: ServerMonitor) -> gr.Blocks:
    engine, settings, gpu = service.engine, service.settings, service.gpu

    # Uploads older than two hours are deleted every half hour: nothing is kept for long.
    with gr.Blocks(title="MiniCPM-V chat", fill_height=True, delete_cache=(1800, 7200)) as demo:
        gr.Markdown(f"## MiniCPM-V chat\nServing **{loaded.description}** · "
                    f"batching up to {engine.max_batch} users at once")
        if loaded.is_tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
        with gr.Tabs():
            with gr.Tab("Chat"):
                with gr.Row():
                    with gr.Column(scale=4):
                        chat = _chat_column(settings, service.defaults)
                    with gr.Column(scale=1, min_width=220):
                        server_panel = gr.HTML(_panel_html(gpu, engine), elem_id="server-panel")
            with gr.Tab("Server"):
                gr.Markdown("The last minutes of this server, sampled every few seconds.")
                memory_plot = gr.LinePlot(x="time", y="MB", title="GPU memory used (process memory without a GPU)",
                                          height=220)
                speed_plot = gr.LinePlot(x="time", y="tokens/s", title="Tokens per second", height=220)
                load_plot = gr.LinePlot(x="time", y="requests", color="what", title="Queue depth and batch size",
                                        height=220)
        chatbot, chat_input, stop_btn, retry_btn, undo_btn, clear_btn = chat["chat"]
        max_new_tokens, temperature, top_p, system_prompt = chat["settings"]
        timer = gr.Timer(settings.panel_interval)
        timer.tick(lambda: _panel_html(gpu, engine), None, server_panel, queue=False, api_visibility="private")
        timer.tick(lambda: _plots(monitor), None, [memory_plot, speed_plot, load_plot], queue=False,
                   api_visibility="private")

        def gpu_memory() -> dict:
            """GPU and process memory and the engine's queue and batch, as JSON."""
            return service.memory_snapshot()

        gr.api(gpu_memory, api_name="gpu_memory", queue=False)

        # Hidden components that give /chat its typed, keyword-friendly signature.
        with gr.Group(visible=False):
            api_message = gr.MultimodalTextbox(file_count="multiple", file_types=["image"])
            api_history = gr.JSON()
            # No `precision`: Gradio's rounding would refuse "abc" with a bare "Error"; the
            # service checks every setting and says what is wrong.
            api_max_new_tokens = gr.Number()
            api_temperature = gr.Number()
            api_top_p = gr.Number()
            api_reply = gr.Textbox()
            api_trigger = gr.Button()

        settings_inputs = [max_new_tokens, temperature, top_p, system_prompt]
        model_event = {"concurrency_id": CHAT_GROUP, "concurrency_limit": settings.concurrency}

        def respond(message, history, max_new, temp, p, system):
            """Show the user's message, then stream the reply into the chat."""
            history = list(history or [])
            try:
                shown = history + _user_messages(message)
            except InputError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            yield shown, None
            for text, stats in stream_reply(service, message, history, (max_new, temp, p), system):
                reply = [{"role": "assistant", "content": text}]
                if stats is not None:
                    reply.append({"role": "assistant", "content": "",
                                  "metadata": {"title": service.stats_line(stats), "status": "done"}})
                yield shown + reply, gr.skip()

        def retry(history, max_new, temp, p, system):
            try:
                earlier, message = _split_last_user_turn(history)
            except InputError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            if message is None:
                raise gr.Error("Nothing to retry yet.", print_exception=False)
            yield from respond(message, earlier, max_new, temp, p, system)

        def chat_api(message, history, max_new_tokens, temperature, top_p):
            """Answer `message` ({"text", "files"}) after `history`; streams the partial reply."""
            sent = None
            for text, _ in stream_reply(service, message, history or [], (max_new_tokens, temperature, top_p)):
                if text != sent:  # the stats that come with the end change nothing here
                    sent = text
                    yield text

        # Undocumented but callable: the tests drive the page's own handler through it.
        submit_event = chat_input.submit(respond, [chat_input, chatbot, *settings_inputs], [chatbot, chat_input],
                                         api_name="respond", api_visibility="undocumented", **model_event)
        retry_event = retry_btn.click(retry, [chatbot, *settings_inputs], [chatbot, chat_input],
                                      api_visibility="private", **model_event)
        api_trigger.click(chat_api, [api_message, api_history, api_max_new_tokens, api_temperature, api_top_p],
                          api_reply, api_name="chat", **model_event)
        stop_btn.click(None, None, None, cancels=[submit_event, retry_event], queue=False,
                       api_visibility="private")
        undo_btn.click(_split_last_user_turn, chatbot, [chatbot, chat_input], cancels=[submit_event, retry_event],
                       queue=False, api_visibility="private")
        clear_btn.click(lambda: ([], None), None, [chatbot, chat_input], cancels=[submit_event, retry_event],
                        queue=False, api_visibility="private")
    return demo


def _chat_column(settings: Settings, defaults: SamplingParams) -> dict:
    """The chat, its input, its buttons, the generation settings and the examples."""
    chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=520, buttons=["copy"])
    chat_input = gr.MultimodalTextbox(
        placeholder="Ask about an image: drop or upload one or more, then type a question…",
        file_types=["image"], file_count="multiple", sources=["upload"], show_label=False,
        elem_id="chat-input", max_plain_text_length=settings.max_message_chars)
    with gr.Row():
        stop_btn = gr.Button("Stop", elem_id="stop-btn", size="sm")
        retry_btn = gr.Button("Retry", elem_id="retry-btn", size="sm")
        undo_btn = gr.Button("Undo", elem_id="undo-btn", size="sm")
        clear_btn = gr.Button("Clear", elem_id="clear-btn", size="sm")
    with gr.Accordion("Generation settings", open=False):
        max_new_tokens = gr.Slider(1, settings.max_new_tokens, step=1, label="Max new tokens",
                                   value=defaults.max_new_tokens)
        temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
        system_prompt = gr.Textbox(label="System prompt", lines=2,
                                   placeholder="Optional: how the assistant should behave")
    gr.Examples(examples=[{"text": text, "files": [str(ASSETS / name)]} for text, name in EXAMPLES],
                inputs=chat_input, label="Examples")
    return {"chat": (chatbot, chat_input, stop_btn, retry_btn, undo_btn, clear_btn),
            "settings": (max_new_tokens, temperature, top_p, system_prompt)}


def _panel_html(gpu: GpuMemory, engine: Engine) -> str:
    """The live side panel: one bar per GPU, then the engine's state."""
    reading = gpu.read()
    parts = ["<div class='server-panel'><b>Server</b>"]
    for g in reading.gpus:
        share = 100 * g.memory_used_mb / g.memory_total_mb if g.memory_total_mb else 0
        busy = f" · {g.utilization_pct:.0f}% busy" if math.isfinite(g.utilization_pct) else ""
        temperature = f" · {g.temperature_c:.0f} °C" if g.temperature_c is not None else ""
        parts.append(
            f"<div>GPU {g.index}: {html.escape(g.name)}</div>"
            f"<div style='background:#e5e7eb;border-radius:4px;height:10px'><div style='width:{share:.0f}%;"
            f"background:#6366f1;height:10px;border-radius:4px'></div></div>"
            f"<div><small>{g.memory_used_mb:,.0f} / {g.memory_total_mb:,.0f} MB{busy}{temperature}</small></div>")
    if reading.error:
        stale = " (numbers above are the last good reading)" if reading.gpus else ""
        parts.append(f"<div><small>GPU memory unavailable: {html.escape(reading.error)}{stale}</small></div>")
    if reading.note is not None:
        parts.append(f"<div><small>{html.escape(reading.note)}</small></div>")
    elif not reading.gpus and not reading.error:
        parts.append("<div>No GPU: running on CPU</div>")
    if not reading.gpus and reading.note is None:
        parts.append(f"<div><small>process memory {process_rss_mb():,.0f} MB</small></div>")
    state = engine.state()
    health = "running" if state["alive"] else "<b>stopped</b>"
    parts.append(f"<div style='margin-top:6px'><small>engine {health} · queue {state['queue_depth']} · "
                 f"batch {state['batch_size']}/{state['batch_ceiling']} · "
                 f"{state['tokens_per_s']:.0f} tok/s</small></div></div>")
    return "".join(parts)


def _plots(monitor: ServerMonitor):
    samples = list(monitor.samples)
    times = [pd.Timestamp(s.time, unit="s") for s in samples]
    memory = pd.DataFrame({"time": times, "MB": [s.gpu_used_mb for s in samples]})
    speed = pd.DataFrame({"time": times, "tokens/s": [s.tokens_per_s for s in samples]})
    load = pd.DataFrame({"time": times * 2,
                         "requests": [s.queue_depth for s in samples] + [s.batch_size for s in samples],
                         "what": ["queue depth"] * len(samples) + ["batch size"] * len(samples)})
    return memory, speed, load


def _user_messages(message) -> list[dict]:
    """How a sent message appears in the chat: one bubble per image, then the text."""
    message = message if isinstance(message, dict) else {"text": str(message or ""), "files": []}
    shown = [{"role": "user", "content": {"path": file_path(f)}} for f in message.get("files") or []]
    if (message.get("text") or "").strip():
        shown.append({"role": "user", "content": message["text"]})
    return shown


def _split_last_user_turn(history) -> tuple[list[dict], dict | None]:
    """Split the chat into (everything before the last question, that question as a message)."""
    history = list(history or [])
    end = len(history)
    while end and history[end - 1]["role"] != "user":
        end -= 1
    start = end
    while start and history[start - 1]["role"] == "user":
        start -= 1
    if start == end:
        return history, None
    text, files = [], []
    for entry in history[start:end]:
        texts, paths = content_parts(entry["content"])
        text += texts
        files += paths
    return history[:start], {"text": "\n".join(text), "files": files}
