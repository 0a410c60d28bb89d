"""The page's title, icon and CSS (Gradio 6 takes CSS and the favicon at launch).

Colours are chosen for contrast on Gradio's light theme: grey-600 (#4b5563) text on white is
7.6:1 and the page's instructions (placeholder, how-to, captions, footer) use it or darker;
Gradio's default placeholder grey measured 1.91:1.
"""

from __future__ import annotations

from pathlib import Path

PAGE_TITLE = "MiniCPM-V chat"
FAVICON = Path(__file__).resolve().parents[2] / "assets" / "favicon.png"
TEXT_SECONDARY = "#4b5563"

PAGE_CSS = f"""
#chat-input textarea::placeholder {{ color: {TEXT_SECONDARY}; opacity: 1; }}
#chatbot .placeholder-content, #chatbot .placeholder {{ color: #1f2937; padding: 0 12px; }}
#settings-summary, #settings-summary p {{ color: {TEXT_SECONDARY}; font-size: 13px; margin: 0; }}
footer, footer a, footer button {{ color: {TEXT_SECONDARY} !important; opacity: 1 !important; }}
#server-panel .server-panel {{ font-size: 14px; line-height: 1.45; color: #1f2937; }}
#server-panel .engine-line {{ margin-top: 6px; }}
#page-header h2 {{ margin-bottom: 0; }}
#page-header p, #tiny-banner p {{ margin: 0; }}
#tiny-banner {{ background: #fef3c7; color: #451a03; border-radius: 6px; padding: 4px 10px; }}
.reply-stats, .reply-error {{ font-size: 12.5px; color: {TEXT_SECONDARY}; }}
.reply-error {{ color: #991b1b; }}
#chatbot .message-row:has(.reply-stats), #chatbot .message-row:has(.reply-error) {{ margin-top: -8px; }}
/* A caption's own copy and rating buttons would act on the caption; its retry and undo stay. */
#chatbot .message-row:has(.reply-stats) + .message-buttons :is([aria-label="Copy message"], [aria-label="Like"],
  [aria-label="Dislike"]),
#chatbot .message-row:has(.reply-error) + .message-buttons :is([aria-label="Copy message"], [aria-label="Like"],
  [aria-label="Dislike"]) {{ display: none; }}
@media (max-width: 640px) {{
  #page-header h2 {{ font-size: 20px; }}
  #chatbot .examples {{ display: grid; grid-template-columns: 1fr 1fr; gap: 6px; }}
  #chatbot .example {{ padding: 6px 8px; font-size: 13px; }}
  #chatbot .placeholder-content h3 {{ font-size: 16px; margin: 0; }}
  #chatbot .placeholder-content p {{ font-size: 14px; margin: 4px 0; }}
}}
#chatbot .message-row:has(.reply-stats) .message, #chatbot .message-row:has(.reply-error) .message {{
  background: transparent !important; border: none !important; box-shadow: none !important;
  padding-top: 0 !important; padding-bottom: 0 !important; }}
"""
