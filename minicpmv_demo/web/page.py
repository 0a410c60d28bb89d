"""The Gradio page and API. Handlers only submit to the engine and relay its stream.

Reads top to bottom like the page: title and banner, chat with its how-to and examples, input,
a one-line summary of the settings, the settings, the server panel and plots; then the events.
No handler touches the model, so no combination of clicks and clients can run it twice at once;
every model-calling event still shares one concurrency group so Gradio shows a queue position
beyond `--concurrency` instead of starting unbounded work.

A request the service refuses (InputError) is a toast and nothing else: the message stays in
the box to be fixed and never enters the chat, so it can never poison the history that later
questions send. Engine failures end the reply with a note in the chat, never an error overlay.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterator

import gradio as gr
import pandas as pd

from ..intake.message import InputError
from .chat_service import ASSETS, ChatService
from ..engine import ReplyError, ReplyStats, SamplingParams
from ..engine.contract import ServingEngine
from .feedback import FeedbackLog
from ..system.gpu import GpuMemory, process_rss_mb
from ..model import LoadedModel
from ..system.monitor import ServerMonitor
from ..config.settings import Settings
from .chat_view import (LiveReplies, ReplyView, error_note, message_text, question_before, split_last_user_turn,
                      stats_caption, user_bubbles, without_reply)
from .style import PAGE_TITLE

CHAT_GROUP = "model"  # the one concurrency group of every event that reaches the engine
VIDEO_TYPES = [".mp4", ".webm", ".mov"]
DEFAULT_SLICES = 9  # MiniCPM-V 4.6's own default

TINY_BANNER = "**Demo model: answers are random words.** Try the page, not the answers."
OPERATOR_HELP = (
    "This page runs the built-in tiny test model (the real architecture at toy size, random weights) so that "
    "it works anywhere, offline. Start the app on a CUDA GPU and `make run` serves `openbmb/MiniCPM-V-4.6`; or choose a model "
    "and precision: `make run ARGS=\"--model openbmb/MiniCPM-V-4.6 --quant int4\"`. "
    "`python app.py --help` lists every setting.")
EXAMPLES = [
    ("What were the best and worst months in this chart?", "chart.png"),
    ("What is the total on this receipt, and which item cost the most?", "receipt.png"),
    ("Explain this diagram step by step.", "diagram.png"),
    ("Describe this scene in two sentences.", "scene.png"),
]


def input_placeholder(settings: Settings) -> str:
    """The box's own instruction, with the limits stated before anyone hits them."""
    return (f"Ask a question; attach up to {settings.max_images} images ({settings.max_file_mb:g} MB each) "
            f"or a video ({settings.max_video_mb:g} MB)")


ANSWERING_PLACEHOLDER = "Answering… press ■ to stop. You can type your next question; send it when the answer ends."


def chat_howto(settings: Settings) -> str:
    """What the empty chat says: how to start, and what the page can do."""
    return (f"### Chat about pictures\n"
            f"Attach up to **{settings.max_images} images** ({settings.max_file_mb:g} MB each) **or a video** "
            f"({settings.max_video_mb:g} MB, {settings.max_video_seconds / 60:g} min), "
            f"ask a question, press **Enter**. Stop an answer with **■**; edit a question, retry or rate "
            f"an answer with the icons under it. Or start with an example:")


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


def build_ui(service: ChatService, loaded: LoadedModel, monitor: ServerMonitor) -> gr.Blocks:
    engine, settings, gpu = service.engine, service.settings, service.gpu
    live = LiveReplies()
    feedback = FeedbackLog(settings.feedback_log or None)
    idle_input = gr.MultimodalTextbox(submit_btn=True, stop_btn=False, placeholder=input_placeholder(settings))
    busy_input = gr.MultimodalTextbox(submit_btn=False, stop_btn=True, placeholder=ANSWERING_PLACEHOLDER)

    # Uploads older than two hours are deleted every half hour: nothing is kept for long.
    with gr.Blocks(title=PAGE_TITLE, fill_height=True, delete_cache=(1800, 7200)) as demo:
        precision = loaded.quantization if loaded.quantization != "none" else loaded.dtype
        gr.Markdown(f"## {PAGE_TITLE}\n**{html.escape(loaded.public_name)}** · {precision} · {loaded.device} · "
                    f"answers up to {engine.max_batch} people at once", elem_id="page-header")
        if loaded.is_tiny:
            gr.Markdown(TINY_BANNER, elem_id="tiny-banner")
            with gr.Accordion("About this demo (for the operator)", open=False, elem_id="operator-help"):
                gr.Markdown(OPERATOR_HELP)
        with gr.Tabs():
            with gr.Tab("Chat"):
                with gr.Row():
                    with gr.Column(scale=4):
                        chatbot, chat_input, summary, controls = _chat_column(settings, service.defaults,
                                                                              loaded.thinks_by_default)
                    with gr.Column(scale=1, min_width=220):
                        server_panel = gr.HTML(_panel_html(gpu, engine), elem_id="server-panel")
            with gr.Tab("Server"):
                gr.Markdown("The last minutes of this server, sampled every few seconds (times in UTC).")
                with gr.Row():
                    plot = {"x": "time", "x_title": "time (UTC)", "x_axis_format": "%H:%M:%S", "height": 220,
                            "min_width": 300}
                    memory_plot = gr.LinePlot(y="MB", title="Memory used (MB)", **plot)
                    speed_plot = gr.LinePlot(y="tokens/s", title="Tokens per second", **plot)
                with gr.Row():
                    # Two plots: on one, a queue of 0 hid under the batch line.
                    batch_plot = gr.LinePlot(y="requests", title="Batch size", y_lim=[0, engine.max_batch],
                                             y_axis_format="~g", **plot)
                    queue_plot = gr.LinePlot(y="requests", title="Waiting in queue", y_axis_format="~g", **plot)
        timer = gr.Timer(settings.panel_interval)
        timer.tick(lambda: _panel_html(gpu, engine), None, server_panel, queue=False, api_visibility="private")
        timer.tick(lambda: _plots(monitor), None, [memory_plot, speed_plot, batch_plot, queue_plot], queue=False,
                   api_visibility="private")

        def gpu_memory() -> dict:
            """GPU and process memory and the engine's queue and batch, as JSON."""
            return service.memory_snapshot()

        gr.api(gpu_memory, api_name="gpu_memory", queue=False)

        # Hidden components that give /chat its typed, keyword-friendly signature. None (not
        # sent) means the server's default for every setting after `history`.
        with gr.Group(visible=False):
            api_message = gr.MultimodalTextbox(file_count="multiple", file_types=["image", *VIDEO_TYPES])
            api_history = gr.JSON()
            # No `precision`: Gradio's rounding would refuse "abc" with a bare "Error"; the
            # service checks every setting and says what is wrong.
            api_max_new_tokens, api_temperature, api_top_p = gr.Number(), gr.Number(), gr.Number()
            api_top_k, api_repetition_penalty = gr.Number(), gr.Number()
            api_enable_thinking, api_downsample_mode = gr.JSON(), gr.JSON()
            api_max_slice_nums, api_max_num_frames = gr.Number(), gr.Number()
            api_reply = gr.Textbox()
            api_trigger = gr.Button()

        # The order keeps `/respond`'s first six arguments as they were (message, history, max new
        # tokens, temperature, top-p, system prompt); the newer settings follow.
        settings_inputs = [controls[name] for name in ("max_new_tokens", "temperature", "top_p", "system_prompt",
                                                        "top_k", "repetition_penalty", "thinking", "fine_detail",
                                                        "max_slices", "max_frames")]
        model_event = {"concurrency_id": CHAT_GROUP, "concurrency_limit": settings.concurrency}
        # A queue position or timer in a corner, never an overlay over the chat and the box (and Stop).
        reply_event = {**model_event, "show_progress": "minimal"}

        def respond(message, history, max_new, temp, p, system, top_k, penalty, thinking, fine, slices, frames,
                    request: gr.Request):
            """Check and queue the message; only then show it and stream the reply into the chat."""
            history = list(history or [])
            session = request.session_hash or ""
            if live.stopped_early(session):
                gr.Info("Stopped before the answer began; your message is still in the box.")
                yield gr.skip(), gr.skip()
                return
            try:
                params = service.params(max_new, temp, p, top_k, penalty)
                options = service.options(enable_thinking=bool(thinking), downsample_mode="4x" if fine else "16x",
                                          max_slice_nums=slices, max_num_frames=frames)
                shown = history + user_bubbles(message)
                stream, notices = service.submit(message, history, params, system or "", options=options)
            except InputError as exc:
                gr.Warning(str(exc))
                yield gr.skip(), gr.skip()  # the message stays in the box, the chat as it was
                return
            view = ReplyView(thinking=stream.thinking)
            live.start(session, stream, view, shown)
            try:
                for notice in notices:
                    gr.Info(notice)
                yield shown, None
                told = len(stream.notices)
                for text in stream.updates(service.current_stream_interval):
                    yield shown + view.messages(text), gr.skip()
                for notice in stream.notices[told:]:  # written while it streamed (a reasoning cut)
                    gr.Info(notice)
                stats = stream.stats
                yield shown + view.messages(stream.text, ended=True) + [
                    stats_caption(service.stats_line(stats), stats)], gr.skip()
            except ReplyError as exc:
                yield shown + view.messages(stream.text, ended=True) + [error_note(str(exc))], gr.skip()
            finally:
                stream.cancel()  # no-op when finished; frees the row after a stop or a closed tab
                live.end(session, stream)

        def retry(history, max_new, temp, p, system, top_k, penalty, thinking, fine, slices, frames,
                  request: gr.Request):
            """Answer the last question again, in place of its answer."""
            earlier, message = split_last_user_turn(history)
            if message is None:
                gr.Info("Nothing to retry yet.")
                yield gr.skip(), gr.skip()
                return
            yield from respond(message, earlier, max_new, temp, p, system, top_k, penalty, thinking, fine, slices,
                               frames, request)

        def edit(history, max_new, temp, p, system, top_k, penalty, thinking, fine, slices, frames,
                 edited: gr.EditData, request: gr.Request):
            """Rerun from an edited question: the chat after it is replaced by the new answer."""
            kept = list(history or [])[:edited.index] + [{"role": "user", "content": edited.value}]
            earlier, message = split_last_user_turn(kept)
            yield from respond(message, earlier, max_new, temp, p, system, top_k, penalty, thinking, fine, slices,
                               frames, request)

        def stop(request: gr.Request):
            """Cancel this tab's reply and redraw it as the engine left it, marked stopped."""
            stopped = live.stop(request.session_hash or "")
            if stopped is None:
                return gr.skip(), idle_input
            stream, view, shown = stopped
            stats = stream.stats
            line = service.stats_line(stats) if stats is not None else ""
            return shown + view.messages(stream.text, ended=True) + [stats_caption(line, stats, stopped=True)], \
                idle_input

        def undo(history, request: gr.Request):
            live.stop(request.session_hash or "", wait_s=0, early=False)
            earlier, message = split_last_user_turn(without_reply(list(history or [])))
            return earlier, message if message is not None else gr.skip()

        def clear(request: gr.Request):
            live.stop(request.session_hash or "", wait_s=0, early=False)
            return [], idle_input

        def rate(history, liked: gr.LikeData):
            """Append a like or dislike of one answer to the feedback log."""
            history = list(history or [])
            index = liked.index if isinstance(liked.index, int) else liked.index[0]
            if not 0 <= index < len(history):
                return
            question, images = question_before(history, index)
            rating = {True: "like", False: "dislike"}.get(liked.liked, str(liked.liked))
            feedback.record(rating=rating, question=question, answer=message_text(history[index]), images=images,
                            model=loaded.public_name)
            gr.Info("Thank you: your rating was saved.")

        def chat_api(message, history, max_new_tokens, temperature, top_p, top_k=None, repetition_penalty=None,
                     enable_thinking=None, downsample_mode=None, max_slice_nums=None, max_num_frames=None):
            """Answer `message` ({"text", "files"}) after `history`; streams the partial reply.

            Every setting after `history` may be left out (the server's default); the prompt
            options follow vLLM's names: enable_thinking, downsample_mode ("16x" or "4x"),
            max_slice_nums, max_num_frames.
            """
            sampling = (max_new_tokens, temperature, top_p, top_k, repetition_penalty)
            options = {"enable_thinking": enable_thinking, "downsample_mode": downsample_mode or None,
                       "max_slice_nums": max_slice_nums, "max_num_frames": max_num_frames}
            sent = None
            for text, _ in stream_reply(service, message, history or [], sampling, options=options):
                if text != sent:  # the stats that come with the end change nothing here
                    sent = text
                    yield text

        # Each way of starting a reply shows Stop in place of Send at once (no queue), and the
        # box returns to Send when the reply ends, fails, is refused or is stopped.
        reply_inputs = [chatbot, *settings_inputs]
        # Instant page-only events: never a progress overlay over the box (it would cover Stop).
        quick = {"queue": False, "api_visibility": "private", "show_progress": "hidden"}
        show_busy = {"fn": lambda: busy_input, "inputs": None, "outputs": chat_input, **quick}
        chat_input.submit(**show_busy)
        # Undocumented but callable: the tests drive the page's own handler through it.
        submit_event = chat_input.submit(respond, [chat_input, *reply_inputs], [chatbot, chat_input],
                                         api_name="respond", api_visibility="undocumented", **reply_event)
        chatbot.retry(**show_busy)
        retry_event = chatbot.retry(retry, reply_inputs, [chatbot, chat_input], api_visibility="private",
                                    **reply_event)
        chatbot.edit(**show_busy)
        edit_event = chatbot.edit(edit, reply_inputs, [chatbot, chat_input], api_visibility="private",
                                  **reply_event)
        reply_events = [submit_event, retry_event, edit_event]
        for event in reply_events:
            event.then(lambda: idle_input, None, chat_input, **quick)
        api_trigger.click(chat_api, [api_message, api_history, api_max_new_tokens, api_temperature, api_top_p,
                                     api_top_k, api_repetition_penalty, api_enable_thinking, api_downsample_mode,
                                     api_max_slice_nums, api_max_num_frames],
                          api_reply, api_name="chat", **model_event)
        chat_input.stop(stop, None, [chatbot, chat_input], cancels=reply_events, **quick)
        chatbot.undo(undo, chatbot, [chatbot, chat_input], cancels=reply_events, **quick)
        chatbot.clear(clear, None, [chatbot, chat_input], cancels=reply_events, **quick)
        # Queued (its own group) only so that the thank-you toast reaches the page.
        chatbot.like(rate, chatbot, None, api_visibility="private")
        chatbot.example_select(_example_message, None, chat_input, **quick)
        setting_controls = [controls[name] for name in ("max_new_tokens", "temperature", "top_p", "top_k",
                                                         "repetition_penalty", "thinking", "fine_detail",
                                                         "max_slices", "max_frames")]
        for control in setting_controls:
            control.change(_settings_summary, setting_controls, summary, **quick)
    return demo


def _chat_column(settings: Settings, defaults: SamplingParams, thinks_by_default: bool) -> tuple:
    """The chat (with its how-to and examples while empty), the input, the settings.

    Every control starts at what a client that sends nothing gets: the checkpoint's sampling
    defaults and its thinking (on for a Thinking checkpoint), the server's video frames.
    """
    chatbot = gr.Chatbot(
        label="Chat", show_label=False, elem_id="chatbot", height="50vh", min_height=280, buttons=["copy"],
        editable="user", group_consecutive_messages=False, placeholder=chat_howto(settings),
        examples=[{"text": text, "display_text": text, "files": [str(ASSETS / name)]} for text, name in EXAMPLES])
    chat_input = gr.MultimodalTextbox(
        label="Your message (text, and up to "
              f"{settings.max_images} images or a video)", show_label=False,
        placeholder=input_placeholder(settings), file_types=["image", *VIDEO_TYPES], file_count="multiple",
        sources=["upload"], elem_id="chat-input", max_plain_text_length=settings.max_message_chars,
        submit_btn=True, stop_btn=False)
    values = {"max_new_tokens": defaults.max_new_tokens, "temperature": defaults.temperature,
              "top_p": defaults.top_p, "top_k": defaults.top_k, "repetition_penalty": defaults.repetition_penalty,
              "thinking": thinks_by_default, "fine_detail": False, "max_slices": DEFAULT_SLICES,
              "max_frames": min(settings.video_frames, settings.max_video_frames)}
    summary = gr.Markdown(_settings_summary(*values.values()), elem_id="settings-summary")
    with gr.Accordion("Generation settings", open=False, elem_id="generation-settings"):
        with gr.Row():
            thinking = gr.Checkbox(value=values["thinking"], label="Thinking",
                                   info="reason step by step before answering (shown folded)")
            fine_detail = gr.Checkbox(value=values["fine_detail"], label="Fine detail",
                                      info="4x more visual tokens per picture: small text, slower")
        max_new_tokens = gr.Slider(1, settings.max_new_tokens, step=1, label="Max new tokens",
                                   value=values["max_new_tokens"])
        temperature = gr.Slider(0.0, 2.0, value=values["temperature"], step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=values["top_p"], step=0.05, label="Top-p")
        top_k = gr.Slider(0, 100, value=values["top_k"], step=1, label="Top-k (0 = off)")
        repetition_penalty = gr.Slider(1.0, 2.0, value=values["repetition_penalty"], step=0.05,
                                       label="Repetition penalty (1 = off)")
        max_slices = gr.Slider(1, 36, value=values["max_slices"], step=1, label="Max slices per picture",
                               info="36 for detailed pictures")
        max_frames = gr.Slider(1, settings.max_video_frames, value=values["max_frames"], step=1,
                               label="Max frames per video")
        system_prompt = gr.Textbox(label="System prompt", lines=2,
                                   placeholder="Optional: how the assistant should behave")
    controls = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "repetition_penalty": repetition_penalty, "thinking": thinking, "fine_detail": fine_detail,
                "max_slices": max_slices, "max_frames": max_frames, "system_prompt": system_prompt}
    return chatbot, chat_input, summary, controls


def _settings_summary(max_new, temperature, top_p, top_k, penalty, thinking, fine, slices, frames) -> str:
    """One line under the box: what the next answer will be made with."""
    parts = [f"up to {int(max_new)} new tokens",
             "greedy" if not temperature else f"temperature {temperature:g} · top-p {top_p:g}"]
    if temperature and top_k:
        parts.append(f"top-k {int(top_k)}")
    if penalty and penalty != 1:
        parts.append(f"repetition penalty {penalty:g}")
    parts += ["thinking on" if thinking else "thinking off", "fine detail" if fine else "normal detail",
              f"{int(slices)} slices", f"{int(frames)} video frames"]
    return "Settings: " + " · ".join(parts)


def _example_message(selected: gr.SelectData) -> dict:
    """An example clicked in the empty chat fills the box; the visitor presses Enter."""
    value = selected.value or {}
    files = [f["path"] if isinstance(f, dict) else f for f in value.get("files") or []]
    return {"text": value.get("text", ""), "files": files}


def _panel_html(gpu: GpuMemory, engine: ServingEngine) -> str:
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
            f"<div>{g.memory_used_mb:,.0f} / {g.memory_total_mb:,.0f} MB{busy}{temperature}</div>")
    if reading.error:
        stale = " (numbers above are the last good reading)" if reading.gpus else ""
        parts.append(f"<div>GPU memory unavailable: {html.escape(reading.error)}{stale}</div>")
    if reading.note is not None:  # the model runs on a backend: what it reports
        parts.append(f"<div>{html.escape(reading.note)}</div>")
    elif not reading.gpus and not reading.error:
        parts.append("<div>No GPU: running on CPU</div>")
    if not reading.gpus and reading.note is None:
        parts.append(f"<div>process memory {process_rss_mb():,.0f} MB</div>")
    state = engine.state()
    health = "running" if state.alive else "<b>stopped</b>"
    parts.append(f"<div class='engine-line'>engine {health} · queue {state.queue_depth} · "
                 f"batch {state.batch_size}/{state.batch_ceiling}</div>"
                 f"<div>{state.tokens_per_s:.0f} tok/s over all replies, last 5 s "
                 f"(a reply's own speed is under it)</div></div>")
    return "".join(parts)


def _plots(monitor: ServerMonitor):
    samples = list(monitor.samples)
    times = [pd.Timestamp(s.time, unit="s") for s in samples]
    memory = pd.DataFrame({"time": times, "MB": [s.gpu_used_mb for s in samples]})
    speed = pd.DataFrame({"time": times, "tokens/s": [s.tokens_per_s for s in samples]})
    batch = pd.DataFrame({"time": times, "requests": [s.batch_size for s in samples]})
    queue = pd.DataFrame({"time": times, "requests": [s.queue_depth for s in samples]})
    return memory, speed, batch, queue


