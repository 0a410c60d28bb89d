"""Takes the README's screenshot: launches the app (tiny model), clicks an example in the empty
chat in a real headless Chromium, sends it, waits for the streamed answer and its stats caption,
saves a PNG. `--first-screen` saves the page as a visitor first meets it instead.

    python benchmarks/screenshot.py [--out docs/screenshot.png] [--width 1366 --height 900]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# No background traffic: this machine, like CI, has no network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--width", type=int, default=1366)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--first-screen", action="store_true", help="the empty page, no question asked")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    from minicpmv_demo.web.server import build_app
    from minicpmv_demo.config.settings import Settings

    app = build_app(Settings(model="tiny", cache_size=0))
    _, url, _ = app.launch(server_port=None, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(url)
            box = page.locator("#chat-input textarea")
            box.wait_for()
            page.wait_for_timeout(1000)  # let the page connect its queue before the first event
            if not args.first_screen:
                page.locator("#chatbot .example").get_by_text("What is the total on this receipt").click()
                page.wait_for_function("document.querySelector('#chat-input textarea').value.length > 0")
                box.press("Enter")
                page.locator("#chatbot .reply-stats").first.wait_for(timeout=60_000)
                page.wait_for_timeout(500)  # the box turns back from Stop to Send
            page.screenshot(path=args.out)
            browser.close()
    finally:
        app.close()
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
