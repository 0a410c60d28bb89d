"""ZeroGPU wiring: a no-op without `spaces`; with a (fake) ZeroGPU `spaces`, batches run in GPU calls."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

from conftest import ask
from minicpmv_demo.engine import FinishReason, SamplingParams
from minicpmv_demo.engine.one_call import decode_batch
from minicpmv_demo.system.zerogpu import zerogpu_batch_call

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_new_tokens=20)


def fake_spaces(zero_gpu: bool, calls: list) -> types.ModuleType:
    """What the `spaces` package offers: Config.zero_gpu and the GPU(duration=...) decorator."""
    module = types.ModuleType("spaces")
    module.config = types.SimpleNamespace(Config=types.SimpleNamespace(zero_gpu=zero_gpu))

    def gpu(duration=None):
        def wrap(fn):
            def in_gpu_call(*args, **kwargs):
                calls.append(duration)
                yield from fn(*args, **kwargs)
            return in_gpu_call
        return wrap

    module.GPU = gpu
    return module


def test_without_spaces_or_zerogpu_nothing_changes(monkeypatch):
    monkeypatch.delitem(sys.modules, "spaces", raising=False)
    assert zerogpu_batch_call() is None
    monkeypatch.setitem(sys.modules, "spaces", fake_spaces(zero_gpu=False, calls=[]))
    assert zerogpu_batch_call() is None


def test_batches_run_inside_gpu_calls_with_the_same_replies(monkeypatch, make_engine):
    questions = [ask("What is it?", "chart.png"), ask("Read it.", "receipt.png"), ask("Hello there.")]
    solo = make_engine(max_batch=1)
    expected = [solo.submit(q, GREEDY).result(timeout=60) for q in questions]
    solo.shutdown()
    calls: list = []
    monkeypatch.setitem(sys.modules, "spaces", fake_spaces(zero_gpu=True, calls=calls))
    batch_call = zerogpu_batch_call(seconds=60)
    assert batch_call is not None
    engine = make_engine(max_batch=8, started=False, batch_call=batch_call)
    streams = [engine.submit(q, GREEDY) for q in questions]
    short = engine.submit(questions[0], SamplingParams(max_new_tokens=3))
    engine.start()
    assert [s.result(timeout=60) for s in streams] == expected
    assert short.result(timeout=60) and short.stats.tokens == 3 and short.stats.finish_reason == FinishReason.LENGTH
    assert calls == [60], "one GPU call for the four requests that waited together"
    assert streams[0].stats.batch_size == 4


def test_decode_batch_stops_each_row_on_its_own(loaded_tiny):
    runner = loaded_tiny.runner
    prompts = [runner.encode(ask("a", "scene.png")), runner.encode(ask("b"))]
    events = list(decode_batch(runner, prompts, [SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=5)],
                               seed=0, stop_token_ids=frozenset()))
    steps, stats = events[:-1], events[-1]
    assert [len(step) for step in steps] == [2, 2, 1, 1, 1]
    assert stats == {"peak_memory_mb": None}


def test_app_imports_spaces_before_torch(tmp_path):
    (tmp_path / "spaces.py").write_text(textwrap.dedent('''
        import sys
        assert "torch" not in sys.modules, "spaces must be imported before torch"
        print("spaces imported first")
    '''))
    result = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.argv = ['app.py', '--help']; "
                             "runpy.run_path('app.py', run_name='__main__')"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert "spaces imported first" in result.stdout and result.returncode == 0
