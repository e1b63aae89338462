"""Timing and memory of fused_resnet.bench: the providers of a case measured side by side in
interleaved rounds, the peak memory of one call, the memory a training step keeps for its
backward, the device's copy bandwidth.
"""

import contextlib
import ctypes
import json
import os
import statistics
import sys
import time

import torch


def time_ms(run, device, min_run_time=0.5):
    """Median milliseconds per call of `run` (already warmed up): triton.testing.do_bench
    (CUDA events around each call, L2 flushed in between) on a GPU, torch.utils.benchmark on the
    CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def describe_failure(exc):
    """What a failed row records: the exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def time_side_by_side(runners, device, rounds=3, min_run_time=0.3, errors=None, per_call=False):
    """{provider: ms} for runners of one case, measured in interleaved rounds.

    Each round times every provider once, one after the other, so a burst of noise on a shared
    machine hits one round of all providers rather than all rounds of one; the best round's
    median is kept for each provider. Warm-up (which also triggers torch.compile) comes first.

    per_call=True (CPU model steps, 20-600 ms each): the providers take turns call by call, for
    at least `rounds` calls each and `min_run_time` seconds in all, and each provider's median
    call is kept: on a shared machine the speed drifts by ±10% over seconds, which blocks of a
    second per provider would turn into differences between providers.

    With an `errors` dict, a provider that raises (an Exception, not a KeyboardInterrupt) gets
    its describe_failure there and is left out of the rest and of the result; without one, the
    exception propagates.
    """
    live = dict(runners)

    def attempt(name, call):
        if errors is None:
            return call()
        try:
            return call()
        except Exception as e:
            errors[name] = describe_failure(e)
            del live[name]
            return None

    def warm_up(run):
        for _ in range(3):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for name, run in list(live.items()):
        attempt(name, lambda: warm_up(run))
    if per_call:
        return _time_calls_in_turn(live, attempt, rounds, min_run_time)
    best = {}
    for _ in range(rounds):
        for name, run in list(live.items()):
            ms = attempt(name, lambda: time_ms(run, device, min_run_time=min_run_time))
            if ms is not None:
                best[name] = min(best.get(name, float("inf")), ms)
    return {name: best[name] for name in live}


def _time_calls_in_turn(live, attempt, min_calls, min_seconds):
    """{provider: median ms of one call}, the providers called in turn (time_side_by_side)."""
    samples = {name: [] for name in live}
    start = time.perf_counter()
    while live and (
        min(len(samples[n]) for n in live) < min_calls or time.perf_counter() - start < min_seconds
    ):
        for name, run in list(live.items()):
            begin = time.perf_counter()
            attempt(name, run)
            if name in live:  # (a provider that raised has left)
                samples[name].append((time.perf_counter() - begin) * 1e3)
    return {name: statistics.median(samples[name]) for name in live}


@contextlib.contextmanager
def _native_output_dropped():
    """Within: file descriptors 1 and 2 point at /dev/null. The profiler's native side writes
    straight to them, past sys.stdout: kineto's start/stop lines ("USDT: ... profiler_start"), the
    allocator's warning about blocks allocated before profiling started."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # what C stdio still buffers goes to /dev/null too
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def _cpu_allocations(run):
    """(bytes allocated before, [bytes allocated after each allocation or free], result) of one
    call of `run` on the CPU, from the profiler's allocation events ("Total Allocated" of its
    [memory] records), which follow every CPU tensor allocation. The result lives until the
    profiler has stopped, so what it holds is not freed within the records. What the profiled call
    writes to file descriptors 1 and 2 is dropped with the profiler's own messages (`run` was
    warmed up, so it has shown anything it had to say).
    """
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with _native_output_dropped(), tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = run()
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    records = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not records:
        return 0, [], result
    before = records[0]["args"]["Total Allocated"] - records[0]["args"]["Bytes"]
    return before, [e["args"]["Total Allocated"] for e in records], result


def peak_memory_bytes(run, device):
    """Memory allocated at the peak of one call of `run`, above what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events
    (_cpu_allocations).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before, totals, _ = _cpu_allocations(run)
    return max(totals, default=before) - before


def backward_kept_bytes(forward, device):
    """Memory a training step keeps for its backward: the bytes allocated right after `forward()`,
    which returns the loss with its autograd graph, above those allocated just before it.

    Counted at the allocator rather than by hooks on the tensors autograd saves, so every tensor
    the graph keeps alive is in, however it is kept (save_for_backward, an attribute of a custom
    Function's ctx, the activations a compiled graph saves), and nothing that existed before the
    forward is (parameters, the input batch, the last step's gradients). The logits and the loss
    are in too: a batch of class scores. CUDA: the caching allocator's allocated bytes. CPU: the
    profiler's allocation events (_cpu_allocations).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        loss = forward()
        torch.cuda.synchronize(device)
        kept = torch.cuda.memory_allocated(device) - before
        del loss
        return kept
    before, totals, loss = _cpu_allocations(forward)
    del loss
    return (totals[-1] if totals else before) - before


def copy_bandwidth_gbps(device):
    """Measured device copy bandwidth: bytes read + bytes written per second, in GB/s.

    The copy runs on as many threads as the kernels (torch.get_num_threads(), time_ms), over
    tensors far larger than the last-level cache. On a GPU it is what %bw divides by; on a CPU an
    op case is held against a copy of its own input timed in its rounds (runners.make_copy_runner),
    and this figure is for the record.
    """
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_side_by_side({"copy": lambda: dst.copy_(src)}, device)["copy"]
    return 2 * n * src.element_size() / (ms * 1e-3) / 1e9


def measure(make_runner_for, providers, device, rounds, min_run_time, per_call=False, references=None):
    """({provider: (ms, peak bytes, kept bytes)}, {provider: failure}) of one case.

    Kept bytes: backward_kept_bytes of a runner with a `training_forward` (a model's training
    step), None for the others. `references` ({name: run}) are timed in the same rounds as the
    providers and not measured for memory: (ms, None, None) in the first dict.

    A provider whose runner raises while it is built, warmed up, timed or measured for memory is
    in the second dict, with describe_failure's text, and not in the first; the others go on.
    """
    runners, errors = {}, {}
    for provider in providers:
        try:
            runners[provider] = make_runner_for(provider)
        except Exception as e:
            errors[provider] = describe_failure(e)
    runners.update(references or {})
    timings = time_side_by_side(
        runners, device, rounds=rounds, min_run_time=min_run_time, errors=errors, per_call=per_call
    )
    measured = {}
    for provider, ms in timings.items():
        if provider in (references or {}):
            measured[provider] = (ms, None, None)
            continue
        run = runners[provider]
        try:
            peak = peak_memory_bytes(run, device)
            forward = getattr(run, "training_forward", None)
            measured[provider] = (ms, peak, None if forward is None else backward_kept_bytes(forward, device))
        except Exception as e:
            errors[provider] = describe_failure(e)
    return measured, errors
