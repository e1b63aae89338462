"""benchmarks/gpu_check.sh, the first command of a GPU session, run here as its dry run
(DRY_RUN=cpu: CPU tensors, the cpu backend for "cuda", the Triton interpreter for "triton"), so
that the one device call a session can afford does not fail on the script itself; and its
`record` step, which runs here on what the device sent back.
"""

import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import fused_resnet

ROOT = Path(__file__).resolve().parent.parent
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

# What the dry run cannot run, and says so: no bfloat16 on the Triton interpreter, no CUDA graphs.
DRY_RUN_SKIPS = {
    "paths/triton/bfloat16",
    *(f"{check}/{backend}" for check in ("graph", "graph-bn_act", "reduce-overhead") for backend in ("cpu", "triton")),
}


def run_script(*args, env=None, timeout=900):
    env = dict(env or {}, PATH="/usr/bin:/bin", PYTHON=sys.executable)
    return subprocess.run([BASH, str(ROOT / "benchmarks" / "gpu_check.sh"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def correctness_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dry_run_main(tmp_path):
    out, pack = tmp_path / "out", tmp_path / "pack"
    done = run_script(out, env={"DRY_RUN": "cpu", "PACK": str(pack)})
    assert done.returncode == 0, done.stdout + done.stderr

    summary = (out / "summary.txt").read_text()
    for phase in ("a-load", "count", "b-correctness", "c-bench", "d-model", "e-overhead"):
        assert f"phase {phase}: PASS" in summary, summary
    assert "status 0" in summary
    for name in ("device.json", "nvidia-smi.txt", "correctness.jsonl", "model.json", "goals-c.txt",
                 "bench-c-1-fused-eval/results.json", "bench-c-2-fused-train/results.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "device.json").read_text())["copy_bandwidth_gbps"] > 0
    model = json.loads((out / "model.json").read_text())
    assert {r["provider"] for r in model["results"]} == {"eager", "fused"}

    lines = correctness_lines(out / "correctness.jsonl")
    assert lines[-1]["check"] == "summary" and lines[-1]["n_failed"] == 0
    checks = lines[:-1]
    assert {l["check"] for l in checks if l["passed"] is None} == DRY_RUN_SKIPS
    for line in checks:
        if line["passed"] is None:
            assert line["skipped"], line
            continue
        assert line["passed"] is True, line
        assert math.isfinite(line["max_err"]) and 0 <= line["tol_ratio"] <= 1, line
        assert line["seconds"] >= 0
    names = {l["check"].split("/")[0] for l in checks}
    assert names == {"paths", "acts", "bitwise", "graph", "graph-bn_act", "reduce-overhead", "compile", "big"}
    assert any(l["check"].startswith("paths/triton/float16") for l in checks)
    assert {l["check"].split("/")[2] for l in checks if l["check"].startswith("acts/")} == {
        a for a in fused_resnet.contract.ACTIVATIONS if a != "relu"
    }

    # PACK: one archive of OUTDIR (the device returns at most 8 files) and the summary beside it.
    assert (pack / "summary.txt").read_text() == summary
    with tarfile.open(pack / "gpu_check.tgz") as tar:
        packed = set(tar.getnames())
    assert {"out/summary.txt", "out/correctness.jsonl", "out/model.json", "out/overhead/overhead.json",
            "out/triton_count.json"} <= packed


def test_a_wrong_backend_fails_its_checks(tmp_path):
    """--break-backend adds 1 to the backend's forward outputs: the checks must say FAIL."""
    out = tmp_path / "c.jsonl"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_correctness.py"), "--device", "cpu", "--out", str(out),
         "--only", "^(paths/cpu/float32/3x5x7x7|big/cpu/rows|compile/cpu)", "--break-backend", "cpu"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = correctness_lines(out)
    assert lines[-1]["check"] == "summary" and lines[-1]["n_failed"] == 3 and lines[-1]["n_passed"] == 0
    for line in lines[:-1]:
        assert line["passed"] is False and line["tol_ratio"] > 1, line


def test_record_merges_bench_chunks(tmp_path):
    gpu = "NVIDIA H100 80GB HBM3"

    def row(provider, ms):
        return {"op": "bn_relu", "shape": [64, 256, 56, 56], "dtype": "bf16", "layout": "channels_last",
                "mode": "eval", "provider": provider, "ms": ms, "gbps": 1.0, "bandwidth_fraction": 0.5,
                "peak_memory_bytes": 0, "speedup_vs_eager": 1.0, "speedup_vs_compile": float("nan")}

    fetched = tmp_path / "fetched"
    for chunk, rows in (("bench-c-1-fused-eval", [row("eager", 2.0), row("cuda", 1.0)]),
                        ("bench-c-3-compile-eval-cl", [row("eager", 2.0), row("compile", 1.5), row("cuda", 0.9)])):
        (fetched / "gpu_check" / chunk).mkdir(parents=True)
        (fetched / "gpu_check" / chunk / "results.json").write_text(
            json.dumps({"device": gpu, "command": chunk, "copy_bandwidth_gbps": 3000.0, "results": rows}))
    model_row = {"model": "resnet50", "input_shape": [128, 3, 224, 224], "dtype": "bf16", "layout": "channels_last",
                 "mode": "train", "provider": "fused", "ms": 100.0, "items_per_s": 1280.0, "speedup_vs_eager": 1.2}
    (fetched / "gpu_check" / "model.json").write_text(json.dumps({"device": gpu, "results": [model_row]}))
    # What the device sends back: the packed OUTDIR.
    with tarfile.open(fetched / "gpu_check.tgz", "w:gz") as tar:
        tar.add(fetched / "gpu_check", arcname="gpu_check")
    shutil.rmtree(fetched / "gpu_check")

    dest = tmp_path / "results"
    done = run_script(fetched, "record", env={"RECORD_DIR": str(dest)}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["nvidia-h100-80gb-hbm3.json", "nvidia-h100-80gb-hbm3.png"]
    merged = json.loads((dest / "nvidia-h100-80gb-hbm3.json").read_text())
    assert merged["device"] == gpu and len(merged["commands"]) == 2
    by_provider = {r["provider"]: r["ms"] for r in merged["results"]}
    assert by_provider == {"eager": 2.0, "cuda": 0.9, "compile": 1.5}  # the later chunk wins
    assert merged["model_results"] == [model_row]  # phase d's rows, for check_goals.py
