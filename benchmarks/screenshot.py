"""Takes the README's screenshots: launches the app (the tiny model, whose answers are random
words: the page says so in its banner), clicks an example in the empty chat in a real headless
Chromium, sends it, waits for the streamed answer and its foot line, saves a PNG at desktop and
at phone size. `--first-screen` saves the page as a visitor first meets it instead.

    python benchmarks/screenshot.py [--out-dir docs] [--first-screen]

Writes screenshot.png (1366x900) and screenshot-phone.png (390x844), or first-screen*.png.
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
SIZES = {"": (1366, 900), "-phone": (390, 844)}
EXAMPLE = "What is the total on this receipt"


def answered(page, first_screen: bool) -> None:
    """The page after answering the receipt example (greedy, so the tiny model's reply runs to
    its 48-token limit instead of ending after a word)."""
    box = page.locator("#chat-input textarea")
    box.wait_for()
    page.wait_for_function("document.activeElement === document.querySelector('#chat-input textarea')")
    if first_screen:
        return
    page.get_by_text("Generation settings").click()
    for label, value in (("Max new tokens", "48"), ("Temperature", "0")):
        number = page.locator("#generation-settings").get_by_label(label, exact=False).first
        number.fill(value)
        number.press("Enter")
    page.locator("#settings-summary").get_by_text("up to 48 new tokens · greedy").wait_for()
    page.get_by_text("Generation settings").click()
    page.locator("#chatbot .example").get_by_text(EXAMPLE).click()
    page.wait_for_function("document.querySelector('#chat-input textarea').value.length > 0")
    box.press("Enter")
    page.locator("#chatbot .reply-foot").first.wait_for(timeout=60_000)
    page.locator("#chat-input button[aria-label='Submit']").wait_for()
    page.evaluate("window.scrollTo(0, 0)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(ROOT / "docs"))
    parser.add_argument("--first-screen", action="store_true", help="the empty page, no question asked")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    from minicpmv_demo.config.settings import Settings
    from minicpmv_demo.web.server import build_app

    app = build_app(Settings(model="tiny", cache_size=0))
    _, url, _ = app.launch(server_port=None, quiet=True)
    name = "first-screen" if args.first_screen else "screenshot"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for suffix, (width, height) in SIZES.items():
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto(url)
                answered(page, args.first_screen)
                out = Path(args.out_dir) / f"{name}{suffix}.png"
                page.screenshot(path=str(out))
                print(f"saved {out}")
                page.close()
            browser.close()
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
