"""The GPU check (benchmarks/gpu_check.sh) end to end at --reduced on the CPU, as a lent GPU
machine would run it: without PyAV, Gradio and the other packages that machine lacks.

And the comparison of stage 1, which must catch what it exists to catch: a captured batch that
computes something else, a graph that recorded nothing, a graph that replays stale logits.
Nothing here depends on timing: stage files are read for their form, not their numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import capture_check  # noqa: E402
import engine_surface as surface  # noqa: E402
from check_report import StageReport, read_stage  # noqa: E402
from gpu_check import Stage, supervise  # noqa: E402
from gpu_stages import AGREEMENT_FLOOR, CheckConfig, text_prompts  # noqa: E402

STAGE_FILES = ["1-capture.json", "2-bnb.json", "3-memory.json", "4-speed.json", "5-v25.json"]
# What the lent GPU machines lack (and the check does not carry): importing any of them fails.
MISSING_THERE = ["av", "gradio", "gradio_client", "fastapi", "uvicorn", "starlette", "openai", "GPUtil"]
DEVICE_LIKE = f"""
import sys

MISSING = {MISSING_THERE!r}


class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the lent GPU machines)", name=name)
        return None


sys.meta_path.insert(0, Missing())
"""


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory, tiny_dir, loaded_tiny):
    """One run of the whole script, stages 1-5, into a temporary $OUT (the tiny model the
    suite built already is lent to it)."""
    out, site = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("device-like")
    work = tmp_path_factory.mktemp("work")
    (work / "tiny").symlink_to(tiny_dir)
    (site / "sitecustomize.py").write_text(DEVICE_LIKE)
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(site),
           "PYTHONPATH": str(site)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--reduced",
                           "--work-dir", str(work)],
                          env=env, capture_output=True, text=True, timeout=280)
    return out, done


def test_every_stage_writes_a_well_formed_file(reduced_run):
    out, done = reduced_run
    assert done.returncode in (0, 1) and "Traceback" not in done.stdout, "the machine lacks PyAV; the check runs"
    assert sorted(p.name for p in out.iterdir()) == sorted([*STAGE_FILES, "summary.json", "gpu_check.log"])
    for name in STAGE_FILES:
        data = json.loads((out / name).read_text())
        assert data["status"] in ("pass", "fail", "skipped"), (name, data.get("error"), done.stdout[-3000:])
        assert data["reduced"] is True and data["device"] == "cpu"
        assert data["versions"]["torch"] and data["versions"]["transformers"]
        assert time.strptime(data["started_at"], "%Y-%m-%dT%H:%M:%SZ")
        if data["status"] != "skipped":
            assert data["machine"]["python"] and data["machine"]["cpus"]
            assert data["checks"], name
        for check in data["checks"]:
            assert set(check) == {"name", "value", "bound", "ok"} and check["ok"] in (True, False, None)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["capture", "bnb", "memory", "speed", "v25"]
    assert "capture: pass" in (out / "gpu_check.log").read_text()


def test_stage_one_compares_a_join_a_moving_leave_and_the_first_length_bucket(reduced_run):
    out, _ = reduced_run
    data = json.loads((out / "1-capture.json").read_text())
    assert data["status"] == "pass" and all(check["ok"] for check in data["checks"])
    comparison = data["results"]["float32"]
    steps, summary = comparison["steps"], comparison["summary"]
    assert len(steps) == 32 and summary["rows"] == 5 and len(set(comparison["prompt_lengths"])) == 4
    assert [s["rows"] for s in steps][5:7] == [4, 5], "a row joins"
    assert steps[19]["requests"] == [0, 1, 2, 3, 4] and steps[20]["requests"] == [0, 4, 2, 3], \
        "a row leaves and the last row moves into its slot"
    assert steps[0]["width"] <= summary["first_width"] < steps[-1]["width"]
    assert all(s["graph"] and s["max_abs_diff"] is not None for s in steps)
    assert all(p["writes_output"] for p in comparison["probes"]) and comparison["probes"]


def test_the_other_stages_measured_what_they_say(reduced_run):
    out, _ = reduced_run
    bnb = json.loads((out / "2-bnb.json").read_text())
    assert {"int4 1 rows", "int4 8 rows", "int8_startup", "int8_answers"} <= set(bnb["results"])
    assert bnb["results"]["int4 8 rows"]["summary"]["rows"] == 8
    assert all(bnb["results"]["int8_answers"]["answers"])
    memory = json.loads((out / "3-memory.json").read_text())
    assert memory["results"]["engine"]["slot_mb"] > 0 and memory["results"]["burst"]["errors"] == 0
    speed = json.loads((out / "4-speed.json").read_text())["results"]
    assert set(speed["graphs"]) == set(speed["eager"]) == {"1", "4", "16"}
    assert speed["max_batch_1"]["tokens"] > 0 and speed["single_stream"]["generate_tokens_per_s"] > 0
    v25 = json.loads((out / "5-v25.json").read_text())
    if not (ROOT / "benchmarks" / "gpu_v25.py").exists():
        assert v25["status"] == "skipped" and "gpu_v25.py" in v25["notes"][0]


# -- the comparison catches what it must ------------------------------------------------------
def prompts(runner, count: int) -> list:
    return text_prompts(runner, [12, 30, 21][:count])


def compare_with(runner, record, steps: int = 4):
    """Eager slots against slots whose graphs are recorded with `record`."""
    eager = runner.new_slots(4, 128, capture=False)
    captured = runner.new_slots(4, 128, capture=False)
    captured.graphs = surface.build_graphs_with(runner, captured, record)
    records = capture_check.compare_decode(runner, eager, captured, prompts(runner, 3), None,
                                           capture_check.Plan(steps=steps))
    return capture_check.summarize(records, 256), capture_check.probe_graphs(captured.graphs)


def test_stand_in_graphs_equal_eager(loaded_tiny):
    summary, probes = compare_with(loaded_tiny.runner, surface.eager_recorder)
    assert summary["rows_equal_share"] == 1.0 and summary["graph_steps"] == 4 and summary["max_abs_diff"] < 1e-4
    assert not summary["empty_graph_steps"] and all(p["writes_output"] for p in probes)


def test_a_batch_that_computes_something_else_is_caught(loaded_tiny):
    def shifted(step):
        """Replays the step but hands each row the next row's logits (a graph over the wrong slots)."""
        replay, output = surface.eager_recorder(step)

        def wrong() -> None:
            replay()
            output.copy_(output.roll(1, dims=0))

        return wrong, output

    summary, _ = compare_with(loaded_tiny.runner, shifted)
    assert summary["rows_equal_share"] < AGREEMENT_FLOOR and summary["max_abs_diff"] > 1e-3


def test_an_empty_graph_is_caught(loaded_tiny):
    def empty(step):
        """A capture that recorded nothing: its replay writes nothing."""
        return (lambda: None), step()

    summary, probes = compare_with(loaded_tiny.runner, empty)
    assert summary["empty_graph_steps"] == [0, 1, 2, 3] and summary["non_finite_steps"] == [0, 1, 2, 3]
    assert probes and not any(p["writes_output"] for p in probes)


def test_a_graph_that_replays_stale_logits_is_caught(loaded_tiny):
    def stale(step):
        """Its output is right once, at capture, and never written again."""
        output = step().clone()
        return (lambda: None), output

    summary, _ = compare_with(loaded_tiny.runner, stale)
    assert summary["empty_graph_steps"], "poisoning shows the output was not written"


# -- the driver --------------------------------------------------------------------------------
def slow_stage(config, report: StageReport) -> None:
    """Measures one thing, then hangs (a stuck CUDA call, say)."""
    report.set("measured", 1.5)
    time.sleep(600)


def test_a_stage_past_its_limit_is_killed_and_keeps_what_it_measured(tmp_path):
    config = CheckConfig.make(tmp_path, tmp_path, reduced=True)
    stage = Stage(9, "slow", "a stage that hangs", 1, slow_stage)
    data = supervise(stage, config, 1.0, {"reduced": True})
    assert data["status"] == "timeout" and "killed" in data["notes"][-1]
    assert read_stage(tmp_path / "9-slow.json")["results"] == {"measured": 1.5}


def test_json_has_no_nan(tmp_path):
    report = StageReport(tmp_path / "x.json", 1, "x", "x", 1.0, {})
    report.set("numbers", {"nan": math.nan, "inf": torch.tensor(1.0).item() * math.inf, "one": 1.0})
    assert json.loads((tmp_path / "x.json").read_text())["results"]["numbers"] == {"nan": None, "inf": None,
                                                                                  "one": 1.0}


def quick_stage(config, report: StageReport) -> None:
    report.set("measured", 2.5)


def test_a_stage_runs_in_a_fresh_interpreter_when_forking_cannot_serve(tmp_path):
    """The driver's fallback where CUDA cannot start in a forked process: spawn."""
    config = CheckConfig.make(tmp_path, tmp_path, reduced=True)
    data = supervise(Stage(8, "quick", "a quick stage", 60, quick_stage), config, 60.0, {"reduced": True}, "spawn")
    assert data["status"] == "pass" and data["results"] == {"measured": 2.5}
