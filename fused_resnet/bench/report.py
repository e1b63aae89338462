"""What python -m fused_resnet.bench leaves behind: the table it prints, results.json, speedup.png.

results.json is rewritten after every case, so a run cut off (timeout, crash, Ctrl-C) leaves every
finished row on disk; its "complete" field turns true only when the run reached its end.
"""

import json
import math
import os
from dataclasses import asdict

OP_COLUMNS = ("op", "shape", "dtype", "layout", "mode", "provider", "ms", "GB/s", "%bw", "peak MiB", "vs eager", "vs comp")
OP_FORMAT = "{:<9} {:<16} {:<18} {:<5} {:<14} {:<14} {:<8} {:>9} {:>8} {:>5} {:>9} {:>8} {:>8}"
MODEL_COLUMNS = (
    "model", "input", "dtype", "layout", "mode", "provider", "ms", "items/s", "peak MiB", "kept MiB", "vs eager", "vs comp"
)
MODEL_FORMAT = "{:<9} {:<15} {:<18} {:<5} {:<14} {:<6} {:<14} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8}"


def _speedup(value):
    return f"{value:.2f}x" if math.isfinite(value) else "-"  # "-": no measured row to compare with


def _op_cells(r):
    key = (r.op, "x".join(map(str, r.shape)), r.dtype, r.layout, r.mode, r.provider)
    if r.error:
        return key, None
    return key, (
        f"{r.ms:.3f}", f"{r.gbps:.1f}", f"{100 * r.bandwidth_fraction:.0f}", f"{r.peak_memory_bytes / 2**20:.1f}",
        _speedup(r.speedup_vs_eager), _speedup(r.speedup_vs_compile),
    )


def _model_cells(r):
    key = (r.model, "x".join(map(str, r.input_shape)), r.dtype, r.layout, r.mode, r.provider)
    if r.error:
        return key, None
    # "-" for kept memory: an eval row has no backward to keep anything for
    kept = "-" if r.backward_kept_bytes is None else f"{r.backward_kept_bytes / 2**20:.1f}"
    return key, (
        f"{r.ms:.2f}", f"{r.items_per_s:.1f}", f"{r.peak_memory_bytes / 2**20:.1f}", kept,
        _speedup(r.speedup_vs_eager), _speedup(r.speedup_vs_compile),
    )


def _table(rows, cells, fmt, columns, header, progress):
    """Lines of a table; `progress` (e.g. "[3/28]") fills the first column of the case's first
    row. A failed row keeps its key columns and gives its reason in place of the numbers."""
    lines = [fmt.format("case", *columns)] if header else []
    for i, r in enumerate(rows):
        key, numbers = cells(r)
        lead = progress if i == 0 else ""
        if numbers is None:
            key_format = " ".join(fmt.split(" ")[: 1 + len(key)])
            lines.append(f"{key_format.format(lead, *key)} FAILED {r.error}")
        else:
            lines.append(fmt.format(lead, *key, *numbers))
    return "\n".join(lines)


def format_table(results, header=True, progress=""):
    return _table(results, _op_cells, OP_FORMAT, OP_COLUMNS, header, progress)


def format_model_table(results, header=True, progress=""):
    return _table(results, _model_cells, MODEL_FORMAT, MODEL_COLUMNS, header, progress)


class ResultsFile:
    """DIR/results.json, rewritten whole after every case.

    Each write goes to a temporary file first and then replaces results.json (os.replace is atomic
    on one file system), so whoever reads it, or a run killed mid-write, finds a complete document.
    """

    def __init__(self, directory, header):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "results.json")
        self.payload = dict(header, complete=False, results=[], model_results=[])
        self.write()

    def add(self, key, rows):
        """Append `rows` (dataclasses) to payload[key] ("results" or "model_results") and write."""
        self.payload[key].extend(asdict(r) for r in rows)
        self.write()

    def finish(self):
        self.payload["complete"] = True
        self.write()

    def write(self):
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.payload, f, indent=1)  # NaN stays NaN: Python's json reads it back
        os.replace(tmp, self.path)


def plot(op_results, model_results, path, title):
    """Speed-up of each fused provider over eager and over torch.compile, one bar per case. Failed
    rows have no bar; None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    fused_op = [r for r in op_results if r.provider not in ("eager", "compile") and not r.error]
    if fused_op:
        short = {"contiguous": "NC*", "channels_last": "CL"}
        labels = [f"{r.op} {r.mode} {'x'.join(map(str, r.shape))} {short[r.layout]} {r.dtype} [{r.provider}]" for r in fused_op]
        panels.append(("op level", labels, fused_op))
    fused_model = [r for r in model_results if r.provider not in ("eager", "compile") and not r.error]
    if fused_model:
        labels = [f"{r.model} {r.mode} {'x'.join(map(str, r.input_shape))} {r.dtype} [{r.provider}]" for r in fused_model]
        panels.append(("model level", labels, fused_model))
    if not panels:
        return None
    heights = [max(2.0, 0.28 * len(p[1]) + 1.0) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (name, labels, rows) in zip(axes[:, 0], panels):
        ys = range(len(rows))
        ax.barh([y - 0.2 for y in ys], [r.speedup_vs_eager for r in rows], height=0.4, label="vs eager")
        ax.barh([y + 0.2 for y in ys], [r.speedup_vs_compile for r in rows], height=0.4, label="vs torch.compile")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speed-up (higher is better)")
        ax.set_title(f"{title}: {name}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
