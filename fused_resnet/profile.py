"""python -m fused_resnet.profile: where a ResNet's time goes, before and after fusion.

    python -m fused_resnet.profile --model resnet50 --batch 8 --eager --train
    python -m fused_resnet.profile --model resnet50 --batch 8 --fused --train --output fused.json

Runs a few steps of a fused_resnet.models network under torch.profiler, writes a Chrome/Perfetto
trace (open it in https://ui.perfetto.dev or chrome://tracing) and prints the ops that take the
most time. The fused ops appear as fused_resnet::bn_relu_fwd, fused_resnet::bn_add_relu_bwd, ...;
in the eager model the same work is aten::batch_norm / aten::native_batch_norm, aten::add_ and
aten::relu_ (and their backward ops).
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, schedule

import fused_resnet
from fused_resnet import bench

MODELS_2D = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
MODELS_3D = ("resnet3d_18", "resnet3d_50")


def input_shape(model, batch, size, frames):
    if model in MODELS_3D:
        return (batch, 3, frames, size, size)
    return (batch, 3, size, size)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fused_resnet.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", choices=MODELS_2D + MODELS_3D)
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on a GPU, 2 on the CPU")
    parser.add_argument("--size", type=int, default=None, help="image side (default: 224 on a GPU, 64 on the CPU)")
    parser.add_argument("--frames", type=int, default=8, help="clip length of the 3D models")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fused", dest="fused", action="store_true", default=True, help="the fused model (default)")
    which.add_argument("--eager", dest="fused", action="store_false", help="the plain eager twin")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="train", action="store_true", default=True, help="SGD training steps (default)")
    mode.add_argument("--eval", dest="train", action="store_false", help="inference")
    parser.add_argument("--compile", action="store_true", help="run the model under torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(bench.DTYPES), help="autocast dtype (default: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last activations (default on a GPU)")
    parser.add_argument("--backend", default=None, help="fused_resnet backend (default: the current selection, normally auto)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before the profiled ones")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=25, help="rows of the printed table")
    parser.add_argument("--output", default=None, help="trace path (default: profile_<model>_<fused|eager>_<train|eval>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch = args.batch or (32 if on_gpu else 2)
    size = args.size or (224 if on_gpu else 64)
    dtype = bench.DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    layout = "channels_last" if (args.channels_last or on_gpu) else "contiguous"
    provider = ("fused" if args.fused else "eager") + ("+compile" if args.compile else "")
    if provider == "eager+compile":
        provider = "compile"
    shape = input_shape(args.model, batch, size, args.frames)
    mode = "train" if args.train else "eval"
    output = args.output or f"profile_{args.model}_{'fused' if args.fused else 'eager'}_{mode}.json"

    if args.backend:
        fused_resnet.set_backend(args.backend)
    run = bench.make_model_runner(provider, args.model, shape, mode, device, dtype, layout)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    captured = {}

    def on_trace_ready(prof):  # called once, when the active steps end
        prof.export_chrome_trace(output)
        captured["averages"] = prof.key_averages()

    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=args.warmup, active=args.steps),
        on_trace_ready=on_trace_ready,
        record_shapes=True,
    ) as prof:
        for _ in range(args.warmup + args.steps):
            run()
            if on_gpu:
                torch.cuda.synchronize(device)
            prof.step()

    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    averages = captured["averages"]
    print(
        f"{args.model} {'fused' if args.fused else 'eager'}{' compiled' if args.compile else ''}, {mode}, "
        f"input {'x'.join(map(str, shape))}, {str(dtype).replace('torch.', '')}, {layout}, on {device}; "
        f"{args.steps} profiled steps after {args.warmup} warm-up"
    )
    print(averages.table(sort_by=sort_key, row_limit=args.top))
    fused_names = [e for e in averages if e.key.startswith("fused_resnet::") and e.key.rsplit("_", 1)[-1] in ("fwd", "bwd")]
    if fused_names:
        total_key = sort_key.replace("self_", "")
        fused_us = sum(getattr(e, total_key) for e in fused_names)
        total_us = sum(getattr(e, sort_key) for e in averages)
        print(f"fused_resnet ops: {fused_us / 1e3:.2f} ms of {total_us / 1e3:.2f} ms profiled "
              f"({100 * fused_us / max(total_us, 1e-9):.1f}%), in {sum(e.count for e in fused_names)} calls")
    print(f"trace written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
