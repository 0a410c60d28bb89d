"""The sampling settings a checkpoint's authors ship in its `generation_config.json`.

They are what the page's sliders start at and what a client that sends no settings gets
(MiniCPM-V 4.6: temperature 0.7, top_p 1.0, top_k 0 = off). Only the values the file sets are
read: a field it leaves out keeps the server's own default rather than a library default
(transformers once filled top_k with 50 for every checkpoint).
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def checkpoint_sampling(generation_config) -> dict[str, float]:
    """The sampling fields `generation_config` sets, by `SamplingParams` field name.

    `do_sample: false` means greedy (temperature 0), whatever temperature the file names. A
    value that is not a finite number is left out with a warning: a broken file must not stop
    the server, and `ChatService` clamps the rest into range.
    """
    if generation_config is None:
        return {}
    named = generation_config.to_diff_dict()
    found: dict[str, float] = {}
    for name in SAMPLING_FIELDS:
        value = named.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            log.warning("ignoring the checkpoint's %s=%r: not a finite number", name, value)
            continue
        found[name] = value
    if named.get("do_sample") is False:
        found["temperature"] = 0.0
    return found
