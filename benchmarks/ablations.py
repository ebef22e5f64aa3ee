"""Ablations of the staged recipe's components at equal training time (issue 17): each component turned off
alone, run beside the default on the proxy corpus, then again with the step count that gives it the default's
training time, since a component that costs time must win at equal time. Components the default lacks
(ADDITIONS) run the same way, turned on alone.

    python benchmarks/ablations.py list                                   # components and the flags that turn them off (on)
    # 1. equal steps: the default and each ablation, one GPU per run, side by side (proxy_speedrun.py runs them)
    python benchmarks/ablations.py run --data DIR --runs 2 [--only no_smear,no_xsa] -- \\
        --num_iterations=190 --cycle_train_data=true --val_loss_every=0
    # 2. equal time: from round 1's logs, each ablation's step count for the time the default takes at --at steps
    #    (default: round 1's); with --data it runs them, and the default at --at steps beside them
    python benchmarks/ablations.py equal_time --logs logs/proxy_speedrun/*.txt [--at 250] [--data DIR --runs 2 -- ...]
    # 3. README's table: each ablation's loss against the default's, at equal steps and at each equal-time budget
    python benchmarks/ablations.py table --logs logs/proxy_speedrun/*.txt

Run ids follow proxy_speedrun.py: default_SEED and NAME_SEED in round 1 (equal steps); default_eqN_SEED and
NAME_eqN_SEED in round 2, N the default's step count of the budget (round 2 runs the default again, so that its
comparisons stay within one call, and one host). One round 1 serves every budget: an ablation's step count comes
from its own step times by stage (proxy_speedrun.schedule_estimate_s at each candidate count, scaled by the run's
measured over estimated time), the budget's time from the default's, predicted the same way. Run round 1 at a
budget's steps with a seed per GPU (proxy_speedrun.py puts seed k of every arm on the same GPU): short runs
mispredict by a few percent, as much as a component changes a step (README). An ablation planned at round 1's
own count for that budget is at equal time already, and round 2 leaves it out.
"""
import argparse
import dataclasses
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import proxy_speedrun  # noqa: E402 (after the path insert: benchmarks/ is a folder of scripts)
import train_gpt  # noqa: E402

DEFAULT = "default"
EQUAL_TIME = re.compile(r"(?P<name>.+)_eq(?P<at>\d+)")  # round 2's variants: NAME_eqN, N the budget's default steps
# name: (the component, as README's "Model" names it; the flags that turn it off, leaving everything else as is).
# MUDD reads the value embeddings, the skip's source and the cached layer, so turning one of those off turns it off too.
ABLATIONS = {
    "no_bigram": ("bigram hash embedding", ("--bigram_buckets=0",)),
    "no_smear": ("smear", ("--smear=false",)),
    "no_value_embed": ("value embeddings (and MUDD, which reads them)", ("--value_embed_layers=", "--mudd=false")),
    "no_xsa": ("XSA", ("--xsa_layers=",)),
    "no_attn_gate": ("attention output gates", ("--attn_gate_layers=",)),
    "no_key_offset": ("partial key offset", ("--key_offset_layers=",)),
    "no_paired_heads": ("paired-head attention", ("--paired_head_layers=",)),
    "no_skip": ("skip connection (and MUDD, which reads it)", ("--skip_connection=", "--mudd=false")),
    "no_cache_layer": ("cached attention input and backout (and MUDD, which reads it)",
                       ("--cache_layer=-1", "--mudd=false")),
    "no_mtp": ("multi-token prediction (next token only)", ("--mtp_weights=1;1;1",)),
    "no_gates_mudd_dc": ("per-token gates, MUDD and DC (the public's)",
                         ("--gate_split_layer=0", "--mudd=false", "--dc_layers=")),
}
# Components the default lacks (dropped after a measurement, or never adopted), each with the flags that turn it on
# alone: the same rounds run them, so a longer budget than the one that decided (the FineWeb schedule is 6.7 times
# the proxy's 190 steps) can show whether one pays there. None at present.
ADDITIONS: dict[str, tuple[str, tuple[str, ...]]] = {}
ARMS = {**ABLATIONS, **ADDITIONS}
# Additions of components a later default adopted, kept for `table` alone, so that the results folders that ran
# them still rebuild their tables (against today's default they would change nothing, so nothing runs them).
PAST_ADDITIONS = {
    "with_paired_heads": ("paired-head attention (the public's layers)", ("--paired_head_layers=0,2,5,9",)),
    "with_gates_mudd_dc": ("per-token gates, MUDD and DC (turned on)",
                           ("--gate_split_layer=4", "--mudd=true", "--dc_layers=10")),
}
KNOWN_ARMS = {**ARMS, **PAST_ADDITIONS}


def chosen(only: str | None, known: dict = ARMS) -> list[str]:
    """The arms (ablations and additions) named in `only` (comma-separated), or all of ARMS; `known`: the names
    accepted (`table` also takes PAST_ADDITIONS)."""
    if not only:
        return list(ARMS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--only: unknown arm(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def variant_args(names: list[str], extra_flags: dict[str, list[str]] | None = None, suffix: str = "",
                 with_default: bool = True) -> list[str]:
    """proxy_speedrun.py's --variant arguments: the default (no flag but any extra ones of its own) and each named
    ablation, its flags and any extra flags of its own (round 2's --num_iterations), run ids NAME + suffix (the
    default's too; left out for the later calls of a round split over several)."""
    extra_flags = extra_flags or {}
    out = ["--variant", f"{DEFAULT}{suffix}={' '.join(extra_flags.get(DEFAULT, []))}"] if with_default else []
    for name in names:
        flags = [*ARMS[name][1], *extra_flags.get(name, [])]
        if any(" " in f for f in flags):
            raise ValueError(f"{name}: a flag with a space cannot pass through --variant: {flags}")
        out += ["--variant", f"{name}{suffix}={' '.join(flags)}"]
    return out


def time_model(hp: train_gpt.Hyperparameters, by_stage_ms: list[float], measured_s: float):
    """Training seconds of recipe `hp` as a function of its step count, from a run at hp.num_iterations (median ms
    per step of each stage and the extension, and its training seconds): the schedule estimate, scaled by
    measured / estimated at hp.num_iterations (the first steps and the jitter that medians leave out; exact
    there)."""
    estimate = proxy_speedrun.schedule_estimate_s
    scale = measured_s / estimate(hp, by_stage_ms, hp.num_iterations)
    return lambda num_iterations: scale * estimate(hp, by_stage_ms, num_iterations)


def equal_time_iterations(hp: train_gpt.Hyperparameters, by_stage_ms: list[float], measured_s: float,
                          target_s: float) -> int:
    """Scheduled steps at which recipe `hp`, measured as time_model takes it, is predicted to train for
    `target_s`: the count whose prediction is nearest, the shorter one on a tie."""
    seconds = time_model(hp, by_stage_ms, measured_s)
    first = max(len(train_gpt.derive(hp, 1).recipe.stages), hp.num_iterations // 4)
    last = 4 * hp.num_iterations * max(1, round(target_s / measured_s))
    return min(range(first, last + 1), key=lambda n: (abs(seconds(n) - target_s), n))


@dataclasses.dataclass
class Arm:
    """The finished runs of one variant: their hyperparameters (of the first; an arm is one recipe), final
    losses, training seconds, median ms per step by stage, and the GPU of each run (its UUID, None in logs older
    than the UUID)."""
    hp: train_gpt.Hyperparameters
    losses: list[float]
    times: list[float]
    stage_ms: list[float]
    gpus: list[str | None] = dataclasses.field(default_factory=list)


def on_other_gpus(arm: Arm, against: Arm) -> bool:
    """Whether `arm`'s runs ran on other GPUs than `against`'s, as their logs' UUIDs say: their times then compare
    GPUs as well as recipes (two H200s, of one host or of two, can differ by 1-3% per step, as much as most
    components change one). False where a log names no UUID: not known."""
    if not arm.gpus or not against.gpus or None in arm.gpus or None in against.gpus:
        return False
    return set(arm.gpus) != set(against.gpus)


def split_variant(variant: str) -> tuple[str | None, int | None]:
    """(the ablation a variant runs, None for the default; the budget's default step count of a round-2 variant,
    None in round 1); SystemExit for a name this script did not plan."""
    match = EQUAL_TIME.fullmatch(variant)
    name, at = (match["name"], int(match["at"])) if match else (variant, None)
    if name == DEFAULT:
        return None, at
    if name not in KNOWN_ARMS:
        raise SystemExit(f"a log of variant {variant!r}: not an arm of this script ({', '.join(KNOWN_ARMS)}) "
                         f"nor {DEFAULT}; pass only the logs of its runs")
    return name, at


def arm_fields(name: str) -> set[str]:
    """The Hyperparameters fields an arm's flags set."""
    return {flag[2:].partition("=")[0] for flag in KNOWN_ARMS[name][1]}


def turned(name: str) -> str:
    """How an arm turns its component: "off" (an ablation) or "on" (an addition)."""
    return "on" if name in ADDITIONS or name in PAST_ADDITIONS else "off"


def _changed_fields(hp: train_gpt.Hyperparameters, base: train_gpt.Hyperparameters) -> set[str]:
    a, b = dataclasses.asdict(hp), dataclasses.asdict(base)
    return {k for k in a if a[k] != b[k]} - {"seed", *proxy_speedrun.LOG_PLACE_FIELDS}


def flag_values(name: str) -> dict:
    """The Hyperparameters values an arm's flags set."""
    parsed = train_gpt.parse_args(list(KNOWN_ARMS[name][1]))
    return {field: getattr(parsed, field) for field in arm_fields(name)}


def check_recipes(arms: dict[str, "Arm"]) -> None:
    """Each arm's recipe is round 1's default with its arm's flags applied, and nothing else but --num_iterations in
    round 2 (for default_eqN: N): a log filed under the wrong name would otherwise enter the table as that arm. A
    flag that sets what that default already had changes nothing (no_skip's --mudd=false beside a default without
    MUDD), so older results folders still read."""
    base = arms[DEFAULT].hp
    for variant, arm in arms.items():
        name, at = split_variant(variant)
        expected = dataclasses.replace(base, **flag_values(name)) if name else base
        allowed = {"num_iterations"} if at is not None else set()
        if _changed_fields(arm.hp, expected) - allowed:
            raise SystemExit(f"{variant}: its runs differ from {DEFAULT}'s in "
                             f"{sorted(_changed_fields(arm.hp, base)) or 'nothing'}; {variant} should differ in "
                             f"{sorted(_changed_fields(expected, base)) or 'nothing'}"
                             + (" (and --num_iterations)" if at is not None else ""))
        if name is None and at is not None and arm.hp.num_iterations != at:
            raise SystemExit(f"{variant}: its runs have --num_iterations={arm.hp.num_iterations}, not {at}")


def read_arms(logs: list[Path]) -> dict[str, Arm]:
    """Each variant's finished runs (proxy_speedrun.variant_of names them), checked to be one recipe per variant
    and the recipe its name says (check_recipes); a log that did not finish or cannot be read is left out with a
    line that says so."""
    arms = {}
    for path in logs:
        try:
            run = proxy_speedrun.verify.parse_log(path)
            row = proxy_speedrun.summarize_run(run, path, target=0.0, peak_tflops=None)
        except (ValueError, proxy_speedrun.verify.VerifyError) as e:  # a run that crashed early
            print(f"{path}: no usable log ({e}); left out", flush=True)
            continue
        hp = proxy_speedrun.recipe_of(run)
        if hp is None:
            print(f"{path}: a recipe this trainer no longer takes; left out", flush=True)
            continue
        by_stage = row["stage_ms"]
        if by_stage and not hp.extension_steps:
            by_stage = [*by_stage[:-1], 0.0]  # no extension step: nothing to time there
        if row["final_loss"] is None or not by_stage or None in by_stage:
            print(f"{path}: not finished; left out", flush=True)
            continue
        name = proxy_speedrun.variant_of(path)
        split_variant(name)
        arm = arms.setdefault(name, Arm(hp, [], [], []))
        if _changed_fields(hp, arm.hp):
            raise SystemExit(f"{path}: its recipe differs from the other {name} runs' in "
                             f"{sorted(_changed_fields(hp, arm.hp))}; one recipe per variant")
        arm.losses.append(row["final_loss"])
        arm.times.append(row["train_time_s"])
        arm.stage_ms.append(by_stage)
        arm.gpus.append(proxy_speedrun.gpu_uuid(run.gpu))
    for arm in arms.values():
        arm.stage_ms = [statistics.median(column) for column in zip(*arm.stage_ms, strict=True)]
    if DEFAULT not in arms:
        raise SystemExit(f"round 1's default logs ({DEFAULT}_SEED.txt, finished) are needed among --logs")
    check_recipes(arms)
    return arms


def last_stage_ms(arm: Arm) -> float:
    """Median ms per step of the recipe's last stage (the extension follows it in Arm.stage_ms)."""
    return arm.stage_ms[len(train_gpt.derive(arm.hp, 1).recipe.stages) - 1]


def longest(candidates: list[Arm | None]) -> Arm | None:
    """The arm of the most scheduled steps among those that ran: its stage medians rest on the most steps."""
    ran = [arm for arm in candidates if arm is not None]
    return max(ran, key=lambda arm: arm.hp.num_iterations) if ran else None


def equal_time_plan(arms: dict[str, Arm], names: list[str], at: int | None = None,
                    quiet: bool = False) -> tuple[float, dict[str, int]]:
    """(the default's training seconds at `at` steps, measured where round 1 ran that many, else predicted; each
    named ablation's step count for that time, from its round-1 runs at the default's steps)."""
    base = arms[DEFAULT]
    at = at or base.hp.num_iterations
    target_s = time_model(base.hp, base.stage_ms, statistics.median(base.times))(at)
    plan = {}
    for name in names:
        arm = arms.get(name)
        if arm is None or arm.hp.num_iterations != base.hp.num_iterations:
            if not quiet:
                print(f"{name}: no finished run at the default's {base.hp.num_iterations} steps; skipped",
                      flush=True)
            continue
        plan[name] = equal_time_iterations(arm.hp, arm.stage_ms, statistics.median(arm.times), target_s)
    return target_s, plan


def at_equal_time_in_round_1(plan: dict[str, int], arms: dict[str, Arm], at: int) -> set[str]:
    """The planned ablations whose round-1 runs are already at equal time for the budget of `at` steps: the budget
    is round 1's step count and the plan gives the ablation that count too (a component that costs no time), so
    round 2 would run round 1 again."""
    if at != arms[DEFAULT].hp.num_iterations:
        return set()
    return {name for name, steps in plan.items() if steps == arms[name].hp.num_iterations}


def _mean(values):
    return statistics.fmean(values) if values else None


def _welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch p of the losses (scipy), None below 2 runs per arm."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _describe(label: str, arm: Arm) -> str:
    return (f"{label}: {len(arm.losses)} runs, {arm.hp.num_iterations} + {arm.hp.extension_steps} steps, mean loss "
            f"{_mean(arm.losses):.4f} after {_mean(arm.times):.1f} s, last stage {last_stage_ms(arm):.0f} ms per step.")


def _cell(arm: Arm | None, against: Arm | None, with_steps: bool) -> str:
    if arm is None or against is None:
        return "not run" if arm is None else "no default at this budget"
    p = _welch_p(arm.losses, against.losses)
    return ((f"{arm.hp.num_iterations}, " if with_steps else "")
            + f"{len(arm.losses)}, {_mean(arm.losses) - _mean(against.losses):+.4f}"
            + (f" (p = {p:.2g})" if p is not None else "") + f", {_mean(arm.times):.1f} s"
            + (" (other GPUs)" if on_other_gpus(arm, against) else ""))


def table(arms: dict[str, Arm], names: list[str]) -> str:
    """README's table: per named ablation, the mean final loss against the default's (Welch p) and the mean
    training time, at equal steps and at each equal-time budget that ran (against that round's default, or
    round 1's where the budget is round 1's step count and round 2 did not rerun it); at round 1's step count,
    an ablation planned at that count too (at_equal_time_in_round_1) shows round 1's runs, marked so; the last
    stage's ms per step (of the arm with the most steps); the flags."""
    base = arms[DEFAULT]
    first = base.hp.num_iterations
    in_round_1 = at_equal_time_in_round_1(equal_time_plan(arms, [n for n in names if n in arms], quiet=True)[1],
                                          arms, first)
    budgets = sorted({at for variant in arms if (at := split_variant(variant)[1]) is not None}
                     | ({first} if in_round_1 else set()))
    defaults = {at: arms.get(f"{DEFAULT}_eq{at}", base if at == first else None) for at in budgets}
    lines = [_describe("Default, round 1", base)]
    lines += [_describe(f"Default, run again for the {at}-step budget", arm) for at, arm in defaults.items()
              if arm is not None and arm is not base]
    lines += ["Delta: the arm's loss minus the default's. A component turned off (\"off\"): positive where the loss "
              "rises without it (at equal time: the component pays for its time). One the default lacks, turned on "
              "(\"on\"): negative where it pays. \"round 1\": the equal-step runs, whose step count is already the "
              "equal-time one. \"(other GPUs)\": the arm's runs ran on other GPUs than the default's (their logs' "
              "UUIDs), so its time compares GPUs too.",
              "",
              "| component | turned | flags | equal steps: runs, loss delta (Welch p), time | "
              + "".join(f"equal time, the default's {at} steps: steps, runs, loss delta (Welch p), time | "
                        for at in budgets) + "last stage ms/step |",
              "|---|---|---|---|" + "---|" * len(budgets) + "---|"]
    for name in names:
        component, flags = KNOWN_ARMS[name]
        cells = [_cell(arms.get(name), base, False)]
        for at in budgets:
            if f"{name}_eq{at}" not in arms and at == first and name in in_round_1:
                cells.append(_cell(arms[name], base, True) + " (round 1)")
            else:
                cells.append(_cell(arms.get(f"{name}_eq{at}"), defaults[at], True))
        measured = longest([arms.get(name), *(arms.get(f"{name}_eq{at}") for at in budgets)])
        ms = f"{last_stage_ms(measured):.0f}" if measured else "-"
        lines.append(f"| {component} | {turned(name)} | `{' '.join(flags)}` | {' | '.join(cells)} | {ms} |")
    return "\n".join(lines)


def _run(args, extra: list[str], variants: list[str]) -> int:
    argv = ["--data", args.data, "--runs", str(args.runs), "--first_seed", str(args.first_seed), "--nproc", "1",
            "--target", str(args.target), "--log_dir", args.log_dir, *variants]
    if args.peak_tflops:
        argv += ["--peak_tflops", str(args.peak_tflops)]
    if args.lease_s:
        argv += ["--lease_s", str(args.lease_s)]
    return proxy_speedrun.main([*argv, "--", *extra])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["list", "run", "equal_time", "table"])
    p.add_argument("--only", help="comma-separated arm names, ablations and additions (default: all)")
    p.add_argument("--logs", nargs="+", type=Path, help="round 1's logs (equal_time), every round's (table)")
    p.add_argument("--data", help="run: folder with the proxy corpus; equal_time: run the plan too")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--first_seed", type=int, default=0)
    p.add_argument("--target", type=float, default=1.98, help="proxy val loss for proxy_speedrun's time-to-target")
    p.add_argument("--log_dir", default="logs/proxy_speedrun")
    p.add_argument("--peak_tflops", type=float, help="passed to proxy_speedrun.py (default: measured)")
    p.add_argument("--at", type=int, help="equal_time: the budget, as the default's step count (default: round 1's)")
    p.add_argument("--lease_s", type=float,
                   help="run, equal_time: passed to proxy_speedrun.py (start only runs expected to end within it)")
    p.add_argument("--without_default", action="store_true",
                   help="run: leave the default out (a round split over calls runs it in one of them)")
    args = p.parse_args(argv)
    names = chosen(args.only, KNOWN_ARMS if args.command == "table" else ARMS)
    if args.command == "list":
        for name in names:
            component, flags = ARMS[name]
            print(f"{name:18} {turned(name):3} {component:44} {' '.join(flags)}")
        return 0
    if args.command == "run":
        if not args.data:
            p.error("run needs --data")
        return _run(args, extra, variant_args(names, with_default=not args.without_default))
    if not args.logs:
        p.error(f"{args.command} needs --logs")
    arms = read_arms(args.logs)
    if args.command == "table":
        if not args.only:  # every arm, and each past addition whose logs were given
            names += [n for n in PAST_ADDITIONS if any(split_variant(v)[0] == n for v in arms)]
        print(table(arms, names))
        return 0
    at = args.at or arms[DEFAULT].hp.num_iterations
    target_s, plan = equal_time_plan(arms, names, at)
    print(f"budget: the default's {at} steps, {target_s:.1f} s of training"
          + (" (predicted from round 1)" if at != arms[DEFAULT].hp.num_iterations else ""))
    for name, steps in plan.items():
        print(f"{name}: --num_iterations={steps} (measured at {arms[name].hp.num_iterations}: "
              f"{statistics.median(arms[name].times):.1f} s)"
              + (f"; its round-1 runs ran on other GPUs than {DEFAULT}'s, so this count corrects for the GPUs' "
                 f"speed as well as the component's: for a plan within one host, run round 1's {DEFAULT} again "
                 f"beside it" if on_other_gpus(arms[name], arms[DEFAULT]) else ""))
    if not plan:
        print("no ablation to run at equal time (round 1's logs name none that finished at the default's steps)")
        return 1
    done = at_equal_time_in_round_1(plan, arms, at)
    for name in sorted(done):
        print(f"{name}: round 1's runs are at equal time already; not run again")
    plan = {name: steps for name, steps in plan.items() if name not in done}
    if not args.data or not plan:
        return 0
    extra_flags = {name: [f"--num_iterations={steps}"] for name, steps in {DEFAULT: at, **plan}.items()}
    return _run(args, extra, variant_args(list(plan), extra_flags, f"_eq{at}", not args.without_default))


if __name__ == "__main__":
    sys.exit(main())
