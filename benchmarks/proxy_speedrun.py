"""Proxy speedrun: run train_gpt.py on the GPUs present and report, per run and as medians, the time to
a target val loss, ms/step, tokens/s, model FLOPs per token, MFU, peak memory and cold start.

    python benchmarks/proxy_speedrun.py --data DIR --runs 5 --target 2.04 -- --num_iterations=200 \
        --val_loss_every=25 --cycle_train_data=true          # extra trainer flags after --
    python benchmarks/proxy_speedrun.py --trainer train_gpt_medium.py --data DIR -- --num_iterations=200
    python benchmarks/proxy_speedrun.py --logs logs/*.txt --target 2.04   # summarize existing logs
    python benchmarks/proxy_speedrun.py --data DIR --nproc 1 --variant base= --variant ns5=--muon_ortho=newton_schulz5 \
        -- --num_iterations=200       # configurations side by side, one GPU each (queued if GPUs run out)
    python benchmarks/proxy_speedrun.py --logs logs/proxy_speedrun/*.txt --plot cmp.png   # val loss vs time, per variant
    python benchmarks/proxy_speedrun.py --data DIR --runs 2 --variant ... --lease_s 560 -- ...   # a machine lent for
        # 560 s: start only runs expected to end in time; the same command again runs the rest, keeping what finished

DIR holds proxy_train_*.bin and proxy_val_*.bin (shared/corpus/unpack.sh makes them). Every number
comes from the trainer's own log: training time excludes compilation, the untimed warm-up and
validation; ms/step is the median of the per-step increments of train_time (by stage: within each stage and
the extension; their interquartile range by stage shows a host that sets the pace), tokens/s the run's tokens
over its training time; time to target is the
train_time of the first validation at or below the target (so it depends on --val_loss_every).

FLOPs per token (training, forward + backward = 3x forward; PaLM, arXiv 2204.02311, Appendix B):
6 x (matmul weights of the blocks and the head) + 12 x (heads * head_dim) x attended keys summed over
the layers, with attended keys = half the layer's sliding window (causal), averaged over the run's
tokens (the stages' windows, each step weighted by its batch). Document masking lowers the real attention work, so MFU here is an upper estimate
of useful work over the measured bf16 matmul peak (8192^3 torch.matmul, median).
"""
import argparse
import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402 (after the path insert: benchmarks/ is a folder of scripts)


def _load_verify():
    spec = importlib.util.spec_from_file_location("verify", ROOT / "records" / "verify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


verify = _load_verify()
PEAK_MATMUL_N = 8192  # square bf16 matmul of the peak measurement: large enough that launch overhead does not count


def flops_per_token(hp: train_gpt.Hyperparameters) -> float:
    """Training FLOPs per token of the recipe `hp` (see the module docstring for the convention): the
    attention term is averaged over the run's tokens, each step weighted by its stage's batch."""
    d, hdim, L = hp.model_dim, hp.num_heads * hp.head_dim, hp.num_layers
    attention_layers = sum(1 for kind in hp.layer_attention if kind != "-")
    matmul_weights = attention_layers * 4 * hdim * d + L * 2 * hp.mlp_ratio * d * d + hp.vocab_size * d
    derived = train_gpt.derive(hp, 1)
    keys, tokens = 0.0, 0
    for step in range(train_gpt.total_steps(hp)):
        plan = train_gpt.plan_step(step, hp, derived)
        batch = plan.batch_tokens
        windows = dict(S=plan.windows[0], L=plan.windows[1])
        keys += batch * sum(windows[kind] for kind in hp.layer_attention if kind != "-") * train_gpt.ATTN_BLOCK / 2
        tokens += batch
    return 6 * matmul_weights + 12 * hdim * keys / tokens


def run_tokens(hp: train_gpt.Hyperparameters) -> int:
    """Tokens the whole run trains on: every step's stage batch."""
    derived = train_gpt.derive(hp, 1)
    return sum(train_gpt.plan_step(s, hp, derived).batch_tokens
               for s in range(train_gpt.total_steps(hp)))


def stage_bounds(hp: train_gpt.Hyperparameters) -> list[tuple[int, int]]:
    """(first step, step after the last) of each stage, then of the extension."""
    starts = [s.start for s in train_gpt.derive(hp, 1).recipe.stages] + [hp.num_iterations]
    return list(zip(starts, starts[1:] + [train_gpt.total_steps(hp)]))


def _stage_steps_ms(hp: train_gpt.Hyperparameters, step_ms: dict[int, float]) -> list[list[float]]:
    """The ms of each step in each stage, then in the extension: step k runs from the log's train_time after k
    steps to the one after k + 1."""
    return [[step_ms[k + 1] - step_ms[k] for k in range(first, stop) if k in step_ms and k + 1 in step_ms]
            for first, stop in stage_bounds(hp)]


def stage_ms(hp: train_gpt.Hyperparameters, step_ms: dict[int, float]) -> list[float | None]:
    """Median ms of a step in each stage, then in the extension (None where the log has no such step)."""
    return [statistics.median(steps) if steps else None for steps in _stage_steps_ms(hp, step_ms)]


def stage_iqr_ms(hp: train_gpt.Hyperparameters, step_ms: dict[int, float]) -> list[float | None]:
    """Interquartile range of the step times in each stage, then in the extension (None below 4 steps): a few ms
    where the GPU sets the pace, tens where the host does (its launches or the loader late; README, "host-bound")."""
    out = []
    for steps in _stage_steps_ms(hp, step_ms):
        q1, _, q3 = statistics.quantiles(steps, n=4) if len(steps) >= 4 else (None, None, None)
        out.append(None if q1 is None else q3 - q1)
    return out


@functools.cache
def fineweb_iterations(track: str) -> int:
    """Scheduled steps of the track's FineWeb run: its trainer's default (the medium trainer is imported only
    for a medium log)."""
    if track == "medium":
        return importlib.import_module("train_gpt_medium").Hyperparameters.num_iterations
    return train_gpt.Hyperparameters.num_iterations


def schedule_estimate_s(hp: train_gpt.Hyperparameters, by_stage: list[float | None] | None,
                        num_iterations: int) -> float | None:
    """Training seconds of the same recipe at `num_iterations` scheduled steps (the FineWeb schedule: the
    trainer's default), from a run's median ms per step in each stage and in the extension: an estimate,
    since the stages' step times do not depend on how many steps they have (the same rows and windows).
    None where a stage's time is missing."""
    if not by_stage or any(ms is None for ms in by_stage):
        return None
    bounds = stage_bounds(dataclasses.replace(hp, num_iterations=num_iterations))
    return sum((stop - first) * ms for (first, stop), ms in zip(bounds, by_stage, strict=True)) / 1000


def recipe_of(run) -> train_gpt.Hyperparameters | None:
    """A parsed log's hyperparameters as this trainer's, or None for an earlier recipe this trainer no longer
    takes (a flag since renamed or removed, or a value it now refuses)."""
    try:
        return train_gpt.Hyperparameters(**run.hyperparameters)
    except (TypeError, train_gpt.ConfigError):
        return None


def summarize_log(path: Path, target: float, peak_tflops: float | None) -> dict:
    """summarize_run of the log at `path`, read by records/verify.py's reader."""
    return summarize_run(verify.parse_log(path), path, target, peak_tflops)


def summarize_run(run, path: Path, target: float, peak_tflops: float | None) -> dict:
    """Numbers of one parsed training log; None where the log does not have them. Logs of earlier recipes, whose
    hyperparameters this trainer no longer takes, get no FLOP count; their tokens come from their own
    `batch_tokens`. Raises ValueError for a log without a hyperparameters line (verify.parse_log raises
    verify.VerifyError for an unreadable one)."""
    if run.hyperparameters is None:
        raise ValueError(f"{path}: no hyperparameters line; not a train_gpt.py log")
    step_ms = {p.step: p.train_time_ms for p in run.step_points}
    hp = recipe_of(run)
    if hp is not None:
        clock = step_ms | {p.step: p.train_time_ms for p in run.val_points}  # validations read the clock too
        fpt, tokens, by_stage, spread = flops_per_token(hp), run_tokens(hp), stage_ms(hp, clock), stage_iqr_ms(hp, clock)
        fineweb_s = schedule_estimate_s(hp, by_stage, fineweb_iterations(hp.track))
    else:
        fpt, tokens = None, run.hyperparameters.get("batch_tokens", 0) * (run.num_iterations or 0) or None
        by_stage, spread, fineweb_s = None, None, None
    # Per-step increments; a step after a validation also contains nothing else (the clock is paused).
    increments = [step_ms[k] - step_ms[k - 1] for k in sorted(step_ms) if k - 1 in step_ms]
    ms = statistics.median(increments) if increments else None
    last_val = run.val_points[-1] if run.val_points else None
    finished = last_val is not None and last_val.step == run.num_iterations
    tokens_per_s = tokens / (last_val.train_time_ms / 1000) if finished and tokens and last_val.train_time_ms else None
    world = run.world_size or 1
    mfu = fpt * tokens_per_s / (peak_tflops * 1e12 * world) if fpt and tokens_per_s and peak_tflops else None
    reached = [p.train_time_ms for p in run.val_points if p.val_loss <= target]
    return {"log": str(path), "world_size": world, "gpu": gpu_bus(run.gpu), "ms_per_step": ms, "stage_ms": by_stage,
            "stage_iqr_ms": spread, "tokens_per_s": tokens_per_s,
            "flops_per_token": fpt, "mfu": mfu, "time_to_target_s": reached[0] / 1000 if reached else None,
            "final_loss": last_val.val_loss if finished else None,
            "train_time_s": last_val.train_time_ms / 1000 if last_val else None,
            "peak_gib": run.peak_memory_mib[0] / 1024 if run.peak_memory_mib else None,
            "compile_s": run.timings_s.get("warmup_and_compile_time"), "startup_s": run.timings_s.get("startup_time"),
            "gc_ms": run.gc_passes[3] if run.gc_passes else None, "allocator_calls": run.allocator_calls,
            "fineweb_estimate_s": fineweb_s}


def gpu_bus(gpu: str | None) -> str | None:
    """'00:07.0', the short bus id of a log's `gpu:` line ('NVIDIA H200, bus 00000000:00:07.0, uuid GPU-...'):
    which GPU of the host rank 0 ran on (None for older logs)."""
    return gpu.rpartition(" bus ")[2].partition(",")[0].removeprefix("00000000:") if gpu else None


def gpu_uuid(gpu: str | None) -> str | None:
    """'GPU-8f1c...', the UUID of a log's `gpu:` line: which GPU rank 0 ran on, told apart across hosts (hosts
    share bus ids); None for logs older than the UUID in that line, and off CUDA."""
    return (gpu.partition(", uuid ")[2] or None) if gpu else None


def measure_peak_tflops() -> float | None:
    """Median bf16 PEAK_MATMUL_N^3 torch.matmul rate on this GPU in TFLOP/s, or None without one: the ceiling
    MFU here and the % peak of bench_orthogonalize.py refer to. Timed with CUDA events per call, the first
    calls dropped as warm-up."""
    import torch
    if not torch.cuda.is_available():
        return None
    n = PEAK_MATMUL_N
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * n ** 3 / (statistics.median(times[5:]) / 1000) / 1e12


def plan_runs(variants: list[str], runs: int, first_seed: int = 0) -> list[tuple[str, int, list[str]]]:
    """(run_id, seed, trainer flags) for every variant "NAME=FLAGS" and seed first_seed..first_seed+runs-1."""
    jobs = []
    for variant in variants:
        name, sep, flags = variant.partition("=")
        if not sep or not name or name.startswith("-"):
            raise SystemExit(f"--variant {variant!r}: expected NAME=FLAGS (FLAGS may be empty)")
        jobs += [(f"{name}_{seed}", seed, flags.split()) for seed in range(first_seed, first_seed + runs)]
    run_ids = [run_id for run_id, _, _ in jobs]
    if len(set(run_ids)) != len(run_ids):
        raise SystemExit(f"--variant names must differ; run ids {run_ids}")
    return jobs


def gpu_groups(gpus: int, nproc: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each slot that can run one job: disjoint groups of `nproc` GPUs, or one
    slot that keeps the environment's devices (CPU, or not enough GPUs for two jobs)."""
    if gpus < 2 * nproc:
        return [None]
    return [",".join(str(g) for g in range(k, k + nproc)) for k in range(0, gpus - nproc + 1, nproc)]


def seed_slots(jobs: list[tuple[str, int, list[str]]], slots: int) -> dict[str, int] | None:
    """The slot (GPU group) of each run when there are several slots and seeds: seed k of every variant on the
    same slot, k mod slots counted from the first seed, so that each variant's runs meet the host's GPUs alike
    (two GPUs of one host can differ in speed by a few percent, as much as a component changes a step); None
    (any free slot) for one slot or one seed."""
    seeds = sorted({seed for _, seed, _ in jobs})
    if slots < 2 or len(seeds) < 2:
        return None
    return {run_id: seeds.index(seed) % slots for run_id, seed, _ in jobs}


def staggered(jobs: list[tuple[str, int, list[str]]], slot_of: dict[str, int], slots: int) -> list[str]:
    """The run ids in the order the slots take them: slot k starts k / slots of the way down the variants and
    wraps around, so that slots do not compile one new graph at the same time; each variant's graph is compiled
    once, and its runs on the other slots find it in the compile cache (a new graph takes minutes, a cached one
    well under one)."""
    variants = list(dict.fromkeys(variant_of(Path(run_id)) for run_id, _, _ in jobs))

    def key(run_id):
        slot = slot_of[run_id]
        return (variants.index(variant_of(Path(run_id))) - slot * len(variants) // slots) % len(variants)
    return sorted((run_id for run_id, _, _ in jobs), key=key)


class Lease:
    """A machine lent for `seconds` from now (--lease_s): a run starts only if it is expected to end in time, so
    that none is cut off (a cut-off run is lost; the same command again keeps only finished runs). A run's expected
    duration comes from this command's finished runs: its variant's longest later run (a later run finds the graph
    its variant's first run compiled, cached), else its variant's first run, else the first run of a variant that
    finished last (on a fresh machine the first runs compile everything, at once on every GPU; later new graphs
    find much of that cached, so the latest first run predicts the next better than the longest). Before any run
    has finished nothing is measured, and a run starts."""

    def __init__(self, seconds: float, clock=time.perf_counter):
        self.clock, self.end = clock, clock() + seconds
        self.first: dict[str, float] = {}  # variant -> its first run's seconds, in the order they finished
        self.later: dict[str, float] = {}  # variant -> its longest later run's seconds
        self.started_variants: set[str] = set()

    def expected_s(self, run_id: str) -> float | None:
        variant = variant_of(Path(run_id))
        latest_first = next(reversed(self.first.values()), None)
        return self.later.get(variant, self.first.get(variant, latest_first))

    def allows(self, run_id: str) -> bool:
        expected = self.expected_s(run_id)
        return expected is None or self.clock() + expected <= self.end

    def started(self, run_id: str) -> bool:
        """Note that run_id starts; whether it is its variant's first run in this command."""
        variant = variant_of(Path(run_id))
        first = variant not in self.started_variants
        self.started_variants.add(variant)
        return first

    def finished(self, run_id: str, seconds: float, first: bool) -> None:
        variant = variant_of(Path(run_id))
        if first:
            self.first[variant] = seconds
        else:
            self.later[variant] = max(self.later.get(variant, 0.0), seconds)


def run_side_by_side(commands: dict[str, list[str]], groups: list[str | None], log_dir: Path,
                     slot_of: dict[str, int] | None = None, lease: Lease | None = None) -> dict[str, int]:
    """Run every command, as many at once as there are GPU groups, each on its slot in `slot_of` (seed_slots) or,
    without it, on the first that is free; the exit status of each. With one slot the console output streams
    here; side by side it goes to <log_dir>/<run_id>.console, which is kept only for a run that failed (a
    finished run's log has every line worth keeping). With a `lease`, a run it does not allow waits (a later
    measurement may shorten its estimate) and is left out of the result if it never fits."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, free, status = list(commands), {}, list(range(len(groups))), {}
    while pending or running:
        for slot in list(free):
            run_id = next((r for r in pending if (slot_of is None or slot_of[r] == slot)
                           and (lease is None or lease.allows(r))), None)
            if run_id is None:
                continue
            pending.remove(run_id)
            free.remove(slot)
            first = lease.started(run_id) if lease else False
            group = groups[slot]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if group is not None:
                env["CUDA_VISIBLE_DEVICES"] = group
            # closed when the run ends (below): the file outlives this loop iteration
            out = None if len(groups) == 1 else open(log_dir / f"{run_id}.console", "w")  # noqa: SIM115
            running[run_id] = (subprocess.Popen(commands[run_id], env=env, stdout=out, stderr=out), slot,
                               time.perf_counter(), out, first)
        if not running:  # what is pending does not fit the lease, and nothing running could change that
            break
        time.sleep(0.2)
        for run_id, (proc, slot, t0, out, first) in list(running.items()):
            if proc.poll() is not None:
                seconds = time.perf_counter() - t0
                if out:
                    out.close()
                    if proc.returncode == 0:
                        Path(out.name).unlink()
                print(f"{run_id}: exit {proc.returncode} after {seconds:.0f} s"
                      + (f" on GPUs {groups[slot]}" if groups[slot] else ""), flush=True)
                if lease and proc.returncode == 0:
                    lease.finished(run_id, seconds, first)
                free.append(slot)
                status[run_id] = proc.returncode
                del running[run_id]
    return status


# Hyperparameters fields that say where a run's log is kept and under what name, not what the run computed
LOG_PLACE_FIELDS = ("log_dir", "run_id")


def whole_run(run) -> bool:
    """Whether a parsed log holds a whole run: its validation at the last step, and the closing peak-memory line."""
    return run.final_point is not None and run.peak_memory_mib is not None


def keep_or_set_aside(trainer_args: dict[str, list[str]], log_dir: Path, trainer) -> set[str]:
    """What a rerun of the same command keeps, so that repeating it finishes what an interrupted one left (a
    machine lent for minutes at a time, a crash): the run ids whose logs finished with the configuration this
    command gives them, which are not run again. An unfinished log (a run killed or crashed) is renamed
    <run_id>.txt.unfinished-N and its run starts over (the trainer never overwrites a log). A finished log of
    another configuration is refused (SystemExit): pick another --log_dir or variant name. A log's folder and run
    id are not its configuration: a finished log copied to another folder, or renamed, is kept there too."""
    kept = set()
    for run_id, args in trainer_args.items():
        path = log_dir / f"{run_id}.txt"
        if not path.exists():
            continue
        try:
            run = verify.parse_log(path)
        except verify.VerifyError:
            run = None
        if run is None or not whole_run(run):
            n = 1
            while path.with_name(f"{path.name}.unfinished-{n}").exists():
                n += 1
            path.rename(path.with_name(f"{path.name}.unfinished-{n}"))
            print(f"{run_id}: its log did not finish; kept as {path.name}.unfinished-{n}, the run starts over",
                  flush=True)
            continue
        logged = run.hyperparameters or {}
        expected = dataclasses.asdict(trainer.parse_args(args))
        # fp8_on_this_gpu may turn the FP8 flags off at run time, so the log need not hold the command's; a log
        # fetched from a lent machine may come back in another folder, or renamed to this command's run ids (its
        # seed is still checked)
        differ = sorted(k for k in expected if k not in (*trainer.FP8_FLAGS, *LOG_PLACE_FIELDS)
                        and logged.get(k) != expected[k])
        if differ:
            raise SystemExit(f"{path}: a finished run of another configuration (differs in {', '.join(differ)}); "
                             "pass another --log_dir, or rename the variant")
        print(f"{run_id}: finished before, with this configuration; kept, not run again", flush=True)
        kept.add(run_id)
    return kept


def variant_of(log: Path) -> str:
    """The variant of a log named NAME_SEED.txt or NAME_sSEED.txt (plan_runs' run ids, or hand-named runs), else
    the log's name."""
    name, _, seed = log.stem.rpartition("_")
    return name if name and seed.removeprefix("s").isdigit() else log.stem


def plot_variants(logs: list[Path], target: float, path: Path) -> bool:
    """Val loss against training time of every readable log, one color per variant (its seeds together), with
    the target: records/verify.py's drawing. False if matplotlib is missing."""
    groups = {}
    for log in logs:
        try:
            groups.setdefault(variant_of(log), []).append(verify.parse_log(log))
        except verify.VerifyError:
            continue  # reported with the table
    return verify.draw_val_curves(list(groups.items()), path, target, x="time")


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _calls(counts) -> str:
    return "-" if counts is None else "/".join(map(str, counts))


def format_table(rows: list[dict], target: float, peak: float | None) -> str:
    # Model FLOPs per token are per row: side-by-side variants can differ in size.
    head = (f"| run | GPUs | GPU (bus) | time to <= {target} (s) | final loss | train time (s) | ms/step | "
            "ms/step by stage | step IQR by stage (ms) | tokens/s | MFLOP/token | MFU | peak GiB | compile (s) | "
            "startup (s) | GC in the loop (ms) | allocator calls in the loop (malloc/free/retries/syncs) | "
            "FineWeb schedule, estimated (s) |")
    out = [f"bf16 matmul peak: {_fmt(peak, '.0f')} TFLOP/s per GPU", "", head, "|" + "---|" * 18]
    named = [(Path(r["log"]).stem, r) for r in rows] + [(m["log"], m) for m in median_rows(rows)]
    for name, r in named:  # a median's "log" is its label, which may hold dots (a variant's name)
        out.append(f"| {name} | {r['world_size']} | {r.get('gpu') or '-'} | "
                   f"{_fmt(r['time_to_target_s'], '.1f')} | {_fmt(r['final_loss'], '.4f')} | "
                   f"{_fmt(r['train_time_s'], '.1f')} | {_fmt(r['ms_per_step'], '.1f')} | {_stages(r.get('stage_ms'))} | "
                   f"{_stages(r.get('stage_iqr_ms'))} | "
                   f"{_fmt(r['tokens_per_s'], ',.0f')} | "
                   f"{_fmt(r['flops_per_token'] and r['flops_per_token'] / 1e6, '.1f')} | "
                   f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
                   f"{_fmt(r['peak_gib'], '.1f')} | {_fmt(r['compile_s'], '.0f')} | {_fmt(r['startup_s'], '.0f')} | "
                   f"{_fmt(r.get('gc_ms'), '.0f')} | {_calls(r.get('allocator_calls'))} | "
                   f"{_fmt(r.get('fineweb_estimate_s'), '.0f')} |")
    return "\n".join(out)


def _stages(values):
    """'252 / 487 / 723 / 732': the stages' and the extension's ms per step."""
    return "-" if not values else " / ".join(_fmt(v, ".0f") for v in values)


def median_rows(rows: list[dict]) -> list[dict]:
    """One median row over the runs of one variant; one per variant of two or more runs when the table holds
    several (a median across arms would describe neither)."""
    variants = {}
    for r in rows:
        variants.setdefault(variant_of(Path(r["log"])), []).append(r)
    if len(variants) == 1:
        return [_medians(rows, "median")] if len(rows) > 1 else []
    return [_medians(runs, f"median {name}") for name, runs in variants.items() if len(runs) > 1]


def _medians(rows, label):
    med = {"log": label, "world_size": rows[0]["world_size"],
           "gpu": ", ".join(sorted({r["gpu"] for r in rows if r.get("gpu")})) or None}
    for key in ("stage_ms", "stage_iqr_ms"):
        columns = [r[key] for r in rows if r.get(key)]
        if columns and len({len(c) for c in columns}) == 1:  # element-wise, over the runs that have each stage
            med[key] = [statistics.median(v) if (v := [c[i] for c in columns if c[i] is not None]) else None
                        for i in range(len(columns[0]))]
        else:
            med[key] = None
    for key in rows[0]:
        if key not in med:
            values = [r[key] for r in rows if isinstance(r[key], (int, float))]
            med[key] = statistics.median(values) if values else None
    return med


def main(argv=None):
    launched = time.perf_counter()  # a lease counts from here
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="folder with proxy_train_*.bin and proxy_val_*.bin")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--first_seed", type=int, default=0,
                   help="seeds first_seed.. (split one set of seeds over several calls; logs are NAME_SEED.txt)")
    p.add_argument("--trainer", default="train_gpt.py", choices=["train_gpt.py", "train_gpt_medium.py"],
                   help="which track's trainer to run")
    p.add_argument("--nproc", type=int, default=0, help="GPUs to use (default: all)")
    p.add_argument("--target", type=float, default=2.04, help="proxy val loss for time-to-target")
    p.add_argument("--log_dir", default="logs/proxy_speedrun")
    p.add_argument("--name", default="run")
    p.add_argument("--logs", nargs="+", help="summarize these logs instead of running")
    p.add_argument("--variant", action="append", metavar="NAME=FLAGS",
                   help="a configuration to compare (repeatable): run name and the trainer flags that differ, "
                        "after the common ones; variants and seeds run side by side, --nproc GPUs each")
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="also draw val loss against training time, one color per variant (needs matplotlib)")
    p.add_argument("--peak_tflops", type=float, help="matmul peak per GPU for MFU (default: measured here)")
    p.add_argument("--lease_s", type=float,
                   help="the machine is lent for this many seconds: start a run only if it is expected to end in "
                        "time (from this command's finished runs); the same command again runs what is left")
    args = p.parse_args(argv)
    if args.lease_s is not None and args.lease_s <= 0:
        p.error(f"--lease_s={args.lease_s:g}: the seconds the machine is lent for, more than 0")
    peak = args.peak_tflops or measure_peak_tflops()
    left = []  # runs the lease left for a later command
    if args.logs:
        logs = [Path(x) for x in args.logs]
    else:
        if not args.data:
            p.error("--data is required unless --logs is given")
        import torch
        gpus = torch.cuda.device_count()
        nproc = args.nproc or max(gpus, 1)
        jobs = plan_runs(args.variant or [f"{args.name}="], args.runs, args.first_seed)
        common = [f"--train_files={args.data}/proxy_train_*.bin", f"--val_files={args.data}/proxy_val_*.bin",
                  f"--target_val_loss={args.target}", f"--log_dir={args.log_dir}"]
        trainer_args = {run_id: [*common, f"--seed={seed}", f"--run_id={run_id}", *extra, *flags]
                        for run_id, seed, flags in jobs}
        trainer = importlib.import_module(Path(args.trainer).stem)  # ROOT is on sys.path
        kept = keep_or_set_aside(trainer_args, Path(args.log_dir), trainer)
        commands = {run_id: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", str(ROOT / args.trainer), *trainer_args[run_id]]
                    for run_id, _, _ in jobs if run_id not in kept}
        groups = gpu_groups(gpus, nproc)
        slot_of = seed_slots(jobs, len(groups))
        if slot_of is not None:
            commands = {run_id: commands[run_id] for run_id in staggered(jobs, slot_of, len(groups))
                        if run_id in commands}
        status = run_side_by_side(commands, groups, Path(args.log_dir), slot_of,
                                  Lease(args.lease_s - (time.perf_counter() - launched)) if args.lease_s else None)
        left = [run_id for run_id in commands if run_id not in status]
        if left:
            print(f"not started, expected to end after the lease (--lease_s={args.lease_s:g}): {', '.join(left)}; "
                  "the same command again runs them and keeps what finished", flush=True)
        logs = [Path(args.log_dir) / f"{run_id}.txt" for run_id, _, _ in jobs if run_id not in left]
    rows, unusable = [], []
    for path in logs:
        try:
            rows.append(summarize_log(path, args.target, peak))
        except (ValueError, verify.VerifyError) as e:  # a run that crashed early: report it, keep the others' table
            unusable.append(path)
            print(f"{path}: no usable log ({e})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_tflops": peak, "runs": rows, "medians": median_rows(rows)},
                                              indent=1))
    if rows:
        print(format_table(rows, args.target, peak))
    if args.plot:
        if plot_variants(logs, args.target, args.plot):
            print(f"wrote {args.plot}")
        else:
            print(f"--plot: matplotlib is not installed (pip install matplotlib); {args.plot} not written")
            return 1
    finished = all(r["final_loss"] is not None and math.isfinite(r["final_loss"]) for r in rows)
    return 0 if rows and finished and not unusable and not left else 1


if __name__ == "__main__":
    sys.exit(main())
