"""MiniCPM-V chat demo: `python app.py --help` lists every setting (each has an env twin).

Also the Hugging Face Spaces entry point (`app_file: app.py`).
"""

from __future__ import annotations

import logging
import os
import sys

# Before gradio is imported: a demo that must work offline should not phone home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from minicpmv_demo.system.zerogpu import import_spaces_first  # noqa: E402

import_spaces_first()  # on a ZeroGPU Space `spaces` must patch torch before anything imports it

from minicpmv_demo.config.settings import parse_settings  # noqa: E402  (light: --help stays fast)


# HTTP clients that log every request at INFO: the backend probe asks every 2 s, and each chat
# sent to a backend is one more line. Their warnings still show; the probe logs its own changes.
QUIET_LOGGERS = ("httpx", "httpx2")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging()
    from minicpmv_demo.engine.start import EngineStartError
    from minicpmv_demo.model import ModelLoadError
    from minicpmv_demo.remote import BackendClientError
    from minicpmv_demo.web.server import build_app

    try:
        app = build_app(settings)
    except (ModelLoadError, BackendClientError, EngineStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app.launch(block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
