"""benchmarks/check_goals.py: the verdicts it reaches on small synthetic results.json files.

benchmarks/ is not a package, so the module is loaded from its path. Pure Python: no kernel runs.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "check_goals.py"
GPU = "NVIDIA H100 80GB HBM3"
CPU = "CPU: AMD EPYC, 2 threads"


def load_module():
    spec = importlib.util.spec_from_file_location("check_goals", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cg = load_module()


def op_case(op, shape, dtype, layout, mode, ms, compile_ms=1.0, eager_ms=2.0, bandwidth=0.9):
    """fused_resnet.bench's rows of one case: eager and compile, then fused providers at `ms` ({name: ms}).
    `bandwidth` is the fraction of copy bandwidth reached at 1 ms; compile_ms=None: no compile row."""
    rows = []
    unfused = [("eager", eager_ms)] + ([("compile", compile_ms)] if compile_ms is not None else [])
    for provider, t in [*unfused, *ms.items()]:
        rows.append(
            dict(op=op, shape=list(shape), dtype=dtype, layout=layout, mode=mode, provider=provider, ms=t,
                 gbps=1.0, bandwidth_fraction=bandwidth / t, peak_memory_bytes=0, speedup_vs_eager=eager_ms / t,
                 speedup_vs_compile=compile_ms / t if compile_ms is not None else float("nan"))
        )
    return rows


def model_case(model, input_shape, mode, ms, dtype="bf16", layout="channels_last"):
    """Model rows; `ms` = {provider: ms} over eager, fused, compile, fused+compile."""
    return [
        dict(model=model, input_shape=list(input_shape), dtype=dtype, layout=layout, mode=mode, provider=p, ms=t,
             items_per_s=input_shape[0] / (t * 1e-3), peak_memory_bytes=0, speedup_vs_eager=ms["eager"] / t,
             speedup_vs_compile=ms["compile"] / t if "compile" in ms else float("nan"), note="")
        for p, t in ms.items()
    ]


def write(tmp_path, name, device, results=(), model_results=()):
    payload = dict(device=device, versions={"torch": "2.x", "triton": "3.x", "cuda": "12.x"},
                   command=f"python -m fused_resnet.bench --output {name}", copy_bandwidth_gbps=3000.0,
                   results=list(results), model_results=list(model_results))
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(payload))  # NaN as fused_resnet.bench writes it (json.dump allows it)
    return path


def verdict(verdicts, goal_prefix, case):
    found = [v for v in verdicts if v.goal.name.startswith(goal_prefix) and v.case == case]
    assert len(found) == 1, (goal_prefix, case, [(v.goal.name, v.case) for v in verdicts])
    return found[0]


CL = (64, 256, 56, 56), "bf16", "channels_last"


@pytest.fixture
def gpu_payload(tmp_path):
    rows = []
    # Passes every eval goal: triton at 0.35 ms is best (2/0.35 = 5.7x eager, 1/0.35 = 2.9x compile,
    # 0.9/0.35 of copy bandwidth); cuda at 0.9 ms would miss the compile goal alone.
    rows += op_case("bn_add_relu", *CL, "eval", {"cuda": 0.9, "triton": 0.35})
    # Misses fused vs eager by 20% (2.0x for 2.5x) and passes fused vs compile (1.25x for 1.15x).
    rows += op_case("bn_relu", *CL, "eval", {"cuda": 0.8, "triton": 1.0}, eager_ms=1.6)
    # No compile row: speed-up over compile is NaN, so MISSING; eager is judged.
    rows += op_case("bn_relu", *CL, "train-fwd+bwd", {"cuda": 0.5}, compile_ms=None, eager_ms=1.5)
    models = model_case("resnet50", (128, 3, 224, 224), "train", {"eager": 100.0, "fused": 80.0, "compile": 70.0, "fused+compile": 75.0})
    models += model_case("resnet3d_50", (8, 3, 16, 112, 112), "train", {"eager": 100.0, "fused": 90.0, "compile": 80.0, "fused+compile": 80.0})
    models += model_case("resnet50", (128, 3, 224, 224), "eval", {"eager": 10.0, "fused": 5.0, "compile": 5.0, "fused+compile": 4.0})
    path = write(tmp_path, "gpu", GPU, rows, models)
    return cg.load_results([path])


def test_goal_tables_cover_the_issue_cells():
    gpu = {g.name: g for g in cg.GOALS["gpu"]}
    bandwidth = next(g for g in gpu.values() if g.metric == "bandwidth_fraction")
    assert bandwidth.threshold == 0.90 and {c[0] for c in bandwidth.cells} == {"bn_add_relu"}
    assert len(bandwidth.cells) == 5 * 2 * 3  # shapes x layouts x dtypes, eval only
    eval_eager = next(g for g in gpu.values() if g.name == "op eval: fused vs eager")
    assert len(eval_eager.cells) == 2 * 5 * 2 * 3 and {c[4] for c in eval_eager.cells} == {"eval"}
    cpu_cells = {c for g in cg.GOALS["cpu"] for c in g.cells}
    assert {(c[1], c[3]) for c in cpu_cells} == set(cg.CPU_OP_GRID) and {c[2] for c in cpu_cells} == {"fp32"}
    assert {c[4] for c in cpu_cells} == {"eval", "train-fwd+bwd"}


def test_default_goal_set_follows_the_device():
    assert cg.default_goal_set({"device": CPU}) == "cpu"
    assert cg.default_goal_set({"device": GPU}) == "gpu"


def test_pass_takes_the_best_fused_provider(gpu_payload):
    verdicts = cg.evaluate(gpu_payload, "gpu")
    case = "bn_add_relu 64x256x56x56 bf16 channels_last eval"
    v = verdict(verdicts, "op eval: fused vs torch.compile", case)
    assert (v.status, v.provider) == ("PASS", "triton")
    assert v.value == pytest.approx(1 / 0.35) and v.margin == pytest.approx(1 / 0.35 / 1.15 - 1)
    assert v.per_provider["cuda"] == (pytest.approx(1 / 0.9), "MISS")
    bw = verdict(verdicts, "op eval: % of copy bandwidth", case)
    assert bw.status == "PASS" and bw.value == pytest.approx(0.9 / 0.35)
    assert verdict(verdicts, "op eval: fused vs eager", case).status == "PASS"


def test_miss_reports_its_margin(gpu_payload, tmp_path):
    verdicts = cg.evaluate(gpu_payload, "gpu")
    case = "bn_relu 64x256x56x56 bf16 channels_last eval"
    v = verdict(verdicts, "op eval: fused vs eager", case)
    assert (v.status, v.provider) == ("MISS", "cuda")
    assert v.margin == pytest.approx(2.0 / 2.5 - 1)  # MISS by 20%
    assert cg.format_margin(v.status, v.margin) == "MISS by 20%"
    assert "MISS by 20%" in cg.format_verdict(v)
    assert verdict(verdicts, "op eval: fused vs torch.compile", case).status == "PASS"
    # The bandwidth goal is the 3-pass (bn_add_relu) case only.
    assert not [x for x in verdicts if x.goal.metric == "bandwidth_fraction" and x.case.startswith("bn_relu ")]


def test_absent_cases_and_nan_values_are_missing(gpu_payload):
    verdicts = cg.evaluate(gpu_payload, "gpu")
    absent = verdict(verdicts, "op eval: fused vs eager", "bn_relu 64x256x56x56 fp32 contiguous eval")
    assert absent.status == "MISSING" and math.isnan(absent.value)
    train = "bn_relu 64x256x56x56 bf16 channels_last train-fwd+bwd"
    assert verdict(verdicts, "op train fwd+bwd: fused vs torch.compile", train).status == "MISSING"
    assert verdict(verdicts, "op train fwd+bwd: fused vs eager", train).status == "PASS"  # 3.0x for 2.0x
    counts = cg.summarize(verdicts)
    n_gpu_cells = sum(len(g.cells) for g in cg.GOALS["gpu"])
    assert sum(counts["total"].values()) == n_gpu_cells  # one verdict per cell here: no cell matches two cases
    assert counts["total"]["PASS"] == 8 and counts["total"]["MISS"] == 3
    assert counts["op eval: fused vs eager"] == {"PASS": 1, "MISS": 1, "MISSING": 58}


def test_model_goals(gpu_payload):
    verdicts = cg.evaluate(gpu_payload, "gpu")
    r50 = verdict(verdicts, "model resnet50", "resnet50 128x3x224x224 bf16 channels_last train")
    assert (r50.status, r50.provider, r50.value) == ("PASS", "fused", pytest.approx(1.25))
    r3d = verdict(verdicts, "model resnet3d_50", "resnet3d_50 8x3x16x112x112 bf16 channels_last train")
    assert r3d.status == "MISS" and r3d.margin == pytest.approx((100 / 90) / 1.2 - 1)
    compiled = [v for v in verdicts if v.goal.provider == "fused+compile"]
    by_case = {v.case: v.status for v in compiled}
    assert by_case["resnet50 128x3x224x224 bf16 channels_last train"] == "MISS"  # 70/75
    assert by_case["resnet50 128x3x224x224 bf16 channels_last eval"] == "PASS"  # 5/4
    assert by_case["resnet3d_50 8x3x16x112x112 bf16 channels_last train"] == "PASS"  # 80/80: equal passes
    assert by_case["resnet3d_50 any input any any eval"] == "MISSING"


def test_resnet50_at_another_batch_is_missing(tmp_path):
    models = model_case("resnet50", (64, 3, 224, 224), "train", {"eager": 100.0, "fused": 50.0})
    verdicts = cg.evaluate(cg.load_results([write(tmp_path, "b64", GPU, model_results=models)]), "gpu")
    v = verdict(verdicts, "model resnet50", "resnet50 batch 128 bf16 channels_last train")
    assert v.status == "MISSING"


def test_cpu_goals(tmp_path):
    rows = op_case("bn_relu", (8, 64, 56, 56), "fp32", "channels_last", "train-fwd+bwd", {"cpu": 1.5}, compile_ms=12.0, eager_ms=2.0)
    rows += op_case("bn_relu", (8, 256, 56, 56), "fp32", "contiguous", "eval", {"cpu": 0.85}, compile_ms=1.3, eager_ms=2.8)
    payload = cg.load_results([write(tmp_path, "cpu", CPU, rows)])
    assert cg.default_goal_set(payload) == "cpu"
    verdicts = cg.evaluate(payload, "cpu")
    assert {v.goal.name for v in verdicts} == {g.name for g in cg.GOALS["cpu"]}
    cl = verdict(verdicts, "op (CPU, fp32): fused vs eager", "bn_relu 8x64x56x56 fp32 channels_last train-fwd+bwd")
    assert cl.status == "MISS" and cg.format_margin(cl.status, cl.margin) == "MISS by 11%"  # 1.33x for 1.5x
    assert verdict(verdicts, "op (CPU, fp32): fused vs torch.compile", cl.case).status == "PASS"
    nchw = verdict(verdicts, "op (CPU, fp32): fused vs eager", "bn_relu 8x256x56x56 fp32 contiguous eval")
    assert nchw.status == "PASS" and nchw.provider == "cpu"
    assert cg.summarize(verdicts)["total"] == {"PASS": 3, "MISS": 1, "MISSING": 56}  # 24 ReLU cells, 36 of the others


def test_files_merge_and_must_share_a_device(tmp_path):
    a = write(tmp_path, "a", GPU, op_case("bn_relu", *CL, "eval", {"cuda": 0.5}))
    b = write(tmp_path, "b", GPU, op_case("bn_add_relu", *CL, "eval", {"cuda": 0.5}))
    payload = cg.load_results([a, b])
    assert len(payload["results"]) == 6 and len(payload["commands"]) == 2
    statuses = {v.case: v.status for v in cg.evaluate(payload, "gpu") if v.goal.name == "op eval: fused vs eager"}
    assert statuses["bn_relu 64x256x56x56 bf16 channels_last eval"] == "PASS"
    assert statuses["bn_add_relu 64x256x56x56 bf16 channels_last eval"] == "PASS"
    with pytest.raises(ValueError, match="device"):
        cg.load_results([a, write(tmp_path, "c", CPU)])



def failed(rows, provider, error):
    """`rows` as fused_resnet.bench writes them when `provider` failed: its row has NaN numbers and the
    reason, and no row has a speed-up over it."""
    nan = float("nan")
    out = [dict(r) for r in rows]
    for r in out:
        if provider in ("eager", "compile"):
            r[f"speedup_vs_{provider}"] = nan
    row = next(r for r in out if r["provider"] == provider)
    row.update(ms=nan, gbps=nan, bandwidth_fraction=nan, peak_memory_bytes=None, speedup_vs_eager=nan,
               speedup_vs_compile=nan, error=error)
    return out


def test_failed_rows_are_missing_with_their_reason(tmp_path):
    case = ("bn_relu", (8, 256, 56, 56), "fp32", "contiguous", "eval")
    label = "bn_relu 8x256x56x56 fp32 contiguous eval"
    # The compile provider failed: the speed-up over compile is not measured, over eager it is.
    rows = failed(op_case(*case, {"cpu": 0.5}, compile_ms=1.0, eager_ms=2.0), "compile", "InductorError: LoweringException")
    verdicts = cg.evaluate(cg.load_results([write(tmp_path, "compile", CPU, rows)]), "cpu")
    vs_compile = verdict(verdicts, "op (CPU, fp32): fused vs torch.compile", label)
    assert vs_compile.status == "MISSING" and vs_compile.note == "compile failed: InductorError: LoweringException"
    assert "(compile failed: InductorError: LoweringException)" in cg.format_verdict(vs_compile)
    assert verdict(verdicts, "op (CPU, fp32): fused vs eager", label).status == "PASS"

    # The only fused provider failed: every goal of the case is MISSING, with its reason, even if
    # the failed row carried a number.
    rows = failed(op_case(*case, {"cpu": 0.5}), "cpu", "RuntimeError: boom")
    rows[-1]["speedup_vs_eager"] = 9.0
    verdicts = cg.evaluate(cg.load_results([write(tmp_path, "fused", CPU, rows)]), "cpu")
    for goal in ("op (CPU, fp32): fused vs eager", "op (CPU, fp32): fused vs torch.compile"):
        v = verdict(verdicts, goal, label)
        assert (v.status, v.note) == ("MISSING", "cpu failed: RuntimeError: boom")

    # One of two fused providers failed: the other is judged, and the failure is named beside it.
    rows = failed(op_case(*case, {"cpu": 0.5, "triton": 0.4}), "triton", "RuntimeError: no kernel")
    verdicts = cg.evaluate(cg.load_results([write(tmp_path, "one", CPU, rows)]), "cpu")
    v = verdict(verdicts, "op (CPU, fp32): fused vs eager", label)
    assert (v.status, v.provider, v.note) == ("PASS", "cpu", "triton failed: RuntimeError: no kernel")
    assert v.per_provider["triton"][1] == "MISSING"


def test_cli_reports_failed_rows_and_cut_off_runs(tmp_path):
    passing = all_cpu_cells_passing()  # three rows a case: eager, compile, cpu
    rows = failed(passing[:3], "compile", "InductorError: LoweringException: ValueRangeError") + passing[3:]
    models = model_case("resnet3d_50", (2, 3, 4, 48, 48), "eval", {"eager": 10.0, "fused": 8.0, "compile": 9.0, "fused+compile": 7.0})
    models = failed(models, "fused+compile", "InductorError: LoweringException")
    path = write(tmp_path, "cut", CPU, rows, models)
    payload = json.loads(path.read_text())
    path.write_text(json.dumps(dict(payload, complete=False)))
    done = run_cli(path, "--strict")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "compile failed: InductorError: LoweringException: ValueRangeError" in done.stdout
    assert f"cut off before its end (complete: false): {path}" in done.stdout
    assert "total: 60 cases: 59 PASS, 0 MISS, 1 MISSING" in done.stdout


def all_cpu_cells_passing():
    return [
        row
        for op, shape, dtype, layout, mode in sorted({c for g in cg.GOALS["cpu"] for c in g.cells})
        for row in op_case(op, shape, dtype, layout, mode, {"cpu": 0.5}, compile_ms=1.0, eager_ms=2.0)
    ]


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_cli_strict_exit_status(tmp_path):
    passing = all_cpu_cells_passing()
    good = write(tmp_path, "good", CPU, passing)
    done = run_cli(good, "--strict")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "total: 60 cases: 60 PASS, 0 MISS, 0 MISSING" in done.stdout

    # One fused row made slower than eager/1.5: a MISS, which --strict turns into exit 1.
    missed = [dict(r) for r in passing]
    slow = next(r for r in missed if r["provider"] == "cpu" and r["op"] == "bn_relu")
    slow.update(ms=1.6, speedup_vs_eager=2.0 / 1.6, speedup_vs_compile=1.0 / 1.6)
    bad = write(tmp_path, "bad", CPU, missed)
    done = run_cli(bad, "--strict")
    assert done.returncode == 1
    assert "MISS by 17%" in done.stdout  # 1.25x for 1.5x
    assert run_cli(bad).returncode == 0  # a report without --strict

    # A MISSING case is not a pass either.
    partial = write(tmp_path, "partial", CPU, passing[len(passing) // 2:])
    assert run_cli(partial, "--strict").returncode == 1
    assert run_cli(partial, "--goals", "gpu").returncode == 0
