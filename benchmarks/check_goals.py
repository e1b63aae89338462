"""benchmarks/check_goals.py RESULTS_JSON... [--goals gpu|cpu] [--strict]: the goals (issues 2, 8 and 30), checked.

Reads the results.json that `python -m fused_resnet.bench --output DIR` writes (several files are
merged, e.g. a GPU run split by --dtype across device calls; they must name the same device) and
prints, for each goal and each case it covers, the measured value, the threshold, PASS / MISS /
MISSING and the margin, then a summary. A case the goal needs that the results lack, or whose
value is not a number (e.g. speed-up over torch.compile without a compile row), is MISSING: never
a pass. So is a case whose row failed (fused_resnet.bench records the exception in the row's "error"): the
reason is printed with it. A results.json whose run was cut off ("complete": false) is named.

Op-level cases are judged on the best fused provider of the case (the highest value among the
fused backends: cuda, triton, cpu), and every fused provider's own verdict follows in brackets.
Model-level goals name the provider they judge ("fused", "fused+compile").

The margin is value / threshold - 1. Every value checked is inversely proportional to the row's
time, so for a MISS it is also the fraction by which that time must fall to pass.

--goals defaults to gpu unless the device string starts with "CPU". The exit status is 0 (this is
a report); with --strict it is 1 when any case is MISS or MISSING.
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Optional

# ---------------------------------------------------------------------------------------------
# The goals: the one place they are written down.
#
# Op-level cells are (op, shape, dtype, layout, mode), matched exactly against fused_resnet.bench's rows.
# Model-level cells are (model, batch, dtype, layout, mode); None matches anything (the goal does
# not fix it). A goal passes in a cell when the row's `metric` is >= `threshold`.

OPS = ("bn_relu", "bn_add_relu")
ACT_OPS = tuple(f"bn_{add}{act}" for act in ("silu", "hardswish", "relu6") for add in ("", "add_"))
GPU_OP_SHAPES = ((64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7), (16, 64, 8, 56, 56))
GPU_OP_GRID = tuple((shape, layout) for shape in GPU_OP_SHAPES for layout in ("contiguous", "channels_last"))
GPU_DTYPES = ("bf16", "fp16", "fp32")
# Issue 2: the CPU cells, fp32.
CPU_OP_GRID = (((8, 256, 56, 56), "contiguous"), ((8, 64, 56, 56), "channels_last"), ((2, 64, 8, 56, 56), "contiguous"))
GPU_MODELS = (("resnet50", 128), ("resnet3d_50", None))


def op_cells(ops, modes, grid, dtypes):
    return tuple((op, shape, dtype, layout, mode) for op in ops for mode in modes for dtype in dtypes for shape, layout in grid)


@dataclass(frozen=True)
class Goal:
    name: str
    level: str  # "op": results.json "results"; "model": "model_results"
    metric: str  # speedup_vs_eager, speedup_vs_compile or bandwidth_fraction
    threshold: float
    cells: tuple
    provider: Optional[str] = None  # None: every fused provider, the best one judged


GOALS = {
    # Issue 8.
    "gpu": (
        Goal("op eval: % of copy bandwidth, bn_add_relu (3 passes)", "op", "bandwidth_fraction", 0.90,
             op_cells(("bn_add_relu",), ("eval",), GPU_OP_GRID, GPU_DTYPES)),
        Goal("op eval: fused vs torch.compile", "op", "speedup_vs_compile", 1.15, op_cells(OPS, ("eval",), GPU_OP_GRID, GPU_DTYPES)),
        Goal("op eval: fused vs eager", "op", "speedup_vs_eager", 2.5, op_cells(OPS, ("eval",), GPU_OP_GRID, GPU_DTYPES)),
        Goal("op train fwd+bwd: fused vs torch.compile", "op", "speedup_vs_compile", 1.3,
             op_cells(OPS, ("train-fwd+bwd",), GPU_OP_GRID, GPU_DTYPES)),
        Goal("op train fwd+bwd: fused vs eager", "op", "speedup_vs_eager", 2.0, op_cells(OPS, ("train-fwd+bwd",), GPU_OP_GRID, GPU_DTYPES)),
        Goal("model resnet50 training step, bf16 autocast, channels_last, batch 128: fused vs eager images/s", "model",
             "speedup_vs_eager", 1.10, (("resnet50", 128, "bf16", "channels_last", "train"),), provider="fused"),
        Goal("model resnet3d_50 training step: fused vs eager clips/s", "model", "speedup_vs_eager", 1.2,
             (("resnet3d_50", None, None, None, "train"),), provider="fused"),
        Goal("model: fused under torch.compile vs eager under torch.compile", "model", "speedup_vs_compile", 1.0,
             tuple((model, batch, None, None, mode) for model, batch in GPU_MODELS for mode in ("train", "eval")),
             provider="fused+compile"),
    ),
    # Issue 2; issue 30 (the other activations).
    "cpu": (
        Goal("op (CPU, fp32): fused vs eager", "op", "speedup_vs_eager", 1.5, op_cells(OPS, ("eval", "train-fwd+bwd"), CPU_OP_GRID, ("fp32",))),
        Goal("op (CPU, fp32): fused vs torch.compile", "op", "speedup_vs_compile", 1.0,
             op_cells(OPS, ("eval", "train-fwd+bwd"), CPU_OP_GRID, ("fp32",))),
        Goal("op (CPU, fp32) silu, hardswish, relu6: train fwd+bwd fused vs eager", "op", "speedup_vs_eager", 1.5,
             op_cells(ACT_OPS, ("train-fwd+bwd",), CPU_OP_GRID, ("fp32",))),
        Goal("op (CPU, fp32) silu, hardswish, relu6: eval fused vs torch.compile", "op", "speedup_vs_compile", 1.0,
             op_cells(ACT_OPS, ("eval",), CPU_OP_GRID, ("fp32",))),
    ),
}

UNFUSED = ("eager", "compile")
PASS, MISS, MISSING = "PASS", "MISS", "MISSING"

# ---------------------------------------------------------------------------------------------
# Reading and judging.


@dataclass
class Verdict:
    goal: Goal
    case: str  # the case, as a label
    status: str  # PASS, MISS or MISSING
    value: float = float("nan")
    provider: Optional[str] = None  # the provider judged (the best fused one at op level)
    per_provider: dict = field(default_factory=dict)  # provider: (value, status)
    note: str = ""

    @property
    def margin(self):
        return margin(self.value, self.goal.threshold)


def margin(value, threshold):
    return value / threshold - 1.0


def judge(value, threshold):
    if value is None or not math.isfinite(value):
        return MISSING
    return PASS if value >= threshold else MISS


def load_results(paths):
    """One payload from one or more results.json files: their rows concatenated (a later file's
    row replaces an earlier one of the same case and provider), versions and commands listed."""
    merged = None
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        if merged is None:
            merged = dict(payload, commands=[payload.get("command", "")], copy_bandwidths=[payload.get("copy_bandwidth_gbps")])
            merged["incomplete"] = [path] if payload.get("complete") is False else []
            merged["results"] = list(payload.get("results", []))
            merged["model_results"] = list(payload.get("model_results", []))
            continue
        if payload.get("device") != merged.get("device"):
            raise ValueError(f"{path}: device {payload.get('device')!r}, not {merged.get('device')!r}")
        merged["commands"].append(payload.get("command", ""))
        if payload.get("complete") is False:
            merged["incomplete"].append(path)
        merged["copy_bandwidths"].append(payload.get("copy_bandwidth_gbps"))
        merged["results"] += payload.get("results", [])
        merged["model_results"] += payload.get("model_results", [])
    return merged


def default_goal_set(payload):
    return "cpu" if str(payload.get("device", "")).startswith("CPU") else "gpu"


def _case_key(level, row):
    if level == "op":
        return (row["op"], tuple(row["shape"]), row["dtype"], row["layout"], row["mode"])
    return (row["model"], tuple(row["input_shape"]), row["dtype"], row["layout"], row["mode"])


def _matches(level, cell, row):
    if level == "op":
        return _case_key(level, row) == cell
    model, batch, dtype, layout, mode = cell
    return (
        row["model"] == model
        and row["mode"] == mode
        and (batch is None or row["input_shape"][0] == batch)
        and (dtype is None or row["dtype"] == dtype)
        and (layout is None or row["layout"] == layout)
    )


def _label(key):
    name, shape, dtype, layout, mode = key
    return " ".join((name, "x".join(map(str, shape)), dtype, layout, mode))


def _cell_label(level, cell):
    if level == "op":
        return _label(cell)
    model, batch, dtype, layout, mode = cell
    shape = f"batch {batch}" if batch is not None else "any input"
    return " ".join(part if part is not None else "any" for part in (model, shape, dtype, layout, mode))


# The provider a metric divides by: its failure leaves the metric unmeasured in every row of the case.
BASELINE = {"speedup_vs_eager": "eager", "speedup_vs_compile": "compile"}


def _failures(by_provider, providers):
    """"P failed: reason" for each of `providers` whose row records an error, in order."""
    return [f"{p} failed: {by_provider[p]['error']}" for p in providers if p in by_provider and by_provider[p].get("error")]


def evaluate_goal(goal, payload):
    """The verdicts of one goal: one per matching case in the results, or a MISSING one per cell
    that no row matches."""
    rows = payload.get("results" if goal.level == "op" else "model_results", [])
    verdicts = []
    for cell in goal.cells:
        cases = {}
        for row in rows:
            if _matches(goal.level, cell, row):
                cases.setdefault(_case_key(goal.level, row), {})[row["provider"]] = row
        if not cases:
            verdicts.append(Verdict(goal, _cell_label(goal.level, cell), MISSING, note="no such case in the results"))
            continue
        for key, by_provider in cases.items():
            judged = [goal.provider] if goal.provider else [p for p in by_provider if p not in UNFUSED]
            baseline = by_provider.get(BASELINE.get(goal.metric), {})
            per_provider = {}
            for p in judged:
                row = by_provider.get(p)
                measured = row is not None and not row.get("error") and not baseline.get("error")
                value = row.get(goal.metric) if measured else None
                value = float("nan") if value is None else float(value)
                per_provider[p] = (value, judge(value, goal.threshold))
            finite = {p: v for p, (v, _) in per_provider.items() if math.isfinite(v)}
            failures = _failures(by_provider, judged)
            if not finite:
                failures += _failures(by_provider, [BASELINE[goal.metric]] if goal.metric in BASELINE else [])
                if failures:
                    why = "; ".join(failures)
                elif not by_provider.keys() & set(judged):
                    why = f"no {goal.provider or 'fused'} row"
                else:
                    why = f"{goal.metric} is not a number"
                verdicts.append(Verdict(goal, _label(key), MISSING, per_provider=per_provider, note=why))
                continue
            best = max(finite, key=finite.get)
            verdicts.append(
                Verdict(goal, _label(key), judge(finite[best], goal.threshold), finite[best], best, per_provider, "; ".join(failures))
            )
    return verdicts


def evaluate(payload, goal_set):
    return [v for goal in GOALS[goal_set] for v in evaluate_goal(goal, payload)]


def summarize(verdicts):
    """{goal name: {"PASS": n, "MISS": n, "MISSING": n}} plus a "total" entry."""
    counts = {}
    for v in verdicts:
        for name in (v.goal.name, "total"):
            counts.setdefault(name, {PASS: 0, MISS: 0, MISSING: 0})[v.status] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# The report.


def format_value(metric, value):
    if not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.1f}%" if metric == "bandwidth_fraction" else f"{value:.2f}x"


def format_margin(status, m):
    if status == MISSING:
        return ""
    pct = 100 * abs(m)
    return f"{status} by {pct:.1f}%" if pct < 10 else f"{status} by {pct:.0f}%"


def format_verdict(v):
    metric, threshold = v.goal.metric, v.goal.threshold
    text = f"  {v.status:<7} {v.case:<58} {format_value(metric, v.value):>7} >= {format_value(metric, threshold):<6}"
    if v.status != MISSING:
        text += f" {format_margin(v.status, v.margin)}"
    if v.note:
        text += f" ({v.note})"
    if v.per_provider and (v.goal.provider is None or v.status == MISSING):
        parts = []
        for p, (value, status) in sorted(v.per_provider.items()):
            detail = format_margin(status, margin(value, threshold)) if status != MISSING else MISSING
            parts.append(f"{p} {format_value(metric, value)} {detail}")
        text += f"  [{'best ' + v.provider + '; ' if v.provider and v.goal.provider is None else ''}{', '.join(parts)}]"
    return text.rstrip()


def format_summary(verdicts, goal_set):
    counts = summarize(verdicts)
    lines = [f"== summary ({goal_set} goals; op level: best fused provider per case)"]
    for goal in GOALS[goal_set]:
        c = counts.get(goal.name, {PASS: 0, MISS: 0, MISSING: 0})
        line = f"{goal.name}: PASS {c[PASS]}, MISS {c[MISS]}, MISSING {c[MISSING]}"
        misses = [v for v in verdicts if v.goal is goal and v.status == MISS]
        if misses:
            worst = min(misses, key=lambda v: v.margin)
            line += f"; worst {format_margin(MISS, worst.margin)} ({worst.case}: {worst.provider} {format_value(goal.metric, worst.value)})"
        providers = sorted({p for v in verdicts if v.goal is goal for p in v.per_provider})
        if goal.provider is None and providers:
            per = []
            for p in providers:
                statuses = [v.per_provider.get(p, (None, MISSING))[1] for v in verdicts if v.goal is goal]
                per.append(f"{p} {statuses.count(PASS)}/{len(statuses)}")
            line += f"; PASS per provider: {', '.join(per)}"
        lines.append(line)
    t = counts.get("total", {PASS: 0, MISS: 0, MISSING: 0})
    lines.append(f"total: {sum(t.values())} cases: {t[PASS]} PASS, {t[MISS]} MISS, {t[MISSING]} MISSING")
    return "\n".join(lines)


def format_report(payload, verdicts, goal_set, paths=()):
    versions = payload.get("versions", {})
    bandwidths = ", ".join(f"{b:.1f}" for b in payload.get("copy_bandwidths", []) if isinstance(b, (int, float)))
    lines = [
        f"goals: {goal_set}; results: {', '.join(map(str, paths))}",
        f"device: {payload.get('device')}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"copy bandwidth: {bandwidths} GB/s",
    ]
    lines += [f"command: {c}" for c in payload.get("commands", [payload.get("command", "")])]
    lines += [f"cut off before its end (complete: false): {path}" for path in payload.get("incomplete", [])]
    lines.append("margin = value / threshold - 1: for a MISS, the fraction by which the time must fall to pass")
    for goal in GOALS[goal_set]:
        threshold = format_value(goal.metric, goal.threshold)
        lines.append("")
        lines.append(f"== {goal.name} (>= {threshold})")
        lines += [format_verdict(v) for v in verdicts if v.goal is goal]
    lines.append("")
    lines.append(format_summary(verdicts, goal_set))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="benchmarks/check_goals.py", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", metavar="RESULTS_JSON", help="results.json of python -m fused_resnet.bench")
    parser.add_argument("--goals", choices=sorted(GOALS), default=None, help="default: gpu unless the device starts with CPU")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any case is MISS or MISSING")
    args = parser.parse_args(argv)
    try:
        payload = load_results(args.results)
    except (OSError, ValueError, KeyError) as e:
        parser.error(str(e))
    goal_set = args.goals or default_goal_set(payload)
    verdicts = evaluate(payload, goal_set)
    print(format_report(payload, verdicts, goal_set, args.results))
    if args.strict and any(v.status != PASS for v in verdicts):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
