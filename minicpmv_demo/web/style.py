"""The page's title, icon, CSS and head script (Gradio 6 takes them at launch).

Colours are chosen for contrast on Gradio's light theme (WCAG AA asks 4.5:1 for text): grey-600
(#4b5563) on white is 7.6:1 and every instruction, hint, range label and caption uses it or
darker; Gradio's default greys measured 1.91:1 (hints, placeholders) and 2.8:1 (the active tab).
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from ..config.settings import Settings

PAGE_TITLE = "MiniCPM-V chat"
FAVICON = Path(__file__).resolve().parents[2] / "assets" / "favicon.png"
PAGE_SCRIPT = Path(__file__).with_name("page.js")
TEXT_SECONDARY = "#4b5563"
ACCENT = "#4338ca"  # indigo-700: 7.9:1 on white

# The row under a reply: one icon per action, 24x24 stroked paths drawn for this page (the
# buttons carry their names for screen readers). Not emoji: some systems have no emoji font.
ACTION_ICONS = {
    "copy": "<rect x='8' y='8' width='12' height='12' rx='2'/><path d='M16 8V6a2 2 0 0 0-2-2H6a2 2 0 0 0-2 2v8a2 2 0 0 0 2 2h2'/>",
    "retry": "<path d='M20 12a8 8 0 1 1-2.34-5.66'/><path d='M20 4v5h-5'/>",
    "edit": "<path d='M4 20h4L19 9l-4-4L4 16z'/><path d='M13.5 6.5l4 4'/>",
    "undo": "<path d='M9 14L4 9l5-5'/><path d='M4 9h10a6 6 0 0 1 0 12h-3'/>",
    "like": "<path d='M7 10v11H4V10z'/><path d='M7 10l4-7a2 2 0 0 1 3 2l-1 5h6a2 2 0 0 1 2 2.3l-1.4 7A2 2 0 0 1 17.6 21H7'/>",
    "dislike": "<path d='M7 14V3H4v11z'/><path d='M7 14l4 7a2 2 0 0 0 3-2l-1-5h6a2 2 0 0 0 2-2.3l-1.4-7A2 2 0 0 0 17.6 3H7'/>",
}

BASE_CSS = f"""
.sr-only {{ position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0);
  white-space: nowrap; }}
#page-header h2 {{ margin-bottom: 0; }}
#page-header p, #tiny-banner p {{ margin: 0; }}
#page-header .model-line {{ color: {TEXT_SECONDARY}; }}
#tiny-banner {{ background: #fef3c7; color: #451a03; border-radius: 6px; padding: 4px 10px; }}
#page-tabs button[role='tab'] {{ color: {TEXT_SECONDARY}; }}
#page-tabs button[role='tab'][aria-selected='true'] {{ color: {ACCENT}; font-weight: 600; }}
#chat-list {{ gap: 8px; align-items: center; }}
#past-chats .wrap-inner {{ padding-top: 0; padding-bottom: 0; }}
#past-chats .secondary-wrap, #past-chats input {{ height: 34px; }}
#past-chats input::placeholder {{ color: {TEXT_SECONDARY}; opacity: 1; }}
body:has(#chat-input button[aria-label='Stop']) :is(#new-chat, #past-chats) {{ opacity: 0.5; pointer-events: none; }}

/* The message box: a visible focus ring, the limits in a readable grey, a file counter. */
#chat-input:focus-within {{ outline: 3px solid {ACCENT}; outline-offset: -3px; }}
#chat-input textarea::placeholder {{ color: {TEXT_SECONDARY}; opacity: 1; }}
#chat-input .thumbnails {{ counter-reset: files; align-items: center; }}
#chat-input .thumbnail-item {{ counter-increment: files; }}
#chat-input .thumbnails::after {{ content: counter(files) "/__MAX_FILES__ files"; color: {TEXT_SECONDARY};
  font-size: 13px; margin-left: 4px; white-space: nowrap; }}
/* Remove a file with a small round button on its corner, shown without a hover (touch screens):
   the picture itself no longer deletes it when tapped. */
#chat-input .thumbnail-wrapper {{ padding: 6px 6px 0 0; }}
#chat-input .thumbnail-item .delete-button {{ opacity: 1; inset: auto; top: -6px; right: -6px; width: 22px;
  height: 22px; border-radius: 50%; background: #1f2937; border: 2px solid white; }}
#chat-input .thumbnail-item .delete-button :is(svg) {{ width: 12px; height: 12px; }}

/* The chat. */
#chatbot .placeholder-content, #chatbot .placeholder {{ color: #1f2937; padding: 0 12px; }}
#chatbot button[aria-label='Clear'] {{ display: none; }}
#chatbot .user-row + .message-buttons, #chatbot .bot-row + .message-buttons {{ display: none !important; }}
/* A question's pictures: one row of thumbnails, full size on click (page.js). */
#chatbot .user-row .user.message {{ display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-end; }}
#chatbot .user-row .message.component {{ width: auto !important; flex: 0 0 auto; padding: 0 !important; }}
#chatbot .user-row .message:not(.component) {{ flex-basis: 100%; }}
#chatbot .user-row .image-container {{ height: 84px !important; }}
#chatbot .user-row .image-container img {{ height: 84px !important; width: auto !important; max-width: 140px;
  object-fit: cover; border-radius: 6px; cursor: zoom-in; }}
#chatbot .user-row .image-container .icon-button-wrapper {{ display: none; }}
#picture-viewer {{ position: fixed; inset: 0; z-index: 1000; background: rgba(17, 24, 39, 0.85);
  display: flex; align-items: center; justify-content: center; cursor: zoom-out; }}
#picture-viewer img {{ max-width: 96vw; max-height: 92vh; object-fit: contain; }}
/* A reply's foot line: its row of actions, then its stats. */
.reply-foot {{ display: flex; flex-wrap: wrap; align-items: center; gap: 2px 10px; }}
.reply-actions {{ display: inline-flex; gap: 2px; }}
.reply-action {{ width: 30px; height: 28px; border-radius: 6px; color: #374151; display: inline-flex;
  align-items: center; justify-content: center; }}
.reply-action::before {{ content: ''; width: 17px; height: 17px; background: currentColor;
  -webkit-mask-size: contain; mask-size: contain; -webkit-mask-repeat: no-repeat; mask-repeat: no-repeat; }}
.reply-action:hover, .reply-action:focus-visible {{ background: #e5e7eb; }}
.reply-action.pressed, .reply-action.done {{ background: #e0e7ff; }}
#chatbot .bot-row:has(~ .bot-row) :is(.act-retry, .act-edit, .act-undo) {{ display: none; }}
.reply-stats, .reply-error, .reply-waiting {{ font-size: 13px; color: {TEXT_SECONDARY}; }}
.reply-error {{ color: #991b1b; }}
.reply-waiting {{ font-style: italic; }}

/* The settings: hints and range labels readable; the summary under the box. */
#settings-summary, #settings-summary p {{ color: {TEXT_SECONDARY}; font-size: 13px; margin: 0; }}
#generation-settings :is(.info-text, .min_value, .max_value) {{
  color: {TEXT_SECONDARY} !important; opacity: 1 !important; }}
#generation-settings textarea::placeholder {{ color: {TEXT_SECONDARY}; opacity: 1; }}
footer, footer a, footer button {{ color: {TEXT_SECONDARY} !important; opacity: 1 !important; }}

#server-panel .server-panel {{ font-size: 14px; line-height: 1.45; color: #1f2937; }}
#server-panel .engine-line {{ margin-top: 6px; }}
#server-panel .memory-bar {{ background: #e5e7eb; border-radius: 4px; height: 10px; }}
#server-panel .memory-bar div {{ background: #6366f1; height: 10px; border-radius: 4px; }}

/* A phone: a short header, the message box pinned to the bottom of the screen as in chat apps. */
@media (max-width: 640px) {{
  .column {{ gap: 8px; }}
  #page-header h2 {{ font-size: 18px; margin: 0; }}
  #page-header .model-line {{ font-size: 12px; }}
  #tiny-banner {{ font-size: 13px; padding: 2px 8px; }}
  #tiny-banner .more {{ display: none; }}
  #page-tabs button[role='tab'] {{ padding: 2px 10px; min-height: 0; }}
  #chat-list button {{ min-height: 0; height: 34px; }}
  #chat-input {{ position: fixed; left: 8px; right: 8px; bottom: 8px; z-index: 20; width: auto !important;
    background: var(--background-fill-primary);
    box-shadow: 0 0 0 8px var(--background-fill-primary), 0 -10px 18px 4px rgba(17, 24, 39, 0.10) !important; }}
  #chatbot .examples {{ display: grid; grid-template-columns: 1fr 1fr; gap: 6px; }}
  #chatbot .example {{ padding: 6px 8px; font-size: 13px; }}
  #chatbot .placeholder-content h3 {{ font-size: 16px; margin: 0; }}
  #chatbot .placeholder-content p {{ font-size: 14px; margin: 4px 0; }}
}}
"""


def page_css(settings: Settings) -> str:
    """The page's CSS, with the file counter's limit."""
    return BASE_CSS.replace("__MAX_FILES__", str(settings.max_images))


# Gradio scopes the `css` it is given to the page's content; the frame around it is styled here.
# On a phone the message box is fixed to the bottom of the screen: the page ends with room for it.
FRAME_CSS = "@media (max-width: 640px) { .gradio-container .main.app { padding: 6px 8px 150px; } }"


def page_head(settings: Settings) -> str:
    """The script the page runs (page.js) after the limits it checks files against; the icons
    of the reply actions and the page's frame (CSS that Gradio's scoping would not reach)."""
    config = {"maxImages": settings.max_images, "maxFileMb": settings.max_file_mb, "maxVideoMb": settings.max_video_mb}
    return (f"<script>window.minicpmvConfig = {json.dumps(config)};</script>\n"
            f"<script>{PAGE_SCRIPT.read_text(encoding='utf-8')}</script>\n"
            f"<style>{_action_icons()}\n{FRAME_CSS}</style>")


def _action_icons() -> str:
    """CSS drawing each reply action's icon (an SVG mask, so it takes the button's colour)."""
    rules = []
    for name, paths in ACTION_ICONS.items():
        svg = (f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24' fill='none' stroke='black' "
               f"stroke-width='2' stroke-linecap='round' stroke-linejoin='round'>{paths}</svg>")
        url = "url(\"data:image/svg+xml," + quote(svg) + "\")"
        rules.append(f".act-{name}::before {{ -webkit-mask-image: {url}; mask-image: {url}; }}")
    return "\n".join(rules)
