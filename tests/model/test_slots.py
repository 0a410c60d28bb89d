"""Preallocated slots and captured decode steps, on the tiny model (CPU).

The slot path must give, token for token, what the dynamic path (concatenate on join,
`index_select` on leave) gives, with rows joining and leaving at different steps and a long
prompt prefilled in pieces. Graph wiring is tested with a recorder that replays eagerly: the
bucket choice and padding are real; CUDA itself is not pretended.
"""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import ask
from minicpmv_demo.engine import ReplyError, SamplingParams
from minicpmv_demo.engine.slots import fill_holes
from minicpmv_demo.model.graphs import (DecodeGraphs, batch_buckets, bucket_for, build_graphs, capture_decode_graphs,
                                        graph_widths)
from minicpmv_demo.model.batched_runner import SlotBatch
from minicpmv_demo.model.slot_cache import SlotCache
from minicpmv_demo.config.settings import parse_settings

CONVERSATIONS = [
    ask("What is in the image?", "scene.png"),
    ask("Read the total.", "receipt.png"),
    ask("Say hello without any image."),
    ask("Which month is highest?", "chart.png"),
    ask("Compare the two pictures.", "chart.png", "scene.png"),
    ask("Explain the arrows.", "diagram.png"),
    ask("Count to ten."),
    ask("Describe the colours.", "scene.png"),
]
# (joining step, new tokens, prefilled in pieces of this many tokens or 0 = at once)
SCHEDULE = [(0, 12, 0), (0, 5, 0), (0, 20, 0), (2, 9, 0), (3, 15, 7), (3, 4, 0), (6, 18, 0), (9, 6, 11)]


def drive(runner, batch, order) -> list[list[int]]:
    """Greedy replies for SCHEDULE, rows joining, prefilling in pieces and leaving as scheduled.

    `order(alive)` is the row order after a leave (the dynamic path keeps order; slots fill holes).
    """
    prompts = [runner.encode(c) for c in CONVERSATIONS]
    replies: list[list[int]] = [[] for _ in SCHEDULE]
    rows: list[int] = []  # request index of each batch row
    pieces: list[tuple[int, object]] = []
    step = 0
    while step < 200 and (rows or pieces or any(s[0] >= step for s in SCHEDULE)):
        joining = [i for i, (at, _, piece) in enumerate(SCHEDULE) if at == step and not piece]
        if joining:
            newcomer, logits = runner.prefill([prompts[i] for i in joining], [[] for _ in joining])
            batch = runner.merge(batch, newcomer)
            rows += joining
            for i, token in zip(joining, logits.argmax(dim=-1).tolist(), strict=True):
                replies[i].append(token)
        pieces += [(i, runner.begin_prefill(prompts[i], [])) for i, (at, _, piece) in enumerate(SCHEDULE)
                   if at == step and piece]
        for i, partial in list(pieces):
            done = runner.prefill_some(partial, SCHEDULE[i][2])
            if done is not None:
                pieces.remove((i, partial))
                batch = runner.merge(batch, done[0])
                rows.append(i)
                replies[i].append(int(done[1].argmax()))
        alive = [p for p, i in enumerate(rows) if len(replies[i]) < SCHEDULE[i][1]]
        if len(alive) < len(rows):
            keep = order(alive)
            batch = runner.select(batch, keep)
            rows = [rows[p] for p in keep]
        if rows:
            logits = runner.step(batch, torch.tensor([replies[i][-1] for i in rows]))
            for i, token in zip(rows, logits.argmax(dim=-1).tolist(), strict=True):
                replies[i].append(token)
        step += 1
    return replies


def test_slot_path_matches_the_dynamic_path_token_for_token(loaded_tiny):
    runner = loaded_tiny.runner
    dynamic = drive(runner, None, order=lambda alive: alive)
    slots = runner.new_slots(8, 512, capture=False)
    assert drive(runner, slots, order=fill_holes) == dynamic
    assert [len(reply) for reply in dynamic] == [n for _, n, _ in SCHEDULE]
    assert slots.size == 0 and int(slots.cache.lengths.sum()) == 0, "every slot is free again"


def test_fill_holes_moves_only_the_last_rows_down():
    assert fill_holes([0, 1, 2, 3]) == [0, 1, 2, 3]
    assert fill_holes([1, 2, 3]) == [3, 1, 2]
    assert fill_holes([0, 2, 5, 6]) == [0, 6, 2, 5]
    assert fill_holes([4]) == [4]
    assert fill_holes([]) == []
    for alive in ([0, 3, 4, 7], [2, 3], [1, 5, 6, 7, 9]):
        keep = fill_holes(alive)
        assert sorted(keep) == alive and all(source >= target for target, source in enumerate(keep))
        assert sum(source != target for target, source in enumerate(keep)) <= len(alive) - len(
            [i for i in alive if i < len(alive)])


def test_a_freed_slot_is_cleared_so_a_failed_row_cannot_poison_the_next(loaded_tiny):
    runner = loaded_tiny.runner
    batch = runner.new_slots(2, 256, capture=False)
    prompt = runner.encode(CONVERSATIONS[2])
    newcomer, first = runner.prefill([prompt], [[]])
    runner.merge(batch, newcomer)
    expected = runner.step(batch, first.argmax(dim=-1))
    for layer in batch.cache.layers:
        if hasattr(layer, "keys_buffer"):
            layer.keys_buffer[0].fill_(float("nan"))  # what a row whose numbers blew up leaves behind
    runner.select(batch, [])
    newcomer, first = runner.prefill([prompt], [[]])
    runner.merge(batch, newcomer)
    assert torch.equal(runner.step(batch, first.argmax(dim=-1)), expected)


def test_slot_length_follows_the_setting_the_budget_and_the_context(loaded_tiny):
    runner = loaded_tiny.runner
    config, dtype = runner.model.config.text_config, runner.model.dtype
    assert runner.slot_length(8, 1000, None) == 1000
    assert runner.slot_length(8, 10**9, None) == runner.context_length
    assert runner.slot_length(8, 0, None) == min(runner.context_length, 8192)
    per_slot_2k = SlotCache.bytes_needed(config, 1, 2048, dtype)
    assert runner.slot_length(8, 0, 2 * 8 * per_slot_2k) == 2048, "half the budget, shared by 8 slots"
    assert runner.slot_length(8, 0, 1) == 1024, "never shorter than an image chat needs"
    cache = SlotCache(config, 3, 100, dtype, "cpu")
    buffers = [t for layer in cache.layers for t in (getattr(layer, "keys_buffer", None),
                                                     getattr(layer, "values_buffer", None)) if t is not None]
    buffers += [*cache.conv_buffers.values(), *cache.recurrent_buffers.values()]
    allocated = sum(t.numel() * t.element_size() for t in buffers)
    assert SlotCache.bytes_needed(config, 3, 100, dtype) == allocated


def test_max_model_len_bounds_what_a_request_may_hold(make_engine, loaded_tiny):
    runner = loaded_tiny.runner
    limit = runner.encode(CONVERSATIONS[4]).length  # two pictures: exactly too long
    engine = make_engine(max_batch=2, max_model_len=limit)
    with pytest.raises(ReplyError, match=f"at most {limit}"):
        engine.submit(CONVERSATIONS[4], SamplingParams(max_new_tokens=8)).result(timeout=60)
    short = engine.submit(CONVERSATIONS[2], SamplingParams(max_new_tokens=10_000, temperature=0.0))
    short.result(timeout=60)
    assert short.stats.tokens <= limit - runner.encode(CONVERSATIONS[2]).length


def test_a_column_written_by_a_step_that_failed_half_way_is_cleared_on_free(loaded_tiny):
    """A step that runs out of memory mid-forward may have written each row's next column in some
    layers: the slot's length never grew, so freeing must clear that column too."""
    runner = loaded_tiny.runner
    batch = runner.new_slots(1, 64, capture=False)
    newcomer, _ = runner.prefill([runner.encode(CONVERSATIONS[2])], [[]])
    runner.merge(batch, newcomer)
    length = batch.lengths[0]
    kv_layers = [layer for layer in batch.cache.layers if hasattr(layer, "keys_buffer")]
    for layer in kv_layers:
        layer.keys_buffer[0, :, length].fill_(float("nan"))  # the failed step's column
    runner.empty(batch)
    assert all(torch.count_nonzero(layer.keys_buffer).item() == 0 for layer in kv_layers)


def test_graph_widths_reach_the_slot_length():
    assert graph_widths(256) == [256]
    assert graph_widths(1000) == [256, 1000]
    assert graph_widths(8192) == [256, 1024, 4096, 8192]
    widths = graph_widths(40_000)
    assert widths[-1] == 40_000 and all(b == 4 * a for a, b in zip(widths[:-2], widths[1:-1], strict=True))


def test_buckets_cover_every_batch_size():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    buckets = batch_buckets(64)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert bucket_for(65, buckets) is None


def eager_record(step):
    """A recorder that 'replays' by running the step again: the graph wiring without CUDA."""
    output = step()

    def replay():
        output.copy_(step())

    return replay, output


def test_a_captured_step_pads_the_batch_to_its_bucket_and_matches_eager(loaded_tiny):
    runner = loaded_tiny.runner
    eager = runner.new_slots(4, 300, capture=False)
    graphed = runner.new_slots(4, 300, capture=False)
    graphed.graphs = build_graphs(runner, graphed.cache, eager_record)
    assert isinstance(graphed.graphs, DecodeGraphs) and graphed.graphs.buckets == [1, 2, 4]
    assert graphed.graphs.widths == [256, 300] and len(graphed.graphs.replays) == 6
    prompts = [runner.encode(c) for c in CONVERSATIONS[:3]]
    results = []
    for batch in (eager, graphed):
        newcomer, logits = runner.prefill(prompts, [[], [], []])
        runner.merge(batch, newcomer)
        tokens, steps = logits.argmax(dim=-1), []
        for _ in range(6):  # 3 rows run in the bucket of 4; the spare row feeds a free slot
            logits = runner.step(batch, tokens)
            tokens = logits.argmax(dim=-1)
            steps.append(logits)
        results.append(torch.stack(steps))
    assert graphed.graphs.fits(3, 10) and graphed.graphs.fits(3, 257), "a long row takes the wider graph"
    assert not graphed.graphs.fits(3, 301) and not graphed.graphs.fits(5, 10)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    assert int(graphed.cache.lengths[3]) == 0, "the padding row never takes a slot"


def test_capture_failure_logs_one_line_and_runs_eager(loaded_tiny, caplog):
    runner = loaded_tiny.runner
    batch = runner.new_slots(2, 128, capture=False)

    def broken(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.WARNING, logger="minicpmv_demo.model.graphs"):
        assert build_graphs(runner, batch.cache, broken) is None
    assert len(caplog.records) == 1 and "running eager" in caplog.text
    newcomer, logits = runner.prefill([runner.encode(CONVERSATIONS[2])], [[]])
    runner.merge(batch, newcomer)
    assert torch.isfinite(runner.step(batch, logits.argmax(dim=-1))).all()


def test_cpu_and_enforce_eager_run_eager(make_engine, caplog):
    with caplog.at_level(logging.INFO, logger="minicpmv_demo.model.graphs"):
        engine = make_engine(max_batch=2)
    assert isinstance(engine._batch, SlotBatch) and engine._batch.graphs is None
    assert "run eager on cpu" in caplog.text
    assert capture_decode_graphs(engine.runner, engine._batch.cache) is None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minicpmv_demo.model.graphs"):
        eager = make_engine(max_batch=2, enforce_eager=True)
    assert eager._batch.graphs is None and caplog.text == "", "--enforce-eager does not even try"


def test_max_model_len_and_enforce_eager_settings():
    settings = parse_settings(["--max-model-len", "4096", "--enforce-eager"], environ={})
    assert (settings.max_model_len, settings.enforce_eager) == (4096, True)
    settings = parse_settings([], environ={"MINICPMV_MAX_MODEL_LEN": "2048", "MINICPMV_ENFORCE_EAGER": "1"})
    assert (settings.max_model_len, settings.enforce_eager) == (2048, True)
    assert (parse_settings([], environ={}).max_model_len, parse_settings([], environ={}).enforce_eager) == (0, False)
    with pytest.raises(SystemExit):
        parse_settings(["--max-model-len", "-1"], environ={})


def test_zerogpu_keeps_no_slots_between_calls(make_engine):
    """On ZeroGPU each batch runs inside one lent GPU call: nothing may be preallocated outside it."""
    from minicpmv_demo.engine.one_call import decode_batch

    engine = make_engine(max_batch=4, batch_call=decode_batch)
    assert engine._batch is None
    assert engine.submit(CONVERSATIONS[2], SamplingParams(max_new_tokens=5, temperature=0.0)).result(timeout=60)


def test_each_layers_slots_live_on_that_layers_device(loaded_tiny):
    """With --device-map auto over several GPUs, layer i's keys and states sit on layer i's GPU and
    the columns each row writes at are mirrored there; such a spread model is never captured.
    (The CPU has one device: the second here is `meta`, which allocates nothing.)"""
    runner = loaded_tiny.runner
    config = runner.model.config.text_config
    devices = [torch.device("cpu"), torch.device("meta")]
    cache = SlotCache(config, 2, 16, torch.float32, "cpu", layer_devices=devices)
    for index, layer in enumerate(cache.layers):
        buffer = cache.conv_buffers[index] if index in cache.conv_buffers else layer.keys_buffer
        assert buffer.device == devices[index]
    assert cache.spread and set(cache.step_index) == set(devices)
    cache.set_length(1, 5)
    cache.advance(2)
    assert cache.lengths.tolist() == [1, 6] and cache.step_index[torch.device("meta")][1].device.type == "meta"
    cache.activate(1, 8)
    rows, columns = cache.step_index[torch.device("cpu")]
    assert rows.tolist() == [0] and columns.tolist() == [1], "a step's view of the first rows, per device"
    assert capture_decode_graphs(runner, cache) is None
    assert [d.type for d in runner.devices] == ["cpu"], "the tiny model lives on one device"


def test_a_row_growing_past_a_width_moves_the_batch_to_the_wider_graph(loaded_tiny):
    """Rows stay on the captured path whatever their length: past the first width (256 columns)
    the step replays the graph of the next width, and the logits still equal eager's."""
    runner = loaded_tiny.runner
    used = []

    def counting_record(step):
        replay, output = eager_record(step)
        width = len(used)  # recorded widest first: index the replays by order of recording
        used.append(0)
        return (lambda index=width: (used.__setitem__(index, used[index] + 1), replay())[1]), output

    eager = runner.new_slots(2, 300, capture=False)
    graphed = runner.new_slots(2, 300, capture=False)
    graphed.graphs = build_graphs(runner, graphed.cache, counting_record)
    order = list(graphed.graphs.replays)  # (bucket, width) in the order recorded
    long_prompt = runner.encode(ask(" ".join(["house"] * 243)))
    assert 240 < long_prompt.length < 256
    results = []
    for batch in (eager, graphed):
        newcomer, logits = runner.prefill([long_prompt, runner.encode(CONVERSATIONS[2])], [[], []])
        runner.merge(batch, newcomer)
        tokens, steps = logits.argmax(dim=-1), []
        for _ in range(256 - long_prompt.length + 4):
            logits = runner.step(batch, tokens)
            tokens = logits.argmax(dim=-1)
            steps.append(logits)
        results.append(torch.stack(steps))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    replayed = {key for key, count in zip(order, used, strict=True) if count}
    assert replayed == {(2, 256), (2, 300)}, "the narrow graph first, then the wider one; never eager"
