"""Profile train_gpt.py's training step: where the time goes.

    python benchmarks/profile_step.py -- --train_files=DIR/proxy_train_*.bin --val_files=... [trainer flags]
    python benchmarks/profile_step.py --steps 2 --top 40 --trace trace.json -- ...
    torchrun --standalone --nproc_per_node=8 benchmarks/profile_step.py -- ...   # several GPUs

Builds the trainer as a one-process run with the given flags, runs --warmup steps (compilation),
starting at step --start_step (the attention window grows with the step: profile late steps too),
times --time_steps steps (median wall ms, synchronized), then records --steps steps with
torch.profiler. It prints the device time per step split into phases (the compiled forward, the
optimizer, everything else = backward and the loss), the time the GPU ran no kernel (waiting on the
host) split by gap length with the longest gaps and the kernels around them, then the top kernels by
device time. The phases
come from wrapping the trainer's methods in profiler ranges, so they need no change to the trainer.
Under torchrun, rank 0 reports, and adds the communication kernels' device time per step and the part
of it during which no other kernel ran (communication not hidden behind compute).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402


def _in_range(name, fn):
    def wrapped(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapped


def instrument(trainer: train_gpt.Trainer, loader: train_gpt.DistributedTrainLoader):
    """Wrap the forward and the optimizer calls of `trainer`, and the loader's hand-out of a micro-batch (which
    stages the next one: its host work and its copy), in named profiler ranges."""
    trainer.forward = _in_range("phase:forward", trainer.forward)
    loader.next_batch = _in_range("phase:loader", loader.next_batch)
    for opt_name in ("adam", "muon"):
        opt = getattr(trainer, opt_name)
        for method in ("reduce_grads", "step", "finish"):
            setattr(opt, method, _in_range(f"phase:{opt_name}", getattr(opt, method)))


def _device_total(event) -> float:
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def _self_device(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def _merged(intervals):
    """Sorted, disjoint union of (start, end) intervals."""
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def exposed_time(comm, compute) -> tuple[float, float]:
    """(length of the union of `comm`, length of the part of it not covered by `compute`)."""
    comm, compute = _merged(comm), _merged(compute)
    total = sum(end - start for start, end in comm)
    covered, j = 0.0, 0
    for start, end in comm:
        while j < len(compute) and compute[j][1] <= start:
            j += 1
        k = j
        while k < len(compute) and compute[k][0] < end:
            covered += min(end, compute[k][1]) - max(start, compute[k][0])
            k += 1
    return total, total - covered


def busy_time(intervals) -> tuple[float, float]:
    """(span from the first start to the last end, length of the union of the intervals): the difference is
    the time no kernel ran."""
    merged = _merged(intervals)
    if not merged:
        return 0.0, 0.0
    return merged[-1][1] - merged[0][0], sum(end - start for start, end in merged)


def device_idle_ms(prof, steps: int) -> tuple[float, float]:
    """(ms per step from the first kernel's start to the last's end, ms per step of it with no kernel running
    on this rank's GPU: launch gaps, host work and syncs the device waited for)."""
    kernels = [(e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events()
               if e.device_type() == torch.autograd.DeviceType.CUDA and not e.is_user_annotation()]
    span, busy = busy_time(kernels)
    return span / 1e6 / steps, (span - busy) / 1e6 / steps


GAP_CLASSES = ((0.0, 10.0), (10.0, 100.0), (100.0, float("inf")))  # microseconds: launch, short stall, host work


def gap_summary(kernels, top: int = 8) -> dict:
    """Where the device waited: kernels [(start, end, name)] (any unit of time, here ns) ->
    {"count": kernels, "by_class": [(lo, hi, number of gaps, their total)] for gaps in [lo, hi) microseconds
    (from GAP_CLASSES, times 1000 for ns), "longest": [(gap, kernel before, kernel after, where the gap starts
    after the first kernel's start)]}. A gap is time after the latest end so far and before the next start, so
    overlapping kernels leave none."""
    kernels = sorted(kernels)
    gaps, last_end, last_name = [], None, None
    for start, end, name in kernels:
        if last_end is not None and start > last_end:
            gaps.append((start - last_end, last_name, name, last_end - kernels[0][0]))
        if last_end is None or end >= last_end:
            last_end, last_name = end, name
    by_class = []
    for lo, hi in GAP_CLASSES:
        inside = [g for g, *_ in gaps if lo * 1000 <= g < hi * 1000]
        by_class.append((lo, hi, len(inside), sum(inside)))
    return dict(count=len(kernels), by_class=by_class, longest=sorted(gaps, key=lambda g: -g[0])[:top])


def host_during(start: int, end: int, events, top: int = 3, min_cover: float = 0.5) -> list[tuple[str, int]]:
    """What the host was in while the device waited from start to end: the host events [(start, end, name)] that
    cover at least min_cover of that window, innermost (shortest) first, as (name, duration). A call that holds
    the host (a synchronization, cudaFree, a pinned allocation) is the innermost; enclosing ranges follow. Empty
    when no single event covers it (many short ones: Python between launches)."""
    window = end - start
    if window <= 0:
        return []
    covering = sorted((e - s, name) for s, e, name in events if min(e, end) - max(s, start) >= min_cover * window)
    return [(name, duration) for duration, name in covering[:top]]


def gap_lines(gaps: dict, steps: int) -> list[str]:
    """The report of gap_summary (ns) per step: kernels, idle ms per gap class, the longest gaps (and, where
    gaps["host"] has them, the host events that cover each)."""
    lines = [f"  {'kernels per step':<24} {gaps['count'] / steps:9.0f}"]
    for lo, hi, count, total in gaps["by_class"]:
        label = f"idle in gaps {lo:g}-{hi:g} us"
        lines.append(f"  {label:<24} {total / 1e6 / steps:9.2f} ms ({count / steps:.0f} gaps per step)")
    hosts = gaps.get("host", [None] * len(gaps["longest"]))
    for (gap, before, after, at), host in zip(gaps["longest"], hosts, strict=True):
        lines.append(f"    {gap / 1e3:9.1f} us at {at / 1e6:7.1f} ms, after {kernel_label(before)}, "
                     f"before {kernel_label(after)}")
        if host is not None:
            held = ", ".join(f"{kernel_label(name, 50)} {duration / 1e3:.1f} us" for name, duration in host)
            lines.append(f"      host meanwhile: {held or 'no single call (Python between launches)'}")
    return lines


def kernel_label(name: str, width: int = 70) -> str:
    """A kernel's name short enough for a line: no leading 'void ' or 'at::native::' (C++ template names put
    the part that tells kernels apart, the functor, after those)."""
    return name.removeprefix("void ").replace("at::native::", "")[:width]


def device_gaps(prof) -> dict:
    """gap_summary of this rank's GPU kernels in the profile (ns), with "host": host_during of each longest gap
    (the profiler puts host events and kernels on one clock)."""
    events = prof.profiler.kineto_results.events()
    kernels = [(e.start_ns(), e.end_ns(), e.name()) for e in events
               if e.device_type() == torch.autograd.DeviceType.CUDA and not e.is_user_annotation()]
    host = [(e.start_ns(), e.end_ns(), e.name()) for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    summary = gap_summary(kernels)
    first = min(start for start, _, _ in kernels) if kernels else 0
    summary["host"] = [host_during(first + at, first + at + gap, host) for gap, _, _, at in summary["longest"]]
    return summary


def communication_ms(prof, steps: int) -> tuple[float, float]:
    """(NCCL kernel ms per step, of it ms per step with no other kernel running) on this rank's GPU."""
    comm, compute = [], []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != torch.autograd.DeviceType.CUDA or e.is_user_annotation():
            continue
        (comm if "nccl" in e.name().lower() else compute).append((e.start_ns(), e.end_ns()))
    total, exposed = exposed_time(comm, compute)
    return total / 1e6 / steps, exposed / 1e6 / steps


def phase_table(prof, steps: int) -> list[tuple[str, float, float | None]]:
    """[(phase, device ms per step, host ms per step)], with 'backward+loss+other' the remainder of all kernel
    time (its host time not separated: None).

    A phase's device time is that of the kernels launched inside its range (the CPU-side entry); its host time
    is how long the host spent inside the range. A phase whose host time exceeds its device time is one the GPU
    waits through unless work queued before it covers the difference. The profiler also lists each range as a
    device-side annotation, which is not a kernel. Without CUDA both are the CPU's time."""
    cuda = torch.cuda.is_available()
    kernel_total, rows, named = 0.0, {}, 0.0
    for e in prof.key_averages():
        is_range = e.key.startswith("phase:")
        if e.device_type == torch.autograd.DeviceType.CPU and is_range:
            t = _device_total(e) if cuda else e.cpu_time_total
            rows[e.key[len("phase:"):]] = (t / 1000 / steps, e.cpu_time_total / 1000 / steps)
            named += t
        elif not is_range and (e.device_type == torch.autograd.DeviceType.CUDA if cuda else True):
            kernel_total += _self_device(e) if cuda else e.self_cpu_time_total
    return [(name, device, host) for name, (device, host) in sorted(rows.items())] + [
        ("backward+loss+other", (kernel_total - named) / 1000 / steps, None), ("total", kernel_total / 1000 / steps, None)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, trainer_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--time_steps", type=int, default=5, help="steps timed without the profiler")
    ap.add_argument("--steps", type=int, default=2, help="steps recorded by the profiler")
    ap.add_argument("--top", type=int, default=30, help="kernels listed")
    ap.add_argument("--start_step", type=int, default=0,
                    help="step index of the first step (sets the stage, lr, momentum and windows)")
    ap.add_argument("--trace", help="write a Chrome trace here")
    args = ap.parse_args(own)
    hp = train_gpt.parse_args(trainer_flags)
    rank, world_size, device = train_gpt.setup_distributed(hp)
    say = print if rank == 0 else (lambda *a, **k: None)
    trainer = train_gpt.Trainer(hp, rank, world_size, device)
    steps = range(args.start_step, args.start_step + args.warmup + args.time_steps + args.steps)
    loader = train_gpt.DistributedTrainLoader(hp, rank, world_size, device, train_gpt.row_specs(steps, hp, trainer.derived))
    step = args.start_step

    def run_step():
        nonlocal step
        trainer.train_step(step, loader)
        step += 1

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        run_step()
    train_gpt._sync(device)
    say(f"warm-up ({args.warmup} steps, compilation included): {time.perf_counter() - t0:.1f} s")
    if hp.compile and device.type == "cuda":
        say("compile time by phase (torch._dynamo.utils.compile_times):\n"
            + torch._dynamo.utils.compile_times(repr="str", aggregate=True))
    times = []
    with train_gpt.GcPauses(freeze=hp.gc_freeze) as pauses:  # as train()'s timed loop runs
        with train_gpt.AllocatorCalls(device) as allocator:
            for _ in range(args.time_steps):
                t0 = time.perf_counter()
                run_step()
                train_gpt._sync(device)
                times.append(1000 * (time.perf_counter() - t0))
        if times:
            say(f"wall ms/step (median of {len(times)}): {statistics.median(times):.1f}  "
                  f"all: {' '.join(f'{t:.1f}' for t in times)}")
            say(pauses.line(f"the {len(times)} timed steps"))
            if allocator.line():
                say(allocator.line(f"the {len(times)} timed steps"))
        instrument(trainer, loader)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                run_step()
            train_gpt._sync(device)
    say(f"\ndevice time per step by phase ({args.steps} steps profiled, rank 0 of {world_size}), and the host's:")
    for name, ms, host_ms in phase_table(prof, args.steps):
        say(f"  {name:<22} {ms:9.2f} ms" + ("" if host_ms is None else f"   host {host_ms:9.2f} ms"))
    if device.type == "cuda":
        span, idle = device_idle_ms(prof, args.steps)
        say(f"  device idle            {idle:9.2f} ms of the {span:.2f} ms from the first kernel to the last")
        for line in gap_lines(device_gaps(prof), args.steps):
            say(line)
    if world_size > 1 and device.type == "cuda":
        comm, exposed = communication_ms(prof, args.steps)
        say(f"  communication kernels  {comm:9.2f} ms, of which not overlapped with compute: {exposed:.2f} ms")
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    say(prof.key_averages().table(sort_by=sort_key, row_limit=args.top, max_name_column_width=90))
    if args.trace and rank == 0:
        prof.export_chrome_trace(args.trace)
        say(f"trace: {args.trace}")
    if train_gpt.dist.is_initialized():
        train_gpt.dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
