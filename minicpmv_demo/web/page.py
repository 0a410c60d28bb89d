"""The Gradio page: `build_ui` reads top to bottom like the page looks.

Title and model line; the chat (past chats and New chat, the conversation with its how-to and
examples while empty, the message box, a one-line summary of the settings, the settings) beside
the live server panel; the Server tab's plots; then the parts the visitor never sees (the
question id, the browser's saved chats, the API). The events are wired in `page_events`, the
handlers live in `chat_handlers`: nothing here touches the engine, let alone the model.
"""

from __future__ import annotations

import html
import types

import gradio as gr
from gradio.events import Events

from ..config.settings import Settings
from ..engine import SamplingParams
from ..engine.contract import ServingEngine
from ..model import LoadedModel
from ..system.monitor import ServerMonitor
from .chat_api import VIDEO_TYPES, add_chat_api
from .chat_handlers import ChatHandlers
from .chat_service import ASSETS, ChatService
from .chat_view import chat_howto, input_placeholder
from .feedback import FeedbackLog
from .page_events import PageParts, wire_page
from .server_panel import panel_html
from .style import PAGE_TITLE
from .waiting import WaitingLine

CHAT_GROUP = "model"  # the one concurrency group of every event that reaches the engine
DEFAULT_SLICES = 9  # MiniCPM-V 4.6's own default
TINY_BANNER = "**Demo model: answers are random words.** <span class='more'>Try the page, not the answers.</span>"
SAVED_CHATS_KEY = "minicpmv-demo-chats"
# BrowserState encrypts what it stores with this; a fixed one keeps the chats across restarts of
# the server. The chats are the visitor's own, in the visitor's own browser.
SAVED_CHATS_SECRET = "minicpmv-demo-saved-chats-v1"
EXAMPLES = [
    ("What were the best and worst months in this chart?", "chart.png"),
    ("What is the total on this receipt, and which item cost the most?", "receipt.png"),
    ("Explain this diagram step by step.", "diagram.png"),
    ("Describe this scene in two sentences.", "scene.png"),
]


def listening_to_uploads(box: gr.MultimodalTextbox) -> gr.MultimodalTextbox:
    """The box, with the `upload` event its frontend sends for each attachment (Gradio's Python
    class does not list it), so that files are checked the moment they are attached. Given to
    this box alone: a subclass of a component makes Gradio write a .pyi stub beside this file."""
    box.upload = types.MethodType(Events.upload.copy().listener, box)
    return box


def build_ui(service: ChatService, loaded: LoadedModel, monitor: ServerMonitor) -> gr.Blocks:
    settings = service.settings
    waiting = WaitingLine(service, CHAT_GROUP)
    feedback = FeedbackLog(settings.feedback_log or None, max_bytes=int(settings.feedback_log_mb * 2**20))
    handlers = ChatHandlers(service, loaded.public_name, waiting, feedback)
    # Uploads older than two hours are deleted every half hour: nothing is kept for long.
    with gr.Blocks(title=PAGE_TITLE, fill_height=True, delete_cache=(1800, 7200)) as demo:
        _header(loaded, service.engine)
        with gr.Tabs(elem_id="page-tabs"):
            with gr.Tab("Chat"):
                with gr.Row():
                    with gr.Column(scale=4):
                        with gr.Row(elem_id="chat-list"):
                            new_chat = gr.Button("New chat", size="sm", scale=0, min_width=96, elem_id="new-chat")
                            past_chats = gr.Dropdown(label="Past chats (kept in this browser only)",
                                                     show_label=False, choices=[], value=None, scale=1,
                                                     container=False, elem_id="past-chats")
                        chatbot = _chat_window(settings)
                        chat_input = _message_box(settings)
                        summary, controls, defaults, reset = _settings(settings, service.defaults,
                                                                       loaded.thinks_by_default)
                    with gr.Column(scale=1, min_width=220):
                        server_panel = gr.HTML(panel_html(service.gpu, service.engine, 0), elem_id="server-panel")
            with gr.Tab("Server"):
                plots = _server_plots(service.engine)
        parts = PageParts(chatbot=chatbot, chat_input=chat_input, new_chat=new_chat, past_chats=past_chats,
                          summary=summary, controls=controls, defaults=defaults, reset=reset,
                          server_panel=server_panel, plots=plots,
                          **_unseen_parts())
        model_event = {"concurrency_id": CHAT_GROUP, "concurrency_limit": settings.concurrency}
        add_chat_api(service, model_event)
        wire_page(demo, parts, handlers, service, monitor, waiting, model_event)
    waiting.bind(demo)
    return demo


def _header(loaded: LoadedModel, engine: ServingEngine) -> None:
    precision = loaded.quantization if loaded.quantization != "none" else loaded.dtype
    gr.Markdown(f"## {PAGE_TITLE}\n<span class='model-line'>**{html.escape(loaded.public_name)}** · {precision} · "
                f"{loaded.device} · answers up to {engine.max_batch} people at once</span>", elem_id="page-header")
    if loaded.is_tiny:
        gr.Markdown(TINY_BANNER, elem_id="tiny-banner")


def _chat_window(settings: Settings) -> gr.Chatbot:
    """The conversation: its how-to and examples while empty. A turn's messages are one bubble
    (pictures as a row of thumbnails; a reply's reasoning, answer and foot line together)."""
    return gr.Chatbot(
        label="Chat", show_label=False, elem_id="chatbot", height="55vh", min_height=280, buttons=[],
        group_consecutive_messages=True, placeholder=chat_howto(settings),
        examples=[{"text": text, "display_text": text, "files": [str(ASSETS / name)]} for text, name in EXAMPLES])


def _message_box(settings: Settings) -> gr.MultimodalTextbox:
    return listening_to_uploads(gr.MultimodalTextbox(
        label=f"Your message (text, and up to {settings.max_images} images or a video)", show_label=False,
        placeholder=input_placeholder(settings), file_types=["image", *VIDEO_TYPES], file_count="multiple",
        sources=["upload"], elem_id="chat-input", max_plain_text_length=settings.max_message_chars,
        submit_btn=True, stop_btn=False, autofocus=True))


def _settings(settings: Settings, defaults: SamplingParams, thinks_by_default: bool) -> tuple:
    """A one-line summary under the box, then the settings, folded, with a reset button; returns
    (summary, controls by name, their default values in that order, the reset button).

    Every control starts at what a client that sends nothing gets: the checkpoint's sampling
    defaults and its thinking (on for a Thinking checkpoint), the server's video frames.
    """
    values = {"max_new_tokens": defaults.max_new_tokens, "temperature": defaults.temperature,
              "top_p": defaults.top_p, "top_k": defaults.top_k, "repetition_penalty": defaults.repetition_penalty,
              "thinking": thinks_by_default, "fine_detail": False, "max_slices": DEFAULT_SLICES,
              "max_frames": min(settings.video_frames, settings.max_video_frames), "system_prompt": ""}
    summary = gr.Markdown("", elem_id="settings-summary")  # written by the page script on load (page.js)
    with gr.Accordion("Generation settings", open=False, elem_id="generation-settings"):
        with gr.Row():
            thinking = gr.Checkbox(value=values["thinking"], label="Thinking",
                                   info="reason step by step before answering (shown folded)")
            fine_detail = gr.Checkbox(value=values["fine_detail"], label="Fine detail",
                                      info="4x more visual tokens per picture: small text, slower")
        controls = {
            "max_new_tokens": gr.Slider(1, settings.max_new_tokens, step=1, label="Max new tokens",
                                        value=values["max_new_tokens"], info="the longest answer, in tokens"),
            "temperature": gr.Slider(0.0, 2.0, value=values["temperature"], step=0.05,
                                     label="Temperature (0 = greedy)", info="higher: more varied, less exact"),
            "top_p": gr.Slider(0.05, 1.0, value=values["top_p"], step=0.05, label="Top-p",
                               info="pick only among the likeliest words that make up this share"),
            "top_k": gr.Slider(0, 100, value=values["top_k"], step=1, label="Top-k (0 = off)",
                               info="pick only among this many likeliest words"),
            "repetition_penalty": gr.Slider(1.0, 2.0, value=values["repetition_penalty"], step=0.05,
                                            label="Repetition penalty (1 = off)",
                                            info="above 1: repeats itself less"),
            "thinking": thinking, "fine_detail": fine_detail,
            "max_slices": gr.Slider(1, 36, value=values["max_slices"], step=1, label="Max slices per picture",
                                    info="a large picture is read in up to this many tiles; 36 for detail"),
            "max_frames": gr.Slider(1, settings.max_video_frames, value=values["max_frames"], step=1,
                                    label="Max frames per video", info="frames read from a video"),
            "system_prompt": gr.Textbox(label="System prompt", lines=2, max_length=settings.max_message_chars,
                                        placeholder="Optional: how the assistant should behave"),
        }
        reset = gr.Button("Reset to defaults", size="sm", elem_id="reset-settings")
    return summary, controls, [values[name] for name in controls], reset


def _server_plots(engine: ServingEngine) -> list[gr.LinePlot]:
    """The Server tab: the last minutes of memory, speed, batch and queue (times in UTC)."""
    gr.Markdown("The last minutes of this server, sampled every few seconds (times in UTC).")
    plot = {"x": "time", "x_title": "time (UTC)", "x_axis_format": "%H:%M:%S", "height": 220, "min_width": 300}
    with gr.Row():
        # From 0: on an axis that starts at the lowest reading, a 15 MB change looked like a cliff.
        memory = gr.LinePlot(y="MB", title="Memory used (MB)", y_lim=[0, None], elem_id="memory-plot", **plot)
        speed = gr.LinePlot(y="tokens/s", title="Tokens per second", y_lim=[0, None], **plot)
    with gr.Row():
        # Two plots: on one, a queue of 0 hid under the batch line.
        batch = gr.LinePlot(y="requests", title="Batch size", y_lim=[0, engine.max_batch], y_axis_format="~g", **plot)
        queue = gr.LinePlot(y="requests", title="Waiting in the engine's queue", y_lim=[0, None], y_axis_format="~g", **plot)
    return [memory, speed, batch, queue]


def _unseen_parts() -> dict:
    """What the page keeps without showing it: the id of the question being answered (Stop
    names it), the chats saved in the browser, and the buttons the row under a reply presses
    (the page script clicks them)."""
    with gr.Group(visible=False):
        question_id, notice_text = gr.Textbox(), gr.Textbox()
    return {
        "question_id": question_id,
        "notice_text": notice_text,
        "saved": gr.BrowserState(None, storage_key=SAVED_CHATS_KEY, secret=SAVED_CHATS_SECRET),
        "retry": gr.Button("Retry", visible="hidden", elem_id="retry-question"),
        "edit": gr.Button("Edit", visible="hidden", elem_id="edit-question"),
        "undo": gr.Button("Undo", visible="hidden", elem_id="undo-question"),
        "notice": gr.Button("Notice", visible="hidden", elem_id="page-notice"),
    }
