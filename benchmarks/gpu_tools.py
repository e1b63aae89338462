"""The Python steps of benchmarks/gpu_check.sh other than the correctness checks:

    python benchmarks/gpu_tools.py facts --device cuda --out OUTDIR/device.json
        phase a: the build loads (fused_resnet.EXTENSION_ERROR is None, the device's kernels are
        registered; exit 3 if not, so the script builds and asks again), device facts, measured
        copy bandwidth (fused_resnet.bench.copy_bandwidth_gbps)
    python benchmarks/gpu_tools.py bench --providers eager,cuda,triton [--bandwidth GBPS] -- BENCH_ARGS...
        phase c: python -m fused_resnet.bench BENCH_ARGS with only those providers (torch.compile
        costs seconds of inductor per case: the script runs it on what the time allows), and the
        copy bandwidth of phase a instead of measuring it again
    python benchmarks/gpu_tools.py model --device cuda --out OUTDIR/model.json [--batch 128 --size 224]
        phase d: ResNet-50 training steps (SGD), bf16 autocast, channels_last: eager vs fused
        (--providers eager,fused,fused:triton adds the Triton backend), images/s
    python benchmarks/gpu_tools.py record FETCHED [--dest benchmarks/results]
        back here: the bench results under FETCHED (an OUTDIR, or the gpu_check.tgz that holds
        one) merged into DEST/<device-slug>.json and .png (see record())
"""

import argparse
import glob
import json
import os
import re
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def facts(args):
    import torch

    import fused_resnet
    from fused_resnet import bench

    device = torch.device(args.device)
    key = "CUDA" if device.type == "cuda" else "CPU"
    kernels = {
        k: torch._C._dispatch_has_kernel_for_dispatch_key("fused_resnet::_bn_act_fwd_train", k)
        for k in ("CPU", "CUDA")
    } if fused_resnet.EXTENSION_ERROR is None else {}
    info = {
        "extension_error": None if fused_resnet.EXTENSION_ERROR is None else str(fused_resnet.EXTENSION_ERROR),
        "kernels_registered": kernels,
        "extension_file": getattr(sys.modules.get("fused_resnet._C"), "__file__", None),
        "backends": fused_resnet.available_backends(device),
    }
    loaded = fused_resnet.EXTENSION_ERROR is None and kernels.get(key, False)
    info["loaded"] = bool(loaded)
    name, versions = bench.environment(device)
    info.update(device_name=name, versions=versions)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, l2_bytes=p.L2_cache_size,
                    memory_bytes=p.total_memory)
    if loaded:
        start = time.perf_counter()
        info["copy_bandwidth_gbps"] = bench.copy_bandwidth_gbps(device)
        info["copy_bandwidth_seconds"] = round(time.perf_counter() - start, 2)
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))
    if not loaded:
        print(f"gpu_tools facts: the extension does not run {key} tensors: {info['extension_error'] or kernels}",
              file=sys.stderr)
        return 3
    return 0


def bench_chunk(args):
    from fused_resnet import bench

    if "eager" not in args.providers.split(","):
        sys.exit("gpu_tools bench: --providers must include eager (every speed-up is against it)")
    if args.bandwidth:
        bench.cli.copy_bandwidth_gbps = lambda device: args.bandwidth
    bench.main(["--providers", args.providers] + args.bench_args)
    return 0


def model(args):
    import torch

    import fused_resnet
    from fused_resnet import bench

    device = torch.device(args.device)
    dtype_name = args.dtype
    shape = (args.batch, 3, args.size, args.size)
    runners = {}
    for provider in args.providers.split(","):
        # "fused:triton" is the fused model with that backend; "fused" takes "auto" (cuda first).
        base, _, backend = provider.partition(":")
        run = bench.make_model_runner(base, args.model, shape, "train", device, bench.DTYPES[dtype_name], "channels_last")
        if backend:
            run = _with_backend(run, backend, fused_resnet)
        runners[provider] = run
    start = time.perf_counter()
    ms = bench.time_side_by_side(runners, device, rounds=args.rounds, min_run_time=args.min_run_time)
    rows = [
        {"model": args.model, "input_shape": list(shape), "dtype": dtype_name, "layout": "channels_last",
         "mode": "train", "provider": p, "ms": t, "items_per_s": args.batch / (t * 1e-3),
         "speedup_vs_eager": ms["eager"] / t}
        for p, t in ms.items()
    ]
    payload = {"device": bench.environment(device)[0], "seconds": round(time.perf_counter() - start, 1), "results": rows}
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
    for r in rows:
        print(f"{args.model} train {'x'.join(map(str, shape))} {dtype_name} channels_last {r['provider']:<14} "
              f"{r['ms']:8.2f} ms {r['items_per_s']:9.1f} img/s {r['speedup_vs_eager']:.2f}x vs eager")
    return 0


def _with_backend(run, backend, fused_resnet):
    def run_with_backend():
        with fused_resnet.use_backend(backend):
            return run()

    return run_with_backend


def slug(device_name):
    """e.g. "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def record(args):
    """Merge the bench results (and phase d's model.json) of a fetched OUTDIR into
    DEST/<slug>.json (+ .png).

    The chunks are read in the order gpu_check.sh ran them (bench-1-..., bench-2-...); where two
    hold the same case and provider, the later one wins: the chunks with torch.compile re-time
    the fused providers beside it, so their ratios come from one interleaved run."""
    from fused_resnet import bench

    source = args.fetched
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.isfile(source) or os.path.isfile(os.path.join(source, "gpu_check.tgz")):
            archive = source if os.path.isfile(source) else os.path.join(source, "gpu_check.tgz")
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            source = tmp
        paths = sorted(glob.glob(os.path.join(source, "**", "bench*", "results.json"), recursive=True),
                       key=lambda p: os.path.basename(os.path.dirname(p)))
        if not paths:
            print(f"record: no bench*/results.json under {args.fetched}", file=sys.stderr)
            return 1
        merged, rows = None, {}
        for path in paths:
            with open(path) as f:
                payload = json.load(f)
            if merged is None:
                merged = dict(payload, commands=[], results=[], model_results=[])
            if payload["device"] != merged["device"]:
                print(f"record: {path} is from {payload['device']!r}, not {merged['device']!r}", file=sys.stderr)
                return 1
            merged["commands"].append(payload.get("command", ""))
            for row in payload.get("results", []):
                key = (row["op"], tuple(row["shape"]), row["dtype"], row["layout"], row["mode"], row["provider"])
                rows[key] = row
        merged["results"] = list(rows.values())
        # Phase d's model.json rows have bench's ModelResult fields: check_goals.py judges them.
        for path in glob.glob(os.path.join(source, "**", "model.json"), recursive=True):
            with open(path) as f:
                payload = json.load(f)
            if payload["device"] == merged["device"]:
                merged["model_results"] += payload["results"]
        os.makedirs(args.dest, exist_ok=True)
        base = os.path.join(args.dest, slug(merged["device"]))
        with open(base + ".json", "w") as f:
            json.dump(merged, f, indent=1)
        results = [bench.Result(**dict(r, shape=tuple(r["shape"]))) for r in merged["results"]]
        model_rows = [bench.ModelResult(**dict(r, input_shape=tuple(r["input_shape"]))) for r in merged["model_results"]]
        png = bench.plot(results, model_rows, base + ".png", merged["device"]) if results or model_rows else None
        print(f"record: {len(paths)} results.json -> {base}.json" + (f" and {png}" if png else ""))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("facts")
    f.add_argument("--device", default="cuda")
    f.add_argument("--out", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--providers", required=True, help="comma-separated: eager,compile,cuda,triton,cpu")
    b.add_argument("--bandwidth", type=float, default=None, help="copy bandwidth in GB/s (else measured)")
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then python -m fused_resnet.bench arguments")
    m = sub.add_parser("model")
    m.add_argument("--device", default="cuda")
    m.add_argument("--out", required=True)
    m.add_argument("--model", default="resnet50", help="a builder in fused_resnet.models")
    m.add_argument("--providers", default="eager,fused", help='e.g. "eager,fused,fused:triton"')
    m.add_argument("--dtype", default="bf16")
    m.add_argument("--batch", type=int, default=128)
    m.add_argument("--size", type=int, default=224)
    m.add_argument("--rounds", type=int, default=2)
    m.add_argument("--min-run-time", type=float, default=0.3)
    r = sub.add_parser("record")
    r.add_argument("fetched", help="a fetched OUTDIR, or gpu_check.tgz")
    r.add_argument("--dest", default=os.environ.get("RECORD_DIR", os.path.join(ROOT, "benchmarks", "results")))
    args = p.parse_args(argv)
    if args.command == "bench" and args.bench_args[:1] == ["--"]:
        args.bench_args = args.bench_args[1:]
    return {"facts": facts, "bench": bench_chunk, "model": model, "record": record}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
