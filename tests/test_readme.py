"""The README as a stranger meets it (issue 22, item 12): what the project is, the two commands
and a picture of the page answering, labelled as the offline demo model, on the first screen;
how to use the page soon after; the internals and operator details in docs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def body_lines() -> list[str]:
    """The README after its Spaces front matter (which must come first: Spaces reads it there)."""
    assert README.startswith("---\n"), "the Spaces front matter opens the file"
    end = README.index("\n---\n", 4)
    assert "sdk: gradio" in README[:end] and "app_file: app.py" in README[:end]
    return README[end + 5:].splitlines()


def test_the_first_screen_says_what_it_is_how_to_run_it_and_shows_it():
    lines = body_lines()
    first = [line for line in lines if line.strip()][0]
    assert first == "# minicpmv-demo", "nothing between the front matter and the introduction"
    top = "\n".join(lines[:30])
    assert "MiniCPM-V" in top and "make run" in top and "make test" in top
    picture = re.search(r"!\[([^\]]*)\]\((docs/[^)]+\.png)\)", top)
    assert picture and (ROOT / picture.group(2)).is_file(), "a picture of the page, on the first screen"
    around = top[picture.start() - 300:picture.end() + 300]
    assert "offline demo model" in around and "random words" in around, "labelled as the demo model"


def test_using_the_page_comes_early_and_the_internals_live_in_docs():
    lines = body_lines()
    headings = [(n, line) for n, line in enumerate(lines) if line.startswith("## ")]
    assert any(line == "## Using the page" and n < 60 for n, line in headings), headings
    assert any(line == "### Dependencies: the lock and the drift check" for line in lines)
    for doc in ("docs/operating.md", "docs/performance.md"):
        assert doc in README and (ROOT / doc).is_file()
    built = README[README.index("## How it is built"):]
    assert "docs/architecture.md" in built
    assert len(README.split()) < 1500, "the README stays short; details are in docs/"
    operating = (ROOT / "docs/operating.md").read_text(encoding="utf-8")
    for moved in ("## Settings", "## API", "## Scale out", "## Deploy to Spaces", "## Troubleshooting"):
        assert moved in operating, f"{moved} moved to docs/operating.md"
