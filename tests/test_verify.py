"""Tests of records/verify.py: statistics against scipy, log parsing, the CLI contract.

records/ holds record folders, not a package, so the tool is loaded from its path.
"""
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, load_script
from scipy import stats


def load_verify():
    return load_script("records/verify.py", "records_verify")  # one module object for both test files


verify = load_verify()
RULE = "=" * 100

# --------------------------------------------------------------------------------------------------
# Log writers

# A stand-in for the trainer source at the top of our logs: it holds the format strings, and its
# docstring even holds a complete, valid-looking final line, which must not be read as a result.
FAKE_SOURCE = '''"""Fake trainer. A finished run ends with a line such as
step:1750/1750 val_loss:3.2789 train_time:179000ms step_avg:102.29ms
"""
import json

def log_step(step, args, training_time_ms):
    print0(f"step:{step}/{args.num_iterations} train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms/max(step, 1):.2f}ms")

def log_val(step, args, val_loss, training_time_ms):
    print0(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms/max(step, 1):.2f}ms")

print0(f"hyperparameters: {json.dumps(hyperparameters)}")
print0("=" * 100)
'''

VERSIONS = """Running Python 3.12.7 (main, Oct  1 2025, 08:52:12) [GCC 11.4.0]
Running PyTorch 2.9.0+cu128 compiled for CUDA 12.8
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.124.06             Driver Version: 570.124.06     CUDA Version: 12.8     |
+-----------------------------------------------------------------------------------------+"""
H100 = "NVIDIA H100 80GB HBM3"


def environment(gpus=()):
    """Versions and nvidia-smi as they stand between the rules: one GPU-table row pair per GPU, then the
    process table, whose rows also start with a GPU index and must not count as GPUs."""
    rows = []
    for i, name in enumerate(gpus):
        rows += [f"|   {i}  {name:<30}  On  |   00000000:{i + 6:02X}:00.0 Off |                    0 |",
                 "| N/A   43C    P0            105W /  700W |    1183MiB /  81559MiB |      6%      Default |"]
    if gpus:
        rows += ["| Processes:                                                                              |",
                 "|    0   N/A  N/A            1535      C   /opt/torch/.venv/bin/python            1174MiB |"]
    return "\n".join([VERSIONS, *rows])


def step_lines(final_loss, n_steps=1750, time_ms=175_000.0, decimals=4, val_every=500, stop_at=None,
               nan_from=None, step_every=250):
    """The training-output grammar: step lines, val lines every `val_every` steps and at the end."""
    stop = n_steps if stop_at is None else stop_at
    lines = []
    for k in range(stop + 1):
        t = time_ms * k / n_steps
        if k % val_every == 0 or k == n_steps:
            frac = k / n_steps
            loss = final_loss if k == n_steps else 10.8258 * (1 - frac) + (final_loss + 0.3) * frac
            if nan_from is not None and k >= nan_from:
                loss = math.nan
            lines.append(f"step:{k}/{n_steps} val_loss:{loss:.{decimals}f} train_time:{t:.0f}ms "
                         f"step_avg:{t / max(k, 1):.2f}ms")
        if k > 0 and k % step_every == 0:  # real logs print every step; every 250th keeps the files small
            lines.append(f"step:{k}/{n_steps} train_time:{t:.0f}ms step_avg:{t / k:.2f}ms")
    return lines


def public_log(final_loss, seed=None, header=False, source=FAKE_SOURCE, gpus=(), **kw):
    """A modded-nanogpt style log without the hyperparameters line (so without a seed), with or without
    the header of source, rule, versions and nvidia-smi, rule."""
    lines = [source.rstrip("\n"), RULE, environment(gpus), RULE] if header else []
    lines += step_lines(final_loss, **kw)
    if kw.get("stop_at") is None:
        lines.append("peak memory allocated: 31420 MiB reserved: 32550 MiB")
    return "\n".join(lines) + "\n"


def our_log(final_loss, seed=0, track="small", target=3.28, decimals=4, error=None, source=FAKE_SOURCE, gpus=(),
            world_size=1, hp=None, **kw):
    """A log in our trainers' format: source, rule, versions and nvidia-smi, rule, hyperparameters, the
    world_size and start-up lines, steps. `hp` overrides logged hyperparameters."""
    logged = {"track": track, "target_val_loss": target, "num_iterations": kw.get("n_steps", 1750), "seed": seed,
              "train_files": "data/fineweb10B/fineweb_train_*.bin", "val_files": "data/fineweb10B/fineweb_val_*.bin",
              "val_tokens": 10485760, "muon_lr": 0.05, "log_dir": "logs", "run_id": f"seed{seed}", **(hp or {})}
    lines = [source.rstrip("\n"), RULE, environment(gpus), RULE, f"hyperparameters: {json.dumps(logged)}"]
    if world_size is not None:
        lines += [(f"world_size:{world_size} grad_accum:{max(8 // world_size, 1)} tokens_per_step:393216 "
                   f"device:{'cuda' if gpus else 'cpu'} compile:{bool(gpus)}"),
                  "warmup_and_compile_time:31.8s first_train_step:20.1s first_val_forward:5.2s startup_time:42.9s"]
    lines += step_lines(final_loss, decimals=decimals, **kw)
    if error:
        lines.append(error)
    elif kw.get("stop_at") is None:
        lines.append("peak memory allocated: 31420 MiB reserved: 32550 MiB")
    return "\n".join(lines) + "\n"


def write_logs(folder, losses, make=public_log, first=0, **kw):
    """One log per loss, run_00.txt, run_01.txt, ... with distinct times and seeds (so no two are one run)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, loss in enumerate(losses, start=first):
        (folder / f"run_{i:02d}.txt").write_text(make(loss, time_ms=175_000.0 + 137.0 * i, seed=i, **kw))
    return folder


def run_cli(capsys, *argv):
    """main() in-process: (exit status, stdout, stderr)."""
    code = verify.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


PASSING = [3.2751, 3.2762, 3.2770, 3.2744, 3.2781, 3.2758, 3.2766, 3.2749]  # mean 3.27601, p ~ 1e-6
FAILING = [3.2791, 3.2812, 3.2770, 3.2805, 3.2788]  # mean 3.27932 < 3.28, p ~ 0.27


# --------------------------------------------------------------------------------------------------
# Statistics against scipy

@pytest.mark.parametrize("losses", [PASSING, FAILING, [3.2701, 3.2702], [3.279, 3.2812],
                                    list(np.round(np.random.default_rng(0).normal(3.2765, 0.0025, 80), 4))],
                         ids=["pass_n8", "fail_n5", "pass_n2", "fail_n2", "pass_n80"])
def test_one_sample_test_reproduces_scipy_one_sided_ttest(losses):
    """t, p, the one-sided bound and the 95% CI are scipy's, and pass == (p < 0.01)."""
    got = verify.one_sample_test(losses, 3.28, alpha=0.01)
    ref = stats.ttest_1samp(losses, 3.28, alternative="less")
    assert got.n == len(losses)
    assert got.t == pytest.approx(ref.statistic, rel=1e-12)
    assert got.p == pytest.approx(ref.pvalue, rel=1e-12)
    assert got.mean == pytest.approx(np.mean(losses), rel=1e-15)
    assert got.std == pytest.approx(np.std(losses, ddof=1), rel=1e-12)
    n, s = len(losses), np.std(losses, ddof=1)
    upper = np.mean(losses) + stats.t.ppf(0.99, n - 1) * s / math.sqrt(n)
    half95 = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    assert got.upper_bound == pytest.approx(upper, rel=1e-12)
    assert got.ci95 == pytest.approx((np.mean(losses) - half95, np.mean(losses) + half95), rel=1e-12)
    assert got.passed(0.01) == (ref.pvalue < 0.01)
    assert got.passed(0.01) == (got.upper_bound < 3.28)  # the bound and the test are the same statement


def test_known_cases_pass_and_fail_as_expected():
    """Negative control for the parametrized test: the fixtures really cover both outcomes."""
    assert verify.one_sample_test(PASSING, 3.28).passed(0.01)
    assert verify.one_sample_test([3.2701, 3.2702], 3.28).passed(0.01)  # n = 2: t = -196, p = 0.0016
    assert not verify.one_sample_test(FAILING, 3.28).passed(0.01)
    assert not verify.one_sample_test([3.279, 3.2812], 3.28).passed(0.01)


def test_zero_variance_is_a_failure_not_p_zero():
    """Equal losses below the target: scipy says t=-inf, p=0; the tool says undefined and fails."""
    losses = [3.2700] * 4
    with pytest.warns(RuntimeWarning):  # scipy's own 'catastrophic cancellation' warning
        ref = stats.ttest_1samp(losses, 3.28, alternative="less")
    assert not ref.pvalue > 0.01  # scipy alone would let this pass (p = 0 or nan, never a real p)
    got = verify.one_sample_test(losses, 3.28)
    assert got.zero_variance and not got.passed(0.01) and math.isnan(got.p)
    a = verify.analyze([verify.parse_log_text(public_log(x, time_ms=1e5 + i), Path(f"r{i}.txt"))
                        for i, x in enumerate(losses)], 3.28)
    assert a.exit_status == 1
    assert "sample std is 0" in a.messages()[0] and "undefined" in a.messages()[0]


@pytest.mark.parametrize("mean,std", [(3.2790, 0.0025), (3.2770, 0.004), (3.2600, 0.02)])
def test_runs_needed_is_the_smallest_n_with_p_below_alpha(mean, std):
    """A sample of exactly that mean and std reaches p < alpha at n and not at n - 1 (scipy)."""
    n = verify.runs_needed(mean, std, 3.28, alpha=0.01)

    def p_for(k):
        z = np.random.default_rng(k).normal(size=k)
        sample = mean + std * (z - z.mean()) / z.std(ddof=1)
        return stats.ttest_1samp(sample, 3.28, alternative="less").pvalue

    assert n >= 2
    assert p_for(n) < 0.01
    if n > 2:
        assert p_for(n - 1) >= 0.01


def test_runs_needed_says_none_when_the_mean_is_not_below_target(tmp_path, capsys):
    assert verify.runs_needed(3.2801, 0.002, 3.28) is None
    assert verify.runs_needed(3.28, 0.002, 3.28) is None
    code, out, _ = run_cli(capsys, write_logs(tmp_path, [3.2812, 3.2790, 3.2830]), "--target", 3.28)
    assert code == 1 and "no number of runs" in out


def test_welch_comparison_reproduces_scipy():
    """Welch p-values (time one-sided 'less', loss two-sided), the difference and its 95% CI and df."""
    rng = np.random.default_rng(1)
    new_t, base_t = rng.normal(170, 1.0, 7), rng.normal(172, 2.0, 5)
    new_l, base_l = rng.normal(3.276, 0.002, 7), rng.normal(3.277, 0.003, 5)

    def runs(times, losses, prefix):
        return [verify.parse_log_text(public_log(float(l), time_ms=float(t) * 1000), Path(f"{prefix}{i}.txt"))
                for i, (t, l) in enumerate(zip(times, losses))]

    new, base = runs(new_t, new_l, "n"), runs(base_t, base_l, "b")
    # the logs round times to ms and losses to 4 decimals; compare against what was logged
    nt, bt = [r.time_s for r in new], [r.time_s for r in base]
    nl, bl = [r.final_loss for r in new], [r.final_loss for r in base]
    b = verify.analyze(new, 3.28, baseline_runs=base).baseline
    ref_time = stats.ttest_ind(nt, bt, equal_var=False, alternative="less")
    ref_loss = stats.ttest_ind(nl, bl, equal_var=False)
    ref_two = stats.ttest_ind(nt, bt, equal_var=False)
    assert b.n == 5
    assert b.welch_time_p == pytest.approx(ref_time.pvalue, rel=1e-12)
    assert b.welch_loss_p == pytest.approx(ref_loss.pvalue, rel=1e-12)
    assert b.time_diff_s == pytest.approx(np.mean(nt) - np.mean(bt), rel=1e-12)
    assert b.time_diff_df == pytest.approx(ref_two.df, rel=1e-12)
    ci = ref_two.confidence_interval(0.95)
    assert b.time_diff_ci95 == pytest.approx((ci.low, ci.high), rel=1e-10)


# --------------------------------------------------------------------------------------------------
# Parsing

@pytest.mark.parametrize("decimals", [4, 6])
def test_parses_public_logs_with_4_and_6_decimals(decimals):
    run = verify.parse_log_text(public_log(2.919876, decimals=decimals, time_ms=1_234_567.0))
    assert run.finished and run.num_iterations == 1750
    assert run.final_loss == float(f"{2.919876:.{decimals}f}")
    assert run.time_s == pytest.approx(1234.567)
    assert [k for k, _ in run.val_curve] == [0, 500, 1000, 1500, 1750]
    assert run.hyperparameters is None and run.peak_memory_mib == (31420, 32550)


def test_parses_the_exact_public_final_line():
    run = verify.parse_log_text("step:1750/1750 val_loss:3.2789 train_time:179000ms step_avg:102.29ms\n")
    assert run.finished and run.final_loss == 3.2789 and run.time_s == 179.0


def test_our_format_reads_only_lines_after_the_second_rule():
    """The source header holds the format strings and a complete example final line; none of it counts."""
    text = our_log(3.2755, seed=7, decimals=6)
    assert "step:1750/1750 val_loss:3.2789" in text.split(RULE)[0]  # the trap is really there
    run = verify.parse_log_text(text)
    assert run.final_loss == 3.2755
    assert run.hyperparameters["seed"] == 7 and run.logged_track == "small" and run.logged_target == 3.28
    assert run.val_curve[0][0] == 0 and len(run.val_curve) == 5


def test_truncated_log_with_example_line_in_header_is_not_finished():
    """Negative control for the rule handling: without it, the header's example line would finish the run."""
    text = our_log(3.2755, stop_at=1250)
    run = verify.parse_log_text(text)
    assert not run.finished
    assert run.skip_reason == "did not finish: last logged step 1250/1750"
    misread = verify.parse_log_text(text.replace(RULE, "-" * 100))  # rules gone: whole text read
    assert misread.finished and misread.final_loss == 3.2789


def test_log_without_rules_ignores_fstring_source_lines():
    """Public logs sometimes differ; the anchored regexes alone keep source lines out."""
    text = FAKE_SOURCE.split('"""', 2)[2] + public_log(3.2766, stop_at=900)
    run = verify.parse_log_text(text)
    assert not run.finished and run.last_step == 750 and run.num_iterations == 1750


def test_nan_runs_are_skipped_with_the_reason():
    diverged = verify.parse_log_text(our_log(math.nan))
    assert not diverged.finished and "final val_loss is nan" in diverged.skip_reason
    crashed = verify.parse_log_text(our_log(3.3, nan_from=1000, stop_at=1100,
                                            error="error: non-finite loss at step 1101"))
    assert not crashed.finished
    assert crashed.skip_reason == ("did not finish: last logged step 1000/1750; val_loss nan from step 1000; "
                                   "error: non-finite loss at step 1101")


def test_unfinished_and_nan_runs_are_reported_and_the_rest_still_tested(tmp_path, capsys):
    folder = write_logs(tmp_path / "rec", PASSING, make=our_log)
    (folder / "run_crash.txt").write_text(our_log(3.3, stop_at=800, n_steps=1750))
    (folder / "run_nan.txt").write_text(our_log(math.nan, seed=99))
    (folder / "README.md").write_text("step:1750/1750 val_loss:3.0000 train_time:1ms step_avg:1.00ms\n")
    code, out, _ = run_cli(capsys, folder, "--json")
    result = json.loads(out)
    assert code == 0 and result["n"] == len(PASSING)
    assert {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in result["skipped"]} == {
        "run_crash.txt": "did not finish: last logged step 750/1750",
        "run_nan.txt": "final val_loss is nan at step 1750/1750 (diverged)"}
    code, out, _ = run_cli(capsys, folder)
    assert "skipped 2 run(s)" in out and "run_crash.txt: did not finish" in out


def test_reader_gives_everything_a_log_says():
    """`parse_log_text` is the one reader of the log grammar (records, benchmarks, tests): source, environment,
    configuration, start-up times, world size, every step and val line, peak memory, errors."""
    text = our_log(3.2755, seed=7, gpus=(H100,) * 8, world_size=8, stop_at=1600, error="error: a data error")
    run = verify.parse_log_text(text, Path("r.txt"))
    assert run.path == Path("r.txt")
    assert run.source == FAKE_SOURCE.rstrip("\n") and run.environment[0].startswith("Running Python")
    assert run.gpus == (H100,) * 8, "one GPU per table row; the process table is not counted"
    assert run.hyperparameters["seed"] == 7 and run.seed == 7
    assert (run.world_size, run.grad_accum, run.device) == (8, (1,), "cuda")
    staged = verify.parse_log_text(text.replace("grad_accum:1 ", "grad_accum:8,8,8 rows_per_micro_batch:4,2,1 "
                                                "stages(step:tokens):0:131072 63:262144 "), Path("s.txt"))
    assert (staged.world_size, staged.grad_accum, staged.device) == (8, (8, 8, 8), "cuda"), (
        "the staged trainer's line (a stage list with spaces and parentheses) is read too")
    assert run.timings_s == {"warmup_and_compile_time": 31.8, "first_train_step": 20.1, "first_val_forward": 5.2,
                             "startup_time": 42.9}
    assert [p.step for p in run.step_points] == [250, 500, 750, 1000, 1250, 1500]
    assert run.step_points[0] == verify.StepPoint(step=250, num_iterations=1750, train_time_ms=25000.0)
    assert [(p.step, p.decimals) for p in run.val_points] == [(0, 4), (500, 4), (1000, 4), (1500, 4)]
    assert run.val_points[-1].train_time_ms == 150000.0
    assert run.errors == ("error: a data error",) and run.peak_memory_mib is None
    assert run.output[0].startswith("hyperparameters: ") and run.output[-1] == "error: a data error"
    assert (run.last_step, run.num_iterations, run.finished) == (1500, 1750, False)


def test_reader_ignores_lines_it_does_not_know():
    """The trainer may print new lines (warnings, resume notes): the reader reads the same run."""
    text = our_log(3.2755, seed=7)
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("step:500/"))
    noisy = lines[:i] + ["warning: loss spike at step 499", "resumed_from: logs/x.txt step:499/1750"] + lines[i:]
    noisy.append("note: step:1750/1750 val_loss:2.0000 train_time:1ms step_avg:1.00ms")  # not the grammar: ignored
    plain, read = verify.parse_log_text(text), verify.parse_log_text("\n".join(noisy))
    assert read.val_points == plain.val_points and read.step_points == plain.step_points
    assert read.final_loss == 3.2755 and read.errors == ()


# --------------------------------------------------------------------------------------------------
# CLI contract

def test_cli_exit_0_on_pass_and_1_on_fail_with_runs_needed(tmp_path, capsys):
    code, out, _ = run_cli(capsys, write_logs(tmp_path / "good", PASSING), "--target", 3.28)
    assert code == 0 and "PASS" in out and 'ttest_1samp(losses, 3.28, alternative="less")' in out
    code, out, _ = run_cli(capsys, write_logs(tmp_path / "weak", FAILING), "--target", 3.28)
    n = verify.runs_needed(np.mean(FAILING), np.std(FAILING, ddof=1), 3.28)
    assert code == 1 and "FAIL" in out and f"about {n} runs would reach p < 0.01" in out


def test_cli_exit_2_with_fewer_than_two_finished_runs(tmp_path, capsys):
    folder = write_logs(tmp_path, [3.27])
    (folder / "run_cut.txt").write_text(public_log(3.27, stop_at=10))
    code, out, err = run_cli(capsys, folder)
    assert code == 2 and out == ""
    assert "need at least 2 finished runs (got 1 of 2)" in err and "run_cut.txt" in err


@pytest.mark.parametrize("case", ["missing", "empty_folder", "nothing"])
def test_cli_exit_2_without_logs(tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("# no logs here\n")
    argv = {"missing": [tmp_path / "nope"], "empty_folder": [tmp_path / "empty"], "nothing": []}[case]
    if case == "nothing":
        with pytest.raises(SystemExit) as e:
            verify.main(argv)
        assert e.value.code == 2
        return
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert {"missing": "no such file or folder", "empty_folder": "no *.txt logs"}[case] in err


def test_cli_rejects_duplicate_runs_naming_both_files(tmp_path, capsys):
    folder = write_logs(tmp_path, PASSING)
    shutil.copy(folder / "run_03.txt", folder / "run_99_copy.txt")
    code, out, err = run_cli(capsys, folder)
    assert code == 2 and out == ""
    assert "duplicate run" in err and "run_03.txt" in err and "run_99_copy.txt" in err
    (folder / "run_99_copy.txt").unlink()
    code, out, err = run_cli(capsys, folder, "--baseline", folder / "run_02.txt", folder / "run_05.txt")
    assert code == 2 and "run_02.txt: given twice" in err


NEAR = [3.2776, 3.2793, 3.2781, 3.2797, 3.2770]  # p = 0.015: fails; the same five counted twice, p = 0.0004


@pytest.mark.parametrize("edit", ["extra newline", "CRLF line endings", "seed and run_id edited"])
def test_a_copy_of_a_run_is_refused_whatever_its_bytes(tmp_path, capsys, edit):
    """A copy differs from its original by a newline, line endings or an edited header: it is still one run,
    and counting it twice would turn a failing claim into a pass."""
    folder = write_logs(tmp_path, NEAR, make=our_log)
    code, _, _ = run_cli(capsys, folder)
    assert code == 1, "negative control: the runs alone fail"
    for original in sorted(folder.glob("run_*.txt")):
        text = original.read_text()
        copy = {"extra newline": text + "\n", "CRLF line endings": text.replace("\n", "\r\n"),
                "seed and run_id edited": text.replace(f'"seed": {int(original.stem[4:])},', '"seed": 99,')
                .replace('"run_id": "seed', '"run_id": "copy')}[edit]
        assert copy != text
        (folder / f"copy_{original.name}").write_bytes(copy.encode())
    code, out, err = run_cli(capsys, folder)
    assert code == 2 and out == "", f"a doubled sample must not be tested (exit {code}):\n{out}{err}"
    assert "duplicate run" in err and "copy_run_00.txt" in err and "run_00.txt and" in err, err


def test_two_runs_of_one_configuration_with_the_same_seed_are_refused(tmp_path, capsys):
    folder = write_logs(tmp_path, PASSING, make=our_log)
    (folder / "rerun_03.txt").write_text(our_log(3.2750, seed=3, time_ms=176_001.0))
    code, out, err = run_cli(capsys, folder)
    assert code == 2 and out == ""
    assert "run_03.txt" in err and "rerun_03.txt" in err and "seed 3" in err, err
    (folder / "rerun_03.txt").write_text(our_log(3.2750, seed=30, time_ms=176_001.0))
    code, _, err = run_cli(capsys, folder)
    assert code == 0, f"negative control: another seed is another run\n{err}"


def test_a_crashed_run_and_its_rerun_with_the_same_seed_both_stay(tmp_path, capsys):
    """The crashed log stays in the folder (it is listed, not counted), so it cannot double a sample."""
    folder = write_logs(tmp_path, PASSING, make=our_log)
    (folder / "run_03_crashed.txt").write_text(our_log(3.3, seed=3, stop_at=800, time_ms=171_000.0))
    code, out, err = run_cli(capsys, folder)
    assert code == 0 and "run_03_crashed.txt: did not finish" in out, err


# --------------------------------------------------------------------------------------------------
# Groups: one test pools the runs of one recipe on one machine

REC = [3.2791, 3.2785, 3.2802, 3.2779, 3.2796]  # p = 0.04 against 3.28: fails
LOWER = [3.2702, 3.2721, 3.2715, 3.2709]  # pooled with REC, p = 0.007: a pass neither set supports

# How a second set of runs may differ from the claim's: (log maker's keyword arguments, what the tool names)
DIFFERENCES = {
    "source": ({"source": FAKE_SOURCE + "# another recipe\n"}, "source"),
    "hyperparameter": ({"hp": {"muon_lr": 0.06}}, "muon_lr"),
    "train data": ({"hp": {"train_files": "data/mine/text_train_*.bin"}}, "train_files"),
    "val data": ({"hp": {"val_files": "data/mine/text_val_*.bin"}}, "val_files"),
    "val tokens": ({"hp": {"val_tokens": 1048576}}, "val_tokens"),
    "steps": ({"n_steps": 1500, "hp": {"num_iterations": 1500}}, "steps"),
    "gpu model": ({"gpus": ("NVIDIA H200",) * 8, "world_size": 8}, "hardware"),
    "gpu count": ({"gpus": (H100,), "world_size": 1}, "hardware"),
}


@pytest.mark.parametrize("difference", DIFFERENCES)
def test_runs_that_ran_something_else_are_not_pooled(tmp_path, capsys, difference):
    """Each way two sets of runs can differ makes two groups: without --group the tool refuses, naming
    what differs and the files of each group; --group N tests that group alone."""
    other, named = DIFFERENCES[difference]
    folder = write_logs(tmp_path, REC, make=our_log, gpus=(H100,) * 8, world_size=8)
    kw = {"gpus": (H100,) * 8, "world_size": 8, **other}
    write_logs(folder, LOWER, make=our_log, first=len(REC), **kw)
    code, out, err = run_cli(capsys, folder)
    assert code == 2 and out == "", f"mixed runs were tested (exit {code}):\n{out}"
    assert "2 groups" in err and named in err and "--group" in err, err
    assert re.search(r"group 1: 5 logs .*run_00\.txt", err) and re.search(r"group 2: 4 logs .*run_05\.txt", err), err
    code, out, _ = run_cli(capsys, folder, "--group", 1, "--json")
    assert code == 1 and json.loads(out)["n"] == len(REC), "the claim's own runs: p = 0.04, a failure"
    code, out, _ = run_cli(capsys, folder, "--group", 2, "--json")
    assert json.loads(out)["n"] == len(LOWER)


def test_public_logs_without_hyperparameters_group_by_source_steps_and_hardware(tmp_path, capsys):
    """A public record folder that also holds single-GPU runs of older code: pooled, they pass (p = 0.007)
    where the record's own 8-GPU runs fail (p = 0.04)."""
    folder = write_logs(tmp_path, REC, header=True, gpus=(H100,) * 8)
    write_logs(folder, LOWER, first=len(REC), header=True, gpus=(H100,), source=FAKE_SOURCE + "# older\n")
    assert stats.ttest_1samp(REC + LOWER, 3.28, alternative="less").pvalue < 0.01  # what pooling would claim
    code, out, err = run_cli(capsys, folder)
    assert code == 2 and "2 groups" in err and "source" in err and "hardware" in err, err
    assert "8x NVIDIA H100 80GB HBM3" in err and "1x NVIDIA H100 80GB HBM3" in err, err
    code, out, _ = run_cli(capsys, folder, "--group", 1)
    assert code == 1 and "group 1 of 2" in out, out
    same = write_logs(tmp_path / "same", REC + LOWER, header=True, gpus=(H100,) * 8)
    code, out, err = run_cli(capsys, same)
    assert code == 0, f"negative control: one source, one machine, one group\n{err}"


def test_group_number_out_of_range_lists_the_groups(tmp_path, capsys):
    folder = write_logs(tmp_path, PASSING, make=our_log)
    code, _, err = run_cli(capsys, folder, "--group", 2)
    assert code == 2 and "--group 2" in err and "1 group" in err, err


def test_baseline_logs_must_be_one_group_on_the_same_hardware(tmp_path, capsys):
    new = write_logs(tmp_path / "new", PASSING, make=our_log, gpus=(H100,) * 8, world_size=8)
    base = write_logs(tmp_path / "base", [3.2771, 3.2760, 3.2783], make=our_log, gpus=(H100,) * 8, world_size=8,
                      hp={"muon_lr": 0.04})
    code, _, err = run_cli(capsys, new, "--baseline", base)
    assert code == 0, f"negative control: a re-timed previous recipe on the same machine\n{err}"
    write_logs(base, [3.2790, 3.2786], make=our_log, first=3, gpus=(H100,) * 8, world_size=8, hp={"muon_lr": 0.03})
    code, _, err = run_cli(capsys, new, "--baseline", base)
    assert code == 2 and "--baseline" in err and "2 groups" in err, err
    other = write_logs(tmp_path / "other", [3.2771, 3.2760, 3.2783], make=our_log, gpus=("NVIDIA H200",) * 8,
                       world_size=8, hp={"muon_lr": 0.04})
    code, _, err = run_cli(capsys, new, "--baseline", other)
    assert code == 2 and "8x NVIDIA H200" in err and "same machine" in err, err


# --------------------------------------------------------------------------------------------------
# Where logs are, and runs that stopped at the end

def test_a_folder_whose_logs_are_in_sub_folders_says_which_to_pass(tmp_path, capsys):
    write_logs(tmp_path / "rec" / "8xH100", PASSING)
    write_logs(tmp_path / "rec" / "baseline", FAILING)
    code, _, err = run_cli(capsys, tmp_path / "rec")
    assert code == 2
    assert str(tmp_path / "rec" / "8xH100") in err and str(tmp_path / "rec" / "baseline") in err, err
    assert "8 logs" in err and "--baseline" in err, err


def test_logs_in_a_sub_folder_next_to_the_claim_are_named_as_not_read(tmp_path, capsys):
    folder = write_logs(tmp_path / "rec", PASSING)
    write_logs(folder / "baseline", FAILING)
    code, out, err = run_cli(capsys, folder, "--json")
    assert code == 0 and json.loads(out)["n"] == len(PASSING), "sub-folders are not pooled with the claim"
    assert f"{folder / 'baseline'} holds 5 logs that are not read" in err, err
    code, _, err = run_cli(capsys, folder, "--baseline", folder / "baseline")
    assert "not read" not in err, "negative control: given as --baseline, it is read"


def test_a_run_that_reached_the_last_step_without_its_final_val_line_says_so(tmp_path):
    text = our_log(3.2755)
    cut = text.replace("step:1750/1750 val_loss:3.2755 train_time:175000ms step_avg:100.00ms\n", "")
    assert cut != text
    run = verify.parse_log_text(cut)
    assert not run.finished and run.last_step == 1750
    assert run.skip_reason == "reached step 1750/1750 but has no final val_loss line (step:1750/1750 val_loss:...)"


def test_cli_rejects_a_log_whose_target_differs(tmp_path, capsys):
    folder = write_logs(tmp_path, PASSING, make=our_log)
    (folder / "run_medium.txt").write_text(our_log(2.91, track="medium", target=2.92))
    code, _, err = run_cli(capsys, folder, "--target", 3.28)
    assert code == 2 and "run_medium.txt" in err and "2.92" in err
    code, _, err = run_cli(capsys, folder)  # no --target: two groups, their targets differ
    assert code == 2 and "2 groups" in err and "target_val_loss" in err


def test_cli_rejects_track_mismatch(tmp_path, capsys):
    code, _, err = run_cli(capsys, write_logs(tmp_path, PASSING, make=our_log), "--track", "medium")
    assert code == 2 and "logged track 'small' but --track medium" in err


def test_target_comes_from_logs_then_track(tmp_path, capsys):
    """A declared proxy target (2.04) is used when all logs agree; public logs fall back to --track."""
    proxy = write_logs(tmp_path / "proxy", [2.0301, 2.0322, 2.0310], make=our_log, target=2.04)
    code, out, _ = run_cli(capsys, proxy, "--json")
    assert code == 0 and json.loads(out)["target"] == 2.04
    medium = write_logs(tmp_path / "medium", [2.918123, 2.917456, 2.918001, 2.917789, 2.917661], decimals=6)
    code, out, _ = run_cli(capsys, medium, "--track", "medium", "--json")
    assert code == 0 and json.loads(out)["target"] == 2.92
    code, out, _ = run_cli(capsys, medium, "--json")  # default small track: 3.28
    assert json.loads(out)["target"] == 3.28


def test_report_names_the_confidence_levels_exactly(tmp_path, capsys):
    code, out, _ = run_cli(capsys, write_logs(tmp_path, PASSING), "--alpha", "0.001")
    assert code == 0 and "99.9% one-sided upper bound of the mean" in out and "95% CI of the mean" in out


def test_json_output_has_the_documented_keys(tmp_path, capsys):
    folder = write_logs(tmp_path, PASSING)
    code, out, _ = run_cli(capsys, folder, "--json")
    result = json.loads(out)
    assert code == 0
    for key in ("n", "mean_loss", "std_loss", "p_value", "alpha", "target", "passed", "mean_time_s", "runs", "skipped"):
        assert key in result
    assert result["p_value"] == pytest.approx(stats.ttest_1samp(PASSING, 3.28, alternative="less").pvalue, rel=1e-12)
    assert result["passed"] is True and result["skipped"] == [] and len(result["runs"]) == 8
    assert result["runs"][0]["val_loss"] == PASSING[0] and result["runs"][0]["time_s"] == 175.0


def test_report_analysis_md_and_json_show_one_list_of_summary_rows(tmp_path, capsys):
    """The three renderers read one list of rows: each row is in the report and ANALYSIS.md under its label
    and in the JSON under its key, with the same value."""
    new = write_logs(tmp_path / "new", PASSING, make=our_log)
    base = write_logs(tmp_path / "new" / "baseline", [3.2771, 3.2760, 3.2783], make=our_log, hp={"muon_lr": 0.04})
    a = verify.verify_paths([new], baseline=[base])
    rows = verify.summary_rows(a) + verify.baseline_rows(a)
    assert {r.key for r in verify.summary_rows(a)} >= {"n", "mean_loss", "std_loss", "p_value", "upper_bound", "ci95"}
    assert {r.key for r in verify.baseline_rows(a)} >= {"welch_time_p", "welch_loss_p", "time_diff_s", "time_diff_ci95"}
    report, md = verify.format_report(a), verify.format_analysis_md(a, new, "cmd")
    result = verify.analysis_dict(a)
    for r in rows:
        if r.value is None:
            continue
        assert f"{r.label}: " in report, f"report lacks {r.label!r}"
        assert f"| {r.label} | " in md, f"ANALYSIS.md lacks {r.label!r}"
        got = result["baseline"][r.key] if r in verify.baseline_rows(a) else result[r.key]
        want = list(r.value) if isinstance(r.value, tuple) else r.value
        if isinstance(want, float) and math.isnan(want):
            want = None  # not a JSON number (here: the paired time test of runs timed alike)
        assert got == want, f"JSON {r.key}: {got!r}, row: {r.value!r}"


def test_json_is_valid_when_statistics_are_undefined(tmp_path, capsys):
    code, out, _ = run_cli(capsys, write_logs(tmp_path, [3.27, 3.27, 3.27]), "--json")
    result = json.loads(out)  # nan would not be valid JSON: it is null
    assert code == 1 and result["p_value"] is None and result["zero_variance"] is True


def test_baseline_json_matches_scipy_welch(tmp_path, capsys):
    new = write_logs(tmp_path / "new", PASSING)
    base = tmp_path / "base"
    base.mkdir()
    base_losses = [3.2770, 3.2755, 3.2781, 3.2762, 3.2749]
    base_times = [178.2, 179.9, 177.4, 178.8, 180.3]
    for i, (l, t) in enumerate(zip(base_losses, base_times)):
        (base / f"b{i}.txt").write_text(public_log(l, time_ms=t * 1000))
    code, out, _ = run_cli(capsys, new, "--baseline", base, "--json")
    b = json.loads(out)["baseline"]
    new_times = [175.0 + 0.137 * i for i in range(8)]
    assert code == 0 and b["n"] == 5
    assert b["welch_time_p"] == pytest.approx(
        stats.ttest_ind(new_times, base_times, equal_var=False, alternative="less").pvalue, rel=1e-9)
    assert b["welch_loss_p"] == pytest.approx(stats.ttest_ind(PASSING, base_losses, equal_var=False).pvalue, rel=1e-9)
    assert b["time_diff_s"] == pytest.approx(np.mean(new_times) - np.mean(base_times), rel=1e-9)
    ci = stats.ttest_ind(new_times, base_times, equal_var=False).confidence_interval(0.95)
    assert b["time_diff_ci95"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert set(b) >= {"n", "mean_time_s", "mean_loss", "welch_time_p", "welch_loss_p", "time_diff_s", "time_diff_ci95"}
    code, out, _ = run_cli(capsys, new, "--baseline", base)
    assert "baseline runs n: 5" in out and "Welch CI" in out


def test_baseline_runs_of_the_same_seeds_are_also_compared_pair_by_pair(tmp_path, capsys):
    """Runs and baseline runs that logged the same seeds (3 of them here: 1, 2, 3) are also compared by the paired
    t-test over those seeds (scipy's ttest_rel: loss two-sided, time one-sided), with the mean per-seed
    differences; the Welch tests stay as they were. Negative control: pairing by position (seed 0 with seed 1,
    ...) gives another loss p. Without a shared seed (public logs log none) there is no paired row."""
    new_losses, base_losses = [3.2700, 3.2712, 3.2695, 3.2731], [3.2760, 3.2741, 3.2768, 3.2779]
    new = write_logs(tmp_path / "new", new_losses, make=our_log)  # seeds 0-3, times 175.0 + 0.137 i s
    base = write_logs(tmp_path / "base", base_losses, make=our_log, first=1)  # seeds 1-4, times 175.137 + ...
    code, out, _ = run_cli(capsys, new, "--baseline", base, "--json")
    b = json.loads(out)["baseline"]
    assert code in (0, 1) and b["paired_seeds"] == [1, 2, 3], b
    new_l, base_l = new_losses[1:4], base_losses[0:3]
    new_t, base_t = [175.0 + 0.137 * i for i in (1, 2, 3)], [175.0 + 0.137 * i for i in (1, 2, 3)]
    assert b["paired_loss_p"] == pytest.approx(stats.ttest_rel(new_l, base_l).pvalue, rel=1e-9)
    assert b["paired_loss_diff"] == pytest.approx(np.mean(np.subtract(new_l, base_l)), rel=1e-9)
    assert b["paired_time_diff_s"] == pytest.approx(np.mean(np.subtract(new_t, base_t)), abs=1e-9)
    assert b["welch_loss_p"] == pytest.approx(stats.ttest_ind(new_losses, base_losses, equal_var=False).pvalue,
                                              rel=1e-9), "the Welch test still uses every run"
    by_position = stats.ttest_rel(new_losses[:3], base_losses[:3]).pvalue
    assert b["paired_loss_p"] != pytest.approx(by_position, rel=1e-3), "negative control: pairs are by seed"
    code, out, _ = run_cli(capsys, new, "--baseline", base)
    assert "paired by seed: the seeds both ran: [1, 2, 3]" in out and "paired loss p, `ttest_rel" in out, out
    public_base = tmp_path / "public"
    public_base.mkdir()
    for i, loss in enumerate(base_losses):
        (public_base / f"b{i}.txt").write_text(public_log(loss, time_ms=178_000.0 + i))
    code, out, _ = run_cli(capsys, new, "--baseline", public_base)
    assert "paired" not in out, "no logged seeds in common: no paired comparison"


def test_write_is_deterministic_and_records_a_canonical_command(tmp_path, capsys, monkeypatch):
    folder = write_logs(tmp_path / "rec", list(reversed(PASSING)))
    (folder / "run_cut.txt").write_text(public_log(3.27, stop_at=10))
    code, _, err = run_cli(capsys, folder, "--target", 3.28, "--write")
    assert code == 0 and "wrote" in err
    first = (folder / "ANALYSIS.md").read_text()
    monkeypatch.chdir(folder)  # a relative path from another cwd gives the same file
    code, _, _ = run_cli(capsys, ".", "--target", "3.28", "--write", "--json")
    assert code == 0 and (folder / "ANALYSIS.md").read_text() == first
    expected_command = f"python records/verify.py {folder.resolve().as_posix()} --target 3.28 --write"
    assert expected_command in first.splitlines()
    names = [line.split(" | ")[0].lstrip("| ") for line in first.splitlines() if line.startswith("| run_")]
    assert names == sorted(names) and "run_cut.txt" in names
    assert f"| mean final val_loss | {verify.mean_std(PASSING)[0]!r} |" in first  # full precision
    assert not re.search(r"\d{4}-\d{2}-\d{2}|\d\d:\d\d:\d\d", first)  # no date or time stamp


def test_write_needs_exactly_one_folder(tmp_path, capsys):
    folder = write_logs(tmp_path, PASSING)
    for argv in ([folder / "run_00.txt", folder / "run_01.txt", "--write"], [folder, folder, "--write"]):
        with pytest.raises(SystemExit) as e:
            verify.main([str(a) for a in argv])
        assert e.value.code == 2
    capsys.readouterr()


def test_canonical_command_names_repo_folders_relative_to_root():
    assert verify.canonical_command(ROOT / "records" / "track_1_short" / "2026-01-01_x", 3.28) == \
        "python records/verify.py records/track_1_short/2026-01-01_x --target 3.28 --write"
    assert verify.canonical_command(ROOT / "records" / "x", 2.92, alpha=0.001) == \
        "python records/verify.py records/x --target 2.92 --alpha 0.001 --write"


def test_write_draws_val_loss_png_when_matplotlib_is_installed(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional; the PNG path needs it")
    folder = write_logs(tmp_path, PASSING)
    code, _, _ = run_cli(capsys, folder, "--write")
    png = folder / "val_loss.png"
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](val_loss.png)" in (folder / "ANALYSIS.md").read_text()


def test_plot_draws_every_runs_val_loss_against_training_time_with_the_baseline(tmp_path, capsys):
    folder = write_logs(tmp_path / "new", PASSING, make=our_log)
    baseline = write_logs(tmp_path / "old", FAILING, make=our_log, first=len(PASSING))
    png = tmp_path / "curves.png"
    code, _, err = run_cli(capsys, folder, "--baseline", baseline, "--plot", png)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", err
    assert f"wrote {png}" in err


def test_plot_without_matplotlib_is_one_error_naming_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(verify, "_pyplot", lambda: None)
    png = tmp_path / "curves.png"
    code, _, err = run_cli(capsys, write_logs(tmp_path / "new", PASSING), "--plot", png)
    assert code == 2 and "--plot needs matplotlib" in err and "pip install matplotlib" in err, err
    assert not png.exists()


def test_a_resumed_run_is_refused_as_a_record_run(tmp_path, capsys):
    """Its train_time adds two processes' timed loops (the restart left out): no speedrun time."""
    folder = write_logs(tmp_path / "runs", PASSING, make=our_log)
    assert run_cli(capsys, folder)[0] == 0, "negative control: the same runs, none resumed, pass"
    (folder / "run_99.txt").write_text(our_log(3.2755, seed=99, hp={"resume_from": "logs/x/step_500"}))
    code, _, err = run_cli(capsys, folder)
    assert code == 2 and "run_99.txt: resumed from the checkpoint logs/x/step_500" in err, err
    assert "not a speedrun time" in err and "without --resume_from" in err, err


def test_checkpoint_and_validation_flags_do_not_split_a_recipe():
    """Saving and validating happen outside the timed region and change no training state: runs that differ
    only in them are one recipe; a training flag does split (negative control)."""
    a = verify.parse_log_text(our_log(3.2751, hp={"checkpoint_every": 0, "save_checkpoint": False,
                                                  "val_loss_every": 0}))
    b = verify.parse_log_text(our_log(3.2752, seed=1, hp={"checkpoint_every": 100, "save_checkpoint": True,
                                                          "val_loss_every": 50}))
    c = verify.parse_log_text(our_log(3.2752, seed=2, hp={"checkpoint_every": 0, "save_checkpoint": False,
                                                          "val_loss_every": 0, "adam_every": 2}))
    assert a.recipe == b.recipe
    assert a.recipe != c.recipe, "a training flag must make another recipe"


def test_script_runs_from_any_directory_with_exit_status(tmp_path):
    folder = write_logs(tmp_path / "weak", FAILING)
    proc = subprocess.run([sys.executable, str(ROOT / "records" / "verify.py"), str(folder)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False)
    assert proc.returncode == 1 and "FAIL" in proc.stdout


# --------------------------------------------------------------------------------------------------
# Logs written by the real trainer

@pytest.mark.skipif(not (ROOT / "train_gpt.py").exists(), reason="train_gpt.py is not in the repository yet")
def test_parses_logs_written_by_a_tiny_cpu_run_of_train_gpt(tiny_corpus, tmp_path, capsys):
    """Two seeds of the real trainer, run side by side with one thread each (about 15 s on 2 cores)."""
    log_dir = tmp_path / "logs"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    with contextlib.ExitStack() as outputs:
        for seed in (0, 1):
            cmd = [sys.executable, str(ROOT / "train_gpt.py"), "--preset=tiny",
                   *tiny_corpus["flags"], f"--log_dir={log_dir}", "--num_iterations=4", "--extension_steps=0", "--val_loss_every=2",
                   f"--seed={seed}",
                   f"--run_id=seed{seed}"]
            out = outputs.enter_context(open(tmp_path / f"stdout{seed}.txt", "w"))
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env), out))
        for proc, out in procs:
            code = proc.wait(timeout=300)
            assert code == 0, Path(out.name).read_text()[-3000:]
    logs = sorted(log_dir.glob("*.txt"))
    assert [p.name for p in logs] == ["seed0.txt", "seed1.txt"]
    text = logs[0].read_text()
    assert text.count(RULE) >= 2 and "val_loss:" in text.split(RULE)[0]  # the source holds the format string
    run = verify.parse_log(logs[0])
    assert run.finished and run.num_iterations == 4 and run.last_step == 4
    assert [k for k, _ in run.val_curve] == [0, 2, 4]
    assert run.time_s > 0 and run.peak_memory_mib is not None
    assert run.hyperparameters["track"] == "small" and run.hyperparameters["seed"] == 0
    assert run.hyperparameters["num_iterations"] == 4 and run.logged_target is not None
    code, out, _ = run_cli(capsys, log_dir, "--json")
    result = json.loads(out)
    assert code in (0, 1) and result["n"] == 2 and result["target"] == run.logged_target
    assert [r["val_loss"] for r in result["runs"]] == [run.final_loss, verify.parse_log(logs[1]).final_loss]


def test_pool_despite_pools_recipes_that_differ_only_in_the_named_fields_and_says_so(tmp_path, capsys):
    """Seeds of one recipe run by two code versions (another source, and a flag these runs never read set
    otherwise) are two groups; --pool_despite source,muon_lr pools them into one test, and the report says
    what was pooled over. Negative controls: naming less than what differs leaves two groups; steps and
    hardware never pool; a seed run by both versions is refused; --write (a record) refuses to pool."""
    folder = write_logs(tmp_path / "runs", REC, make=our_log)
    later = {"source": FAKE_SOURCE + "# a later version\n", "hp": {"muon_lr": 0.06}}
    write_logs(folder, LOWER, make=our_log, first=len(REC), **later)
    code, out, err = run_cli(capsys, folder, "--pool_despite", "source,muon_lr")
    assert code == 0, f"REC + LOWER pooled pass (p = 0.007)\n{err}"
    assert "pooled over recipes that differ in: source, muon_lr (--pool_despite)" in out, out
    code, out, _ = run_cli(capsys, folder, "--pool_despite", "source,muon_lr", "--json")
    report = json.loads(out)
    assert report["n"] == len(REC) + len(LOWER) and report["group"]["pooled_over"] == ["source", "muon_lr"], report
    code, _, err = run_cli(capsys, folder, "--pool_despite", "source")
    assert code == 2 and "2 groups" in err and "muon_lr" in err, "muon_lr still differs: two groups"
    for name in ("steps", "hardware"):
        code, _, err = run_cli(capsys, folder, "--pool_despite", f"source,{name}")
        assert code == 2 and "never pooled" in err, err
    (folder / "again.txt").write_text(our_log(3.2700, seed=0, time_ms=176_999.0, **later))
    code, _, err = run_cli(capsys, folder, "--pool_despite", "source,muon_lr")
    assert code == 2 and "duplicate seed" in err and "again.txt" in err, err
    with pytest.raises(SystemExit):
        verify.main([str(folder), "--pool_despite", "source", "--write"])
