"""Settings: every flag has an env twin, flags win, bad values are refused with the flag's name."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from minicpmv_demo.config.settings import Settings, parse_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_env_and_flags():
    assert parse_settings([], environ={}) == Settings()
    env = {"MINICPMV_PORT": "9000", "MINICPMV_SHARE": "true", "MINICPMV_MAX_BATCH": "3"}
    settings = parse_settings(["--max-batch", "5"], environ=env)
    assert (settings.port, settings.share, settings.max_batch) == (9000, True, 5)


def test_bad_values_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--max-batch", "0"], environ={})
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--auth", "nopassword"], environ={})
    assert "user:password" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="MINICPMV_PORT"):
        parse_settings([], environ={"MINICPMV_PORT": "eighty"})
    with pytest.raises(SystemExit):
        parse_settings(["--video-frames", "80"], environ={})  # above --max-video-frames' 64
    assert "1 <= --video-frames <= --max-video-frames <= 128" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings([], environ={"MINICPMV_MAX_VIDEO_MB": "0"})
    assert "--max-video-mb and --max-video-seconds must be positive" in capsys.readouterr().err
    assert parse_settings(["--max-video-mb", "50"], environ={}).max_upload_mb == 50


def test_help_lists_every_flag_with_its_env_twin():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120).stdout
    for spec in fields(Settings):
        assert "--" + spec.name.replace("_", "-") in out
        assert "MINICPMV_" + spec.name.upper() in out
