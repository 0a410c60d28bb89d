"""Captured decode steps against eager ones on the same batch: stages 1 and 2 of the GPU check.

Texts cannot tell a wrong capture from rounding: the random-weight model's logits are nearly
flat, so two batch layouts give different texts in bf16 without any bug. So both slot batches
get the same prefilled rows, and every step both are fed the same tokens (the eager batch's
argmax); each step is compared on its logits (largest difference, argmax per row, finiteness).

A capture that recorded nothing replays without writing its output, which then holds whatever
the last replay left: stale logits that look fine. Before every captured step each graph's
static output is poisoned with NaN, so such a replay shows up as NaN, and at the end every
graph is replayed once on its own to check it writes its output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import engine_surface as surface


@dataclass(frozen=True)
class Plan:
    """What happens to the batch: `steps` decode steps; before step `join_at` the joiner's row
    joins; before step `leave_at` the row at position `leaver` leaves and the last row moves into
    its slot (the engine's `fill_holes`)."""

    steps: int
    join_at: int | None = None
    leave_at: int | None = None
    leaver: int = 1


@dataclass
class StepRecord:
    """One decode step of both batches."""

    step: int
    rows: int
    width: int  # columns the step attends: the longest row + 1
    graph: bool  # the captured batch replayed a graph (else it stepped eager)
    requests: list[int]  # the request each row holds, in row order
    argmax_equal: list[bool]
    max_abs_diff: float | None  # largest |captured - eager| logit over the rows; None when not finite
    logit_scale: float | None  # largest |eager| logit, to read the difference against
    finite_eager: bool
    finite_captured: bool
    empty_graph: bool  # a replayed graph left its poisoned output unwritten
    disagreements: list[dict] = field(default_factory=list)


@torch.inference_mode()
def compare_decode(runner, eager, captured, prompts: Sequence[Any], joiner: Any | None, plan: Plan) -> list[StepRecord]:
    """Prefill `prompts` (and `joiner`) once, merge the same prefill into both slot batches, run
    `plan` on both; returns one record per step."""
    from minicpmv_demo.engine.slots import fill_holes

    prefilled, logits = runner.prefill(list(prompts), [[] for _ in prompts])
    joining = runner.prefill([joiner], [[]]) if joiner is not None else None
    for batch in (eager, captured):
        runner.merge(batch, prefilled)
    tokens = logits.argmax(dim=-1)
    requests = list(range(len(prompts)))
    records = []
    for step in range(plan.steps):
        if step == plan.join_at and joining is not None:
            for batch in (eager, captured):
                runner.merge(batch, joining[0])
            tokens = torch.cat([tokens, joining[1].argmax(dim=-1)])
            requests.append(len(prompts))
        if step == plan.leave_at and len(requests) > plan.leaver:
            keep = fill_holes([p for p in range(len(requests)) if p != plan.leaver])
            for batch in (eager, captured):
                runner.select(batch, keep)
            tokens, requests = tokens[keep], [requests[p] for p in keep]
        width = max(captured.lengths) + 1
        expected = runner.step(eager, tokens)
        got, replayed = captured_step(runner, captured, tokens)
        records.append(step_record(step, width, replayed, requests, expected, got))
        tokens = expected.argmax(dim=-1)
    return records


def captured_step(runner, batch, tokens: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """One step of the captured batch with every graph output poisoned first; returns the logits
    and whether a graph replayed (else the runner stepped eager)."""
    if batch.graphs is None:
        return runner.step(batch, tokens), False
    poison(batch.graphs)
    with surface.counting_replays(batch.graphs) as calls:
        logits = runner.step(batch, tokens)
    return logits, calls[0] > 0


def poison(graphs) -> None:
    """Fill every graph's static output with NaN: a replay that does not write it shows."""
    for _, output in surface.graph_outputs(graphs).values():
        if output.is_floating_point():
            output.fill_(math.nan)


def step_record(step: int, width: int, replayed: bool, requests: list[int], expected: torch.Tensor,
                got: torch.Tensor) -> StepRecord:
    """Compare one step's logits [rows, vocabulary]."""
    expected, got = expected.float().cpu(), got.float().cpu()
    finite_eager, finite_captured = bool(torch.isfinite(expected).all()), bool(torch.isfinite(got).all())
    equal = (expected.argmax(dim=-1) == got.argmax(dim=-1)).tolist()
    both = finite_eager and finite_captured
    record = StepRecord(
        step=step, rows=len(requests), width=width, graph=replayed, requests=list(requests), argmax_equal=equal,
        max_abs_diff=float((got - expected).abs().max()) if both else None,
        logit_scale=float(expected.abs().max()) if finite_eager else None,
        finite_eager=finite_eager, finite_captured=finite_captured,
        empty_graph=replayed and bool(torch.isnan(got).all()))
    for row in (r for r, same in enumerate(equal) if not same):
        top = expected[row].topk(2).values
        record.disagreements.append({"request": requests[row], "eager": int(expected[row].argmax()),
                                     "captured": int(got[row].argmax()),
                                     "eager_margin": float(top[0] - top[1]) if finite_eager else None})
    return record


@torch.inference_mode()
def probe_graphs(graphs) -> list[dict]:
    """Replay every graph once with its output poisoned: each must write all of its output."""
    results = []
    for key, (replay, output) in surface.graph_outputs(graphs).items():
        output.fill_(math.nan)
        replay()
        results.append({"graph": str(key), "writes_output": not bool(torch.isnan(output).any())})
    return results


def summarize(records: list[StepRecord], first_width: int) -> dict:
    """What the steps add up to; `first_width` is the first length bucket of the graphs."""
    requests = sorted({r for record in records for r in record.requests})
    agreed = {r: all(same for record in records for row, same in zip(record.requests, record.argmax_equal,
                                                                     strict=True) if row == r)
              for r in requests}
    pairs = [same for record in records for same in record.argmax_equal]
    diffs = [record.max_abs_diff for record in records if record.max_abs_diff is not None]
    crossed = next((record.step for record in records if record.width > first_width), None)
    return {
        "steps": len(records),
        "rows": len(requests),
        "rows_equal": sum(agreed.values()),
        "rows_equal_share": sum(agreed.values()) / len(requests) if requests else 0.0,
        "row_steps": len(pairs),
        "row_steps_equal_share": sum(pairs) / len(pairs) if pairs else 0.0,
        "max_abs_diff": max(diffs) if diffs else None,
        "largest_logit": max((r.logit_scale for r in records if r.logit_scale is not None), default=None),
        "non_finite_steps": [r.step for r in records if not (r.finite_eager and r.finite_captured)],
        "empty_graph_steps": [r.step for r in records if r.empty_graph],
        "graph_steps": sum(r.graph for r in records),
        "eager_steps_of_captured_batch": [r.step for r in records if not r.graph],
        "first_width": first_width,
        "crossed_first_width_at_step": crossed,
        "graph_after_crossing": crossed is not None and any(r.graph for r in records if r.step >= crossed),
        "most_rows": max((r.rows for r in records), default=0),
    }


def records_as_json(records: list[StepRecord]) -> list[dict]:
    return [asdict(record) for record in records]
