"""The measuring tools run end to end: python -m fused_resnet.bench and python -m fused_resnet.profile.

Tiny cases only: these check what the tools write and print, not speed.
"""

import json
import math
import os

import pytest
import torch

from helpers import DEVICE
import fused_resnet
from fused_resnet import bench, profile


def test_bytes_moved_counts_passes():
    numel, size = 1000, 4
    assert bench.bytes_moved("bn_relu", "eval", numel, size) == 2 * numel * size
    assert bench.bytes_moved("bn_add_relu", "eval", numel, size) == 3 * numel * size
    assert bench.bytes_moved("bn_relu", "train-fwd", numel, size) == 2 * numel * size
    assert bench.bytes_moved("bn_relu", "train-fwd+bwd", numel, size) == 6 * numel * size
    assert bench.bytes_moved("bn_add_relu", "train-fwd+bwd", numel, size) == 8 * numel * size


def test_peak_memory_sees_an_allocation(capfd):
    n = 1 << 20

    def run():
        os.write(2, b"native noise\n")  # as the profiler's native side writes, past sys.stderr
        return torch.empty(n, dtype=torch.float32, device=DEVICE).fill_(1.0).sum()

    print("before")
    assert bench.peak_memory_bytes(run, DEVICE) >= 4 * n
    print("after")
    out, err = capfd.readouterr()
    assert out == "before\nafter\n" and err == ""  # nothing of the profiler's (kineto's "USDT: ...")


def test_time_side_by_side_drops_a_failing_provider():
    calls = {"flaky": 0}

    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] > 3:  # past the warm-up: fails while timed
            raise RuntimeError("lost the device\nsecond line")

    errors = {}
    best = bench.time_side_by_side({"ok": lambda: None, "flaky": flaky}, torch.device("cpu"), rounds=2, min_run_time=0.01, errors=errors)
    assert list(best) == ["ok"] and best["ok"] > 0
    assert errors == {"flaky": "RuntimeError: lost the device"}
    with pytest.raises(RuntimeError):  # without an errors dict the failure is the caller's
        calls["flaky"] = 0
        bench.time_side_by_side({"flaky": flaky}, torch.device("cpu"), rounds=1, min_run_time=0.01)


def _tiny_cpu_bench(monkeypatch):
    """One tiny quick case on the CPU, the copy bandwidth not measured."""
    monkeypatch.setattr(bench.cases, "CPU_QUICK_CASES", [((2, 5, 3, 3), "channels_last")])
    monkeypatch.setattr(bench.cli, "copy_bandwidth_gbps", lambda device: 10.0)


@pytest.mark.parametrize("mode", bench.MODES)
def test_runner_rotates_input_sets(mode):
    assert bench.input_set_count(1, DEVICE) == bench.runners.MAX_INPUT_SETS
    assert bench.input_set_count(1 << 40, DEVICE) == 1
    # the sets of a case together span well over the last-level cache, so none is found there
    set_bytes = 1 << 20
    assert bench.input_set_count(set_bytes, DEVICE) * set_bytes >= 2 * bench.runners.cache_bytes(DEVICE)
    run = bench.make_runner("eager", "bn_add_relu", (2, 3, 4, 4), "channels_last", torch.float32, mode, DEVICE)
    first, second = run(), run()
    first = first[0] if isinstance(first, tuple) else first
    second = second[0] if isinstance(second, tuple) else second
    assert not torch.equal(first, second), "successive calls should see different inputs"


def test_bench_quick_writes_results_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.cases, "CPU_QUICK_CASES", [((2, 5, 3, 3), "channels_last")])
    monkeypatch.setattr(bench.cases, "CPU_QUICK_MODEL_CASES", [("resnet18", (2, 3, 16, 16))])
    monkeypatch.setattr(bench.cli, "copy_bandwidth_gbps", lambda device: 10.0)
    bench.main(["--device", "cpu", "--quick", "--ops", "bn_relu,bn_add_silu", "--output", str(tmp_path)])
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["device"].startswith("CPU")
    assert payload["versions"]["torch"] == torch.__version__
    assert payload["command"] == f"python -m fused_resnet.bench --device cpu --quick --ops bn_relu,bn_add_silu --output {tmp_path}"

    providers = set(bench.providers_for(torch.device("cpu")))
    seen = {}
    for row in payload["results"]:
        seen.setdefault((row["op"], row["mode"]), set()).add(row["provider"])
        assert row["ms"] > 0 and math.isfinite(row["ms"])
        nbytes = bench.bytes_moved(row["op"], row["mode"], 2 * 5 * 3 * 3, 4)
        assert row["gbps"] == pytest.approx(nbytes / (row["ms"] * 1e-3) / 1e9)
        # on a CPU against the copy of the case's input timed in its rounds, not the run's figure
        assert row["copy_gbps"] > 0 and math.isfinite(row["copy_gbps"])
        assert row["bandwidth_fraction"] == pytest.approx(row["gbps"] / row["copy_gbps"])
        if row["provider"] == "eager":
            assert row["speedup_vs_eager"] == pytest.approx(1.0)
    # the ReLU ops in every mode, the other activations in the modes of their goals
    assert seen == {("bn_relu", mode): providers for mode in bench.MODES} | {
        ("bn_add_silu", mode): providers for mode in bench.cases.ACT_MODES
    }

    model_rows = payload["model_results"]
    assert {(r["mode"], r["provider"]) for r in model_rows} == {
        (m, p) for m in bench.MODEL_MODES for p in bench.model_providers(torch.device("cpu"), True)
    }
    for row in model_rows:
        assert row["items_per_s"] == pytest.approx(2 / (row["ms"] * 1e-3))
        if row["mode"] == "train":  # the forward keeps at least the logits for the backward
            assert row["backward_kept_bytes"] >= 2 * 10 * 4
        else:  # no backward, nothing kept for one
            assert row["backward_kept_bytes"] is None
    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "vs eager" in printed and "items/s" in printed and "kept MiB" in printed


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_kept_bytes_of_conv_bn_relu(layout):
    """What a conv -> BatchNorm -> ReLU stack keeps for its backward: BatchNorm's input (the conv
    output) and the ReLU's output, eager and fused alike; the fused op may add its ReLU mask, one
    bit per element. Not a third activation, and nothing that existed before (weights, input)."""
    torch.manual_seed(0)
    fmt = bench.memory_format(layout, 4)
    x = torch.randn(4, 8, 16, 16, device=DEVICE).contiguous(memory_format=fmt)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    stacks = {
        "eager": torch.nn.Sequential(conv, torch.nn.BatchNorm2d(16), torch.nn.ReLU()),
        "fused": torch.nn.Sequential(conv, fused_resnet.nn.BatchNormReLU2d(16)),
    }
    numel = 4 * 16 * 16 * 16  # of the conv output
    activation, mask = 4 * numel, (numel + 7) // 8  # fp32 bytes; one bit per element
    kept = {}
    for name, stack in stacks.items():
        stack = stack.to(DEVICE, memory_format=fmt).train()
        kept[name] = bench.backward_kept_bytes(lambda: stack(x).sum(), DEVICE)
        assert 2 * activation <= kept[name] < 3 * activation, name
    assert kept["fused"] <= kept["eager"] + mask
    with torch.no_grad():  # an inference forward keeps nothing but its result, a scalar
        assert bench.backward_kept_bytes(lambda: stacks["eager"](x).sum(), DEVICE) < activation


def test_bench_falls_back_to_the_run_copy_bandwidth(tmp_path, monkeypatch):
    """A CPU case whose copy fails is held against the copy bandwidth measured for the run."""
    _tiny_cpu_bench(monkeypatch)

    def copy_breaks(*args):
        def run():
            raise RuntimeError("no copy")

        return run

    monkeypatch.setattr(bench.cli, "make_copy_runner", copy_breaks)
    bench.main(["--device", "cpu", "--quick", "--skip-models", "--cases", "bn_relu eval", "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["provider"] for r in rows] == bench.providers_for(torch.device("cpu"))
    for row in rows:
        assert row["error"] == "" and row["copy_gbps"] == 10.0
        assert row["bandwidth_fraction"] == pytest.approx(row["gbps"] / 10.0)


def test_bench_records_a_failed_provider_and_goes_on(tmp_path, monkeypatch, capsys):
    _tiny_cpu_bench(monkeypatch)
    op_function = bench.runners._op_function

    def compile_breaks(provider, act):
        if provider == "compile":
            raise RuntimeError("InductorError: LoweringException\nthe traceback")
        return op_function(provider, act)

    monkeypatch.setattr(bench.runners, "_op_function", compile_breaks)
    bench.main(["--device", "cpu", "--quick", "--skip-models", "--cases", "bn_relu eval", "--output", str(tmp_path)])
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["complete"] is True
    rows = {r["provider"]: r for r in payload["results"]}
    assert list(rows) == bench.providers_for(torch.device("cpu"))
    broken = rows.pop("compile")
    assert broken["error"] == "RuntimeError: InductorError: LoweringException"
    assert math.isnan(broken["ms"]) and math.isnan(broken["speedup_vs_eager"]) and broken["peak_memory_bytes"] is None
    for row in rows.values():  # the others are measured, and only against measured rows
        assert row["error"] == "" and row["ms"] > 0 and row["peak_memory_bytes"] >= 0
        assert row["speedup_vs_eager"] == pytest.approx(rows["eager"]["ms"] / row["ms"])
        assert math.isnan(row["speedup_vs_compile"])
    printed = capsys.readouterr().out
    assert "FAILED RuntimeError: InductorError: LoweringException" in printed
    assert "1 row(s) FAILED" in printed and "the traceback" not in printed


def test_bench_runs_the_named_providers(tmp_path, monkeypatch, capsys):
    """--providers keeps those named that the device runs, says which it left out, and refuses a
    name that is no provider at all."""
    _tiny_cpu_bench(monkeypatch)
    args = ["--device", "cpu", "--quick", "--skip-models", "--cases", "bn_relu eval", "--output", str(tmp_path)]
    bench.main(args + ["--providers", "eager,cpu,cuda"])
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["provider"] for r in rows] == ["eager", "cpu"]
    assert "--providers: cuda left out" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(args + ["--providers", "eager,cudnn"])
    assert "unknown provider(s) cudnn" in capsys.readouterr().err


def test_bench_writes_each_case_as_it_ends(tmp_path, monkeypatch, capsys):
    """A run cut off in its second case leaves the first on disk, in bench-out/ by default."""
    _tiny_cpu_bench(monkeypatch)
    monkeypatch.setattr(bench.cli, "providers_for", lambda device: ["eager"] + bench.fused_providers(device))
    run_op_case = bench.run_op_case
    cases = []

    def interrupted_second(*args, **kwargs):
        cases.append(args[2:])
        if len(cases) == 2:
            raise KeyboardInterrupt
        return run_op_case(*args, **kwargs)

    monkeypatch.setattr(bench.cli, "run_op_case", interrupted_second)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench-out").mkdir()
    (tmp_path / "bench-out" / "speedup.png").write_bytes(b"an earlier run's plot")
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--quick", "--skip-models"])
    payload = json.loads((tmp_path / "bench-out" / "results.json").read_text())
    assert payload["complete"] is False
    first = cases[0]  # (dtype, shape, layout, op, mode)
    assert [(r["dtype"], tuple(r["shape"]), r["layout"], r["op"], r["mode"]) for r in payload["results"]] == [first] * len(
        bench.cli.providers_for(torch.device("cpu"))
    )
    assert all(r["ms"] > 0 for r in payload["results"])
    assert not (tmp_path / "bench-out" / "speedup.png").exists()
    assert "interrupted: the finished cases are in bench-out/results.json" in capsys.readouterr().err


def test_model_compile_is_static(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compiled.append(kwargs) or model)
    run = bench.make_model_runner("compile", "resnet18", (1, 3, 16, 16), "eval", torch.device("cpu"), torch.float32, "contiguous")
    assert compiled == [{"dynamic": False}] and run().shape == (1, 10)


def test_bench_case_selection_splits_the_gpu_cases():
    cuda = torch.device("cuda")
    every = bench.op_cases(cuda, ["bf16", "fp32"], quick=False)
    relu_ops = [op for op in bench.OPS if bench.op_parts(op)[0] == "relu"]
    per_shape = len(relu_ops) * len(bench.MODES) + (len(bench.OPS) - len(relu_ops)) * len(bench.cases.ACT_MODES)
    assert len(every) == len(bench.GPU_CASES) * 2 * per_shape
    assert bench.op_cases(cuda, ["bf16"], quick=False, ops=("bn_silu",)) == [
        ("bf16", shape, layout, "bn_silu", mode) for shape, layout in bench.GPU_CASES for mode in bench.cases.ACT_MODES
    ]
    goal_modes = bench.op_cases(cuda, ["bf16"], quick=False, modes=("eval", "train-fwd+bwd"))
    assert {case[4] for case in goal_modes} == {"eval", "train-fwd+bwd"}
    picked = bench.op_cases(cuda, ["bf16", "fp32"], quick=False, pattern="bn_relu eval 64x256x56x56 channels_last")
    assert picked == [
        (dtype, (64, 256, 56, 56), "channels_last", "bn_relu", "eval") for dtype in ("bf16", "fp32")
    ]
    # every case is in exactly one of the two halves split on layout
    halves = [bench.op_cases(cuda, ["bf16"], quick=False, pattern=p) for p in (" contiguous ", " channels_last ")]
    assert sorted(halves[0] + halves[1]) == sorted(bench.op_cases(cuda, ["bf16"], quick=False))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--modes", "eval,backward"], "unknown mode 'backward'"),
        (["--cases", "("], "not a regular expression"),
        (["--ops", "bn_relu,bn_elu"], "unknown op case 'bn_elu'"),
    ],
)
def test_bench_refuses_bad_case_selection(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("fused", [True, False])
def test_profile_writes_trace_and_table(tmp_path, capsys, fused):
    trace = tmp_path / "trace.json"
    args = ["--model", "resnet18", "--batch", "2", "--size", "16", "--warmup", "1", "--steps", "1"]
    args += ["--device", "cpu", "--output", str(trace), "--fused" if fused else "--eager"]
    assert profile.main(args) == 0
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    printed = capsys.readouterr().out
    assert "Self CPU" in printed
    fused_names = {"fused_resnet::bn_relu_fwd", "fused_resnet::bn_add_relu_fwd", "fused_resnet::bn_relu_bwd", "fused_resnet::bn_add_relu_bwd"}
    if fused:
        assert fused_names <= names
        assert "fused_resnet ops:" in printed
    else:
        assert not fused_names & names
        assert "aten::native_batch_norm" in names or "aten::_native_batch_norm_legit" in names


def test_bench_overhead_times_every_provider_interleaved(tmp_path, capsys):
    """--overhead: one row per case, every provider timed in every round, written to overhead.json."""
    from fused_resnet.bench import overhead as bench_overhead

    rows = bench_overhead.run("cpu", rounds=2, number=3, ops=("bn_add_relu",), dims=(2,), modes=bench_overhead.MODES)
    names = bench_overhead.providers(torch.device("cpu"))
    assert names[0] == "eager" and "triton" not in names and len(names) >= 2
    assert [r["mode"] for r in rows] == list(bench_overhead.MODES)
    for row in rows:
        assert set(row["samples_us"]) == set(names)
        assert all(len(s) == 2 and min(s) > 0 for s in row["samples_us"].values())
    bench.main(["--overhead", "--quick", "--device", "cpu", "--output", str(tmp_path)])
    written = json.loads((tmp_path / "overhead.json").read_text())
    assert len(written["rows"]) == 2 * 3 * len(bench_overhead.MODES)
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("case")][0]
    assert all(f"{n} µs" in header for n in names) and all(f"{n}/eager" in header for n in names[1:])
