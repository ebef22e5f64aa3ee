"""benchmarks/proxy_speedrun.py: FLOP accounting, the numbers it reads from a real training log, and how it
runs configurations side by side."""
import inspect
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/proxy_speedrun.py", "proxy_speedrun")


def test_flops_per_token_counts_weights_and_windowed_attention(bench):
    import train_gpt
    hp = train_gpt.parse_args(["--preset=tiny", "--stage_windows=1:2,1:2,1:2", "--extension_windows=1:2"])
    # layers "SS-L": two short layers see 128 tokens, the long one 256, layer 2 none; causal halves them.
    attended = (2 * 128 + 256) / 2
    weights = 3 * 4 * 64 * 64 + 4 * 2 * 4 * 64 * 64 + 50304 * 64
    assert bench.flops_per_token(hp) == pytest.approx(6 * weights + 12 * 64 * attended)
    later = train_gpt.parse_args(["--preset=tiny", "--stage_windows=1:2,1:2,2:4", "--extension_windows=2:4"])
    assert bench.flops_per_token(later) > bench.flops_per_token(hp), "longer late windows cost more"


def test_summary_of_a_cpu_log_matches_its_lines(bench, tiny_corpus, tmp_path):
    import train_gpt
    args = ["--preset=tiny", *tiny_corpus["flags"],
            f"--log_dir={tmp_path}", "--run_id=r", "--num_iterations=4", "--extension_steps=0", "--val_loss_every=2",
            "--warmup_steps=0"]
    assert train_gpt.main(args) == 0
    log = tmp_path / "r.txt"
    row = bench.summarize_log(log, target=20.0, peak_tflops=1.0)
    assert row["time_to_target_s"] == 0.0, "the step-0 loss (10.8) is already below a target of 20"
    assert bench.summarize_log(log, target=0.01, peak_tflops=None)["time_to_target_s"] is None
    hp = train_gpt.parse_args(args)
    assert row["ms_per_step"] > 0 and row["tokens_per_s"] == pytest.approx(bench.run_tokens(hp) / row["train_time_s"])
    assert bench.run_tokens(hp) == 512 + 3 * 1024, "step 0 in stage 1 (512 tokens), steps 1-3 in stages 2-3"
    finals = [line for line in log.read_text().splitlines() if line.startswith("step:4/4 val_loss:")]
    assert row["final_loss"] == float(finals[-1].split("val_loss:")[1].split()[0])
    assert row["compile_s"] is not None and row["startup_s"] >= row["compile_s"]
    gc_line = next(line for line in log.read_text().splitlines() if line.startswith("gc: "))
    assert row["gc_ms"] == float(gc_line.split()[-2]), "the GC time of the log's gc: line"
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 1e12)
    times = {int(line.split("/")[0][5:]): float(line.split("train_time:")[1].split("ms")[0])
             for line in log.read_text().splitlines() if line.startswith("step:") and "train_time:" in line}
    assert row["stage_ms"] == [times[1] - times[0], statistics.median([times[2] - times[1], times[3] - times[2]]),
                               times[4] - times[3], None], "stages at steps 0, 1 and 3; no extension steps"
    assert "| r | 1 |" in bench.format_table([row], 20.0, 1.0) and " / -" in bench.format_table([row], 20.0, 1.0)


def test_step_time_spread_by_stage_shows_a_host_that_sets_the_pace(bench):
    """The interquartile range of each stage's step times: about 0 for steady steps (a GPU-bound stage), the
    alternation's size for steps that jitter (a host-bound one: launches or loading late), None below 4 steps."""
    hp = bench.train_gpt.parse_args(["--num_iterations=30", "--extension_steps=2"])
    steady, jittery, clock = 230.0, (300.0, 400.0), {0: 0.0}
    for k in range(32):
        stage = next(i for i, (first, stop) in enumerate(bench.stage_bounds(hp)) if first <= k < stop)
        clock[k + 1] = clock[k] + (jittery[k % 2] if stage == 0 else steady)
    iqr = bench.stage_iqr_ms(hp, clock)
    assert iqr[0] == pytest.approx(100.0) and iqr[1] == iqr[2] == 0.0, iqr
    assert iqr[3] is None, "the 2 extension steps are too few for quartiles"
    assert bench.stage_ms(hp, clock)[0] == 350.0 and bench.stage_ms(hp, clock)[1] == steady


def test_summary_shows_the_allocator_calls_of_a_cuda_log(bench, tmp_path):
    """A CUDA log's `allocator:` line (the caching allocator's calls in the timed loop) is read by the records
    reader and shown as malloc/free/retries/syncs; a log without one (CPU runs, older trainers) shows '-'."""
    from test_verify import our_log
    text = our_log(3.27, n_steps=20, val_every=10)
    line = "allocator: 3 cudaMalloc, 0 cudaFree, 1 retries, 2 stream syncs in the timed loop"
    with_line, without = tmp_path / "cuda.txt", tmp_path / "cpu.txt"
    with_line.write_text(text.replace("peak memory allocated", line + "\npeak memory allocated", 1))
    without.write_text(text)
    assert line in with_line.read_text(), "the stand-in log has the line"
    assert bench.verify.parse_log(with_line).allocator_calls == (3, 0, 1, 2)
    rows = [bench.summarize_log(p, target=3.28, peak_tflops=None) for p in (with_line, without)]
    assert [r["allocator_calls"] for r in rows] == [(3, 0, 1, 2), None]
    table = bench.format_table(rows, 3.28, None).splitlines()
    assert "allocator calls in the loop" in table[2] and table[2].count("|") == table[4].count("|") == 19
    assert "| 3/0/1/2 |" in table[4] and "| 3/0/1/2 |" not in table[5], table[4:6]


def test_summary_reads_the_log_through_the_records_reader(bench, tmp_path):
    """Every number of a summary comes from `verify.parse_log_text`, the one reader of the log grammar;
    the script has no line patterns of its own."""
    from test_verify import H100, our_log
    text = our_log(2.0311, gpus=(H100,) * 8, world_size=8, n_steps=200, val_every=100, step_every=1, time_ms=18_000.0,
                   hp={"num_layers": 4, "model_dim": 64, "num_heads": 2, "head_dim": 32, "num_value_embeds": 2,
                       "layer_attention": "LSSL", "train_seq_len": 256, "batch_tokens": 2 * 256,
                       "window_start": 128, "window_end": 256, "target_val_loss": 2.05})
    log = tmp_path / "r.txt"
    log.write_text(text)
    run = bench.verify.parse_log_text(text)
    row = bench.summarize_log(log, target=7.0, peak_tflops=None)
    assert row["world_size"] == 8 and row["final_loss"] == 2.0311 == run.final_loss
    assert row["train_time_s"] == 18.0 and row["peak_gib"] == 31420 / 1024
    assert (row["compile_s"], row["startup_s"]) == (31.8, 42.9)
    assert row["time_to_target_s"] == 9.0, "the first validation at or below 7.0 is step 100's (6.58)"
    assert row["ms_per_step"] == 90.0
    assert row["gc_ms"] is None, "a log without a gc: line (older trainers, public logs)"
    source = inspect.getsource(bench)
    assert not re.search(r"_RE\b|fullmatch|startswith\(\"(step|hyper|world|warmup|peak)", source), \
        "proxy_speedrun.py parses log lines itself"


def test_the_matmul_peak_is_measured_by_one_function(bench):
    """bench_orthogonalize.py and proxy_speedrun.py divide by the same measured peak."""
    ortho = load_script("benchmarks/bench_orthogonalize.py", "bench_orthogonalize")
    assert ortho.measure_peak_tflops is bench.measure_peak_tflops
    defined = [p.name for p in (ROOT / "benchmarks").glob("*.py") if "def measure_peak" in p.read_text()]
    assert defined == ["proxy_speedrun.py"], defined
    if not torch.cuda.is_available():
        assert bench.measure_peak_tflops() is None, "no GPU, no peak"


def test_table_gives_each_run_its_own_flops_per_token(bench):
    """Side-by-side variants can differ in size: one FLOPs figure for the table would be wrong for all but one."""
    base = {"world_size": 1, "time_to_target_s": None, "final_loss": 2.0, "train_time_s": 90.0, "ms_per_step": 140.0,
                "tokens_per_s": 7e5, "mfu": 0.5, "peak_gib": 20.0, "compile_s": 10.0, "startup_s": 12.0}
    rows = [dict(base, log="L7_0.txt", flops_per_token=552.1e6), dict(base, log="L12_0.txt", flops_per_token=759.2e6)]
    lines = bench.format_table(rows, target=2.04, peak=798.0).splitlines()
    cells = {line.split("|")[1].strip(): line.split("|")[11].strip() for line in lines if line.startswith("| L")}
    assert cells == {"L7_0": "552.1", "L12_0": "759.2"}, lines


def test_table_gives_a_median_per_variant_and_none_across_variants(bench):
    """Runs named NAME_SEED or NAME_sSEED are a variant's seeds: a table of two arms gets each arm's median (the
    arm's own runs only), not one median over both; one arm keeps its plain median row."""
    def row(log, time):
        return {"log": log, "world_size": 1, "time_to_target_s": time, "final_loss": 1.97, "train_time_s": time,
                "ms_per_step": 10 * time, "stage_ms": [time, 2 * time], "tokens_per_s": 1e5, "flops_per_token": 1e6,
                "mfu": 0.5, "peak_gib": 40.0, "compile_s": 40.0, "startup_s": 50.0}
    rows = [row("x/base_s0.txt", 93.0), row("x/base_s1.txt", 95.0), row("y/join_s0.txt", 89.0),
            row("y/join_s1.txt", 89.4), row("y/join_s2.txt", 89.2), row("y/lone_0.txt", 80.0)]
    lines = bench.format_table(rows, 1.98, 779.0).splitlines()
    medians = {line.split("|")[1].strip(): line.split("|")[6].strip() for line in lines if line.startswith("| median")}
    assert medians == {"median base": "94.0", "median join": "89.2"}, lines
    one_arm = bench.format_table(rows[:2], 1.98, 779.0).splitlines()
    assert one_arm[-1].startswith("| median | 1 | - | 94.0 |"), "negative control: one arm, one plain median"
    assert bench.variant_of(Path("a/join_s12.txt")) == "join" and bench.variant_of(Path("a/join_sx.txt")) == "join_sx"


def test_logs_of_earlier_recipes_still_summarize_without_a_flop_count(bench, tmp_path):
    """benchmarks/results holds logs whose hyperparameters this trainer no longer takes (batch_tokens, windows
    from start to end): they still get times and losses, and tokens from their own batch_tokens."""
    from test_verify import our_log
    text = our_log(2.0390, n_steps=200, val_every=100, step_every=1, time_ms=140_000.0,
                   hp={"batch_tokens": 393216, "window_start": 128, "window_end": 1792})
    (tmp_path / "old.txt").write_text(text)
    row = bench.summarize_log(tmp_path / "old.txt", target=3.0, peak_tflops=800.0)
    assert row["final_loss"] == 2.0390 and row["flops_per_token"] is None and row["mfu"] is None
    assert row["tokens_per_s"] == pytest.approx(393216 * 200 / 140.0)


def test_variants_and_seeds_make_one_run_each_with_the_variant_flags_last(bench):
    jobs = bench.plan_runs(["base=", "ns5=--muon_ortho=newton_schulz5 --normuon=false"], runs=2)
    assert jobs == [("base_0", 0, []), ("base_1", 1, []),
                    ("ns5_0", 0, ["--muon_ortho=newton_schulz5", "--normuon=false"]),
                    ("ns5_1", 1, ["--muon_ortho=newton_schulz5", "--normuon=false"])]
    assert bench.plan_runs(["r="], runs=2, first_seed=5) == [("r_5", 5, []), ("r_6", 6, [])], \
        "a later call continues the seeds; its logs must not overwrite the first call's"
    with pytest.raises(SystemExit, match="NAME=FLAGS"):
        bench.plan_runs(["--muon_ortho=newton_schulz5"], runs=1)
    with pytest.raises(SystemExit, match="must differ"):
        bench.plan_runs(["a=", "a=--seed=3"], runs=1)


def test_gpu_groups_are_disjoint_and_one_slot_without_room_for_two(bench):
    assert bench.gpu_groups(8, 1) == [str(g) for g in range(8)]
    assert bench.gpu_groups(8, 2) == ["0,1", "2,3", "4,5", "6,7"]
    assert bench.gpu_groups(8, 3) == ["0,1,2", "3,4,5"], "the two GPUs left over stay idle"
    assert bench.gpu_groups(8, 8) == [None] and bench.gpu_groups(0, 1) == [None]


def test_jobs_in_separate_slots_run_at_the_same_time(bench, tmp_path):
    """Each job marks that it started, then waits for the other's mark: only concurrent jobs both pass."""
    wait_for_other = ("import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).touch(); "
                      "end = time.time() + 20\nwhile not (d / sys.argv[3]).exists() and time.time() < end: "
                      "time.sleep(0.05)\nsys.exit(0 if (d / sys.argv[3]).exists() else 1)")
    commands = {"a": [sys.executable, "-c", wait_for_other, str(tmp_path), "a.mark", "b.mark"],
                "b": [sys.executable, "-c", wait_for_other, str(tmp_path), "b.mark", "a.mark"],
                "c": [sys.executable, "-c", "import sys; print('what went wrong'); sys.exit(3)"]}
    assert bench.run_side_by_side(commands, [None, None], tmp_path) == {"a": 0, "b": 0, "c": 3}
    assert sorted(f.name for f in tmp_path.glob("*.console")) == ["c.console"], "console kept only on failure"
    assert (tmp_path / "c.console").read_text() == "what went wrong\n"


def test_seeds_are_pinned_to_slots_so_every_variant_meets_the_gpus_alike(bench):
    """Seed k of every variant on slot k mod slots (two GPUs of one host can differ by a few percent); one seed
    or one slot: no pinning (any free slot)."""
    jobs = bench.plan_runs(["base=", "abl=--smear=false"], runs=3, first_seed=4)
    assert bench.seed_slots(jobs, 2) == {"base_4": 0, "base_5": 1, "base_6": 0, "abl_4": 0, "abl_5": 1, "abl_6": 0}
    assert bench.seed_slots(jobs, 1) is None
    assert bench.seed_slots(bench.plan_runs(["base=", "abl=--smear=false"], runs=1), 2) is None


def test_slots_start_at_different_variants_so_each_graph_compiles_once(bench):
    """Two slots, four variants, two seeds: slot 0 takes a, b, c, d and slot 1 c, d, a, b (each slot's runs in
    the order it takes them), so no variant is compiled on both slots at once; one slot keeps the plain order."""
    jobs = bench.plan_runs(["a=", "b=", "c=", "d="], runs=2)
    order = bench.staggered(jobs, bench.seed_slots(jobs, 2), 2)
    slot_order = {k: [r for r in order if r.endswith(f"_{k}")] for k in (0, 1)}
    assert slot_order == {0: ["a_0", "b_0", "c_0", "d_0"], 1: ["c_1", "d_1", "a_1", "b_1"]}, slot_order
    assert sorted(order) == sorted(run_id for run_id, _, _ in jobs), "every run, once"
    name_with_underscore = bench.plan_runs(["no_smear=", "default="], runs=2)
    assert bench.staggered(name_with_underscore, bench.seed_slots(name_with_underscore, 2), 2)[:2] == \
        ["no_smear_0", "default_1"], "variants named with underscores"


def test_a_pinned_run_waits_for_its_slot_even_when_another_is_free(bench, tmp_path):
    """Each job writes the CUDA_VISIBLE_DEVICES it got. "c" is pinned to slot 1, held by the slow "b"; slot 0 is
    free early (the fast "a" ends), and an unpinned "c" takes it (negative control)."""
    write = ("import os, sys, time; time.sleep(float(sys.argv[2])); "
             "open(sys.argv[1], 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])")
    for pinned, expected in (({"a": 0, "b": 1, "c": 1}, "1"), (None, "0")):
        commands = {name: [sys.executable, "-c", write, str(tmp_path / name), delay]
                    for name, delay in (("a", "0"), ("b", "1.5"), ("c", "0"))}
        status = bench.run_side_by_side(commands, ["0", "1"], tmp_path, pinned)
        assert status == {"a": 0, "b": 0, "c": 0}, status
        got = {name: (tmp_path / name).read_text() for name in commands}
        assert got["a"] == "0" and got["b"] == "1" and got["c"] == expected, (pinned, got)


def test_a_lease_expects_a_run_to_last_as_long_as_its_variants_runs_did(bench):
    """A machine lent for 100 s (a fake clock): nothing measured, a run starts; then a run of a variant that ran
    is expected to take its later (cached) runs' longest time, else its first run's, and a variant that has not
    run as long as the first run that finished last (a first run compiles its graph, faster once the machine's
    cache holds the others')."""
    now = [0.0]
    lease = bench.Lease(100.0, clock=lambda: now[0])
    assert lease.expected_s("a_0") is None and lease.allows("a_0"), "nothing measured: the run starts"
    assert lease.started("a_0") and not lease.started("a_1") and lease.started("b_0"), "first runs of a variant"
    lease.finished("a_0", 60.0, first=True)
    lease.finished("b_0", 45.0, first=True)
    assert lease.expected_s("a_1") == 60.0 and lease.expected_s("b_1") == 45.0, "a variant's first run"
    assert lease.expected_s("c_0") == 45.0, "a variant not run yet: the first run that finished last"
    lease.finished("a_1", 25.0, first=False)
    assert lease.expected_s("a_2") == 25.0, "a later run found the graph cached: later runs take as long"
    now[0] = 70.0
    assert lease.allows("a_2") and not lease.allows("b_1") and not lease.allows("c_0"), \
        "70 + 25 s ends within the 100 s; 70 + 45 s does not"
    now[0] = 80.0
    assert not lease.allows("a_2"), "80 + 25 s ends after the lease"


def test_runs_that_would_outlast_the_lease_are_not_started(bench, tmp_path):
    """One slot, runs of about 0.3 s each: under a 0.5 s lease the first run starts (nothing measured yet) and the
    next two, each expected to take as long as it did, are left out of the result; under a 60 s lease all three
    run (the negative control)."""
    nap = [sys.executable, "-c", "import time; time.sleep(0.3)"]
    commands = {"a_0": nap, "a_1": nap, "b_0": nap}
    assert bench.run_side_by_side(commands, [None], tmp_path, lease=bench.Lease(0.5)) == {"a_0": 0}
    assert bench.run_side_by_side(commands, [None], tmp_path, lease=bench.Lease(60.0)) == \
        {"a_0": 0, "a_1": 0, "b_0": 0}


def test_runs_left_by_the_lease_are_named_and_the_command_fails_so_it_is_run_again(bench, tmp_path, capsys,
                                                                                  monkeypatch):
    """The runs a lease did not start are named in one line, left out of the table (no "no usable log" for them),
    and the exit status is 1, so a script sees that the same command must run again; a lease of 0 s is refused."""
    seen = []
    monkeypatch.setattr(bench, "run_side_by_side", lambda commands, groups, log_dir, slot_of, lease:
                        seen.append(lease) or {})
    args = ["--data", str(tmp_path), "--nproc", "1", "--runs", "2", "--peak_tflops", "1", "--log_dir",
            str(tmp_path / "logs")]
    assert bench.main([*args, "--lease_s", "300", "--", "--preset=tiny"]) == 1
    out = capsys.readouterr().out
    assert isinstance(seen[0], bench.Lease) and 290 < seen[0].end - time.perf_counter() <= 300, "the lease, passed"
    assert "not started, expected to end after the lease (--lease_s=300): run_0, run_1;" in out, out
    assert "no usable log" not in out, out
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*args, "--lease_s", "0"])
    assert exit_info.value.code == 2 and "--lease_s=0: the seconds the machine is lent for" in capsys.readouterr().err


def test_the_gpu_a_run_used_goes_from_its_log_header_to_the_table(bench, monkeypatch, tmp_path):
    """The trainer's header names its GPU by bus id and UUID as nvidia-smi prints them; verify.py reads the line,
    the table shows the bus id's short form and ablations.py compares UUIDs; a CPU run writes no such line, and
    an older log shows '-'."""
    import types

    import torch
    import train_gpt
    from test_verify import our_log
    props = types.SimpleNamespace(name="NVIDIA H200", pci_domain_id=0, pci_bus_id=0, pci_device_id=7)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    header = train_gpt.environment_report(torch.device("cuda", 1))
    assert "gpu: NVIDIA H200, bus 00000000:00:07.0" in header.splitlines(), "a torch without the UUID: the bus"
    props.uuid = "8f1c0d2e-0000-4000-8000-000000000007"  # torch prints it without nvidia-smi's "GPU-"
    header = train_gpt.environment_report(torch.device("cuda", 1))
    line = "NVIDIA H200, bus 00000000:00:07.0, uuid GPU-8f1c0d2e-0000-4000-8000-000000000007"
    assert f"gpu: {line}" in header.splitlines(), header
    assert (bench.gpu_bus(line), bench.gpu_uuid(line)) == ("00:07.0", "GPU-8f1c0d2e-0000-4000-8000-000000000007")
    assert bench.gpu_uuid("NVIDIA H200, bus 00000000:00:07.0") is None, "an older log's line names no UUID"
    assert not any(line.startswith("gpu:") for line in train_gpt.environment_report(torch.device("cpu")).splitlines())
    text = our_log(2.0, n_steps=10, val_every=10, step_every=1, time_ms=1000.0)
    new = text.replace("\n" + train_gpt.RULE + "\nhyperparameters", "\ngpu: NVIDIA H200, bus 00000000:00:07.0\n"
                       + train_gpt.RULE + "\nhyperparameters", 1)
    assert new != text, "the test log has the header this inserts into"
    (tmp_path / "new.txt").write_text(new)
    (tmp_path / "old.txt").write_text(text)
    assert bench.verify.parse_log(tmp_path / "new.txt").gpu == "NVIDIA H200, bus 00000000:00:07.0"
    rows = [bench.summarize_log(tmp_path / f"{name}.txt", target=3.0, peak_tflops=1.0) for name in ("new", "old")]
    assert [r["gpu"] for r in rows] == ["00:07.0", None]
    table = bench.format_table(rows, 3.0, 1.0)
    assert "| new | 1 | 00:07.0 |" in table and "| old | 1 | - |" in table, table


def test_each_variant_run_logs_its_own_flags(bench, tiny_corpus, tmp_path, capsys):
    import json
    args = ["--data", str(tiny_corpus["dir"]), "--nproc", "1", "--target", "20", "--peak_tflops", "1",
            "--log_dir", str(tmp_path), "--variant", "base=", "--variant", "ns5=--muon_ortho=newton_schulz5", "--",
            "--preset=tiny", *tiny_corpus["flags"],
            "--num_iterations=3", "--val_loss_every=0", "--warmup_steps=0"]
    assert bench.main(args) == 0
    orthos = {}
    for run_id in ("base_0", "ns5_0"):
        line = next(x for x in (tmp_path / f"{run_id}.txt").read_text().splitlines()
                    if x.startswith("hyperparameters: "))
        orthos[run_id] = json.loads(line.split(": ", 1)[1])["muon_ortho"]
    assert orthos == {"base_0": "turbo_muon", "ns5_0": "newton_schulz5"}, "the default, and the variant's flag"
    assert "| base_0 |" in capsys.readouterr().out


def test_rerunning_a_command_keeps_finished_runs_and_starts_unfinished_ones_over(bench, tiny_corpus, tmp_path,
                                                                                 capsys, monkeypatch):
    """The same command again (a device call that ended mid-run, a crash) runs only what did not finish: a
    finished log of this configuration is kept; a cut-off log is set aside as .unfinished-1 and its run done
    again; a finished log of another configuration under the same name is refused, naming the field; finished
    logs copied into another --log_dir, or renamed from another run id, are kept there (a log's folder and name
    are not its configuration), but a copy under another seed's name is refused."""
    args = ["--data", str(tiny_corpus["dir"]), "--nproc", "1", "--runs", "2", "--target", "20", "--peak_tflops",
            "1", "--log_dir", str(tmp_path), "--variant", "base=", "--", "--preset=tiny", *tiny_corpus["flags"],
            "--num_iterations=3", "--val_loss_every=0", "--warmup_steps=0"]
    assert bench.main(args) == 0
    first = {run_id: (tmp_path / f"{run_id}.txt").read_text() for run_id in ("base_0", "base_1")}
    (tmp_path / "base_1.txt").write_text(first["base_1"][: len(first["base_1"]) // 2])  # killed mid-run
    launched = []
    real_run = bench.run_side_by_side
    monkeypatch.setattr(bench, "run_side_by_side", lambda commands, *a: launched.append(list(commands))
                        or real_run(commands, *a))
    capsys.readouterr()
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert launched == [["base_1"]], launched
    assert (tmp_path / "base_0.txt").read_text() == first["base_0"], "the finished run is kept as it was"
    assert (tmp_path / "base_1.txt.unfinished-1").read_text() == first["base_1"][: len(first["base_1"]) // 2]
    assert bench.whole_run(bench.verify.parse_log(tmp_path / "base_1.txt")) and "| base_0 |" in out \
        and "| base_1 |" in out, out
    with pytest.raises(SystemExit, match="base_0.txt: a finished run of another configuration .*muon_lr"):
        bench.main([*args, "--muon_lr=0.03"])
    assert launched == [["base_1"]], "nothing launched for a refused command"
    moved = tmp_path / "fetched"  # the logs brought back from a lent machine into another folder
    moved.mkdir()
    for run_id in ("base_0", "base_1"):
        (moved / f"{run_id}.txt").write_text((tmp_path / f"{run_id}.txt").read_text())
    at = args.index("--log_dir") + 1
    assert bench.main([*args[:at], str(moved), *args[at + 1:]]) == 0
    assert launched == [["base_1"], []], "logs in another folder than they were written in are kept there"
    renamed = tmp_path / "renamed"  # logs of a run id of another naming (NAME_sSEED), renamed to this command's
    renamed.mkdir()
    for run_id in ("base_0", "base_1"):
        text = (tmp_path / f"{run_id}.txt").read_text()
        other_name = text.replace(f'"run_id": "{run_id}"', f'"run_id": "{run_id[:-1]}s{run_id[-1]}"')
        assert other_name != text, "the log names its run id where this replaces it"
        (renamed / f"{run_id}.txt").write_text(other_name)
    assert bench.main([*args[:at], str(renamed), *args[at + 1:]]) == 0
    assert launched == [["base_1"], [], []], "a renamed log of the same configuration and seed is kept"
    (renamed / "base_1.txt").write_text((renamed / "base_0.txt").read_text())
    with pytest.raises(SystemExit, match="base_1.txt: a finished run of another configuration .*seed"):
        bench.main([*args[:at], str(renamed), *args[at + 1:]])


def test_a_run_without_a_log_is_reported_and_the_others_still_get_their_table(bench, tiny_corpus, tmp_path,
                                                                              capsys):
    args = ["--preset=tiny", *tiny_corpus["flags"],
            f"--log_dir={tmp_path}", "--run_id=ok", "--num_iterations=3", "--val_loss_every=0", "--warmup_steps=0"]
    import train_gpt
    assert train_gpt.main(args) == 0
    status = bench.main(["--logs", str(tmp_path / "ok.txt"), str(tmp_path / "crashed.txt"), "--peak_tflops", "1"])
    out = capsys.readouterr().out
    assert status == 1, "a missing log fails the command"
    assert "crashed.txt: no usable log" in out and "| ok |" in out, out


@pytest.fixture(scope="module")
def profile_step():
    return load_script("benchmarks/profile_step.py", "profile_step")


def test_device_idle_is_the_span_minus_the_union_of_kernels(profile_step):
    """Overlapping kernels count once; the gaps between them are idle."""
    assert profile_step.busy_time([(0, 10), (5, 15), (20, 30), (29, 31)]) == (31, 26)
    assert profile_step.busy_time([]) == (0.0, 0.0)
    assert profile_step.busy_time([(3, 4)]) == (1, 1)


def test_gap_summary_classes_idle_gaps_by_length_and_names_the_kernels_around_the_longest(profile_step):
    """Gaps are counted after the latest end so far (a kernel overlapping a longer one leaves none), classed by
    length in microseconds (times in ns), and the longest listed with the kernels before and after."""
    kernels = [(0, 1000, "a"), (500, 4000, "b"), (3000, 3500, "c"),  # c inside b: no gap after c
               (9000, 10000, "d"),  # 5 us after b
               (60000, 61000, "e"),  # 50 us after d
               (400000, 400100, "f")]  # 339 us after e
    summary = profile_step.gap_summary(kernels, top=2)
    assert summary["count"] == 6
    assert summary["by_class"] == [(0.0, 10.0, 1, 5000), (10.0, 100.0, 1, 50000), (100.0, float("inf"), 1, 339000)]
    assert summary["longest"] == [(339000, "e", "f", 61000), (50000, "d", "e", 10000)], "gap, around, where"
    assert profile_step.gap_summary([]) == dict(count=0, by_class=[(lo, hi, 0, 0) for lo, hi in profile_step.GAP_CLASSES],
                                                longest=[])
    lines = profile_step.gap_lines(summary, steps=1)
    assert lines[0].split()[-1] == "6" and "0.34 ms (1 gaps per step)" in lines[3], lines
    assert "339.0 us at     0.1 ms, after e, before f" in lines[4], lines
    name = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1> >"
    assert "FillFunctor" in profile_step.kernel_label(name), "the functor that tells kernels apart stays in the label"


def test_host_during_a_gap_names_the_calls_that_cover_it_innermost_first(profile_step):
    """While the device waited from 100 to 200 (ns), the host events covering at least half of that are listed,
    the innermost (shortest) first: the synchronization inside the copy inside the step. A launch inside the
    window covers too little (negative control), as does a call that ended before it; with only such events the
    answer is empty, and the report says no single call holds the host."""
    events = [(0, 1000, "step"), (90, 210, "aten::copy_"), (95, 205, "cudaStreamSynchronize"),
              (120, 130, "cudaLaunchKernel"), (0, 90, "earlier")]
    assert profile_step.host_during(100, 200, events) == [("cudaStreamSynchronize", 110), ("aten::copy_", 120),
                                                          ("step", 1000)]
    assert profile_step.host_during(100, 200, events, top=1) == [("cudaStreamSynchronize", 110)]
    assert profile_step.host_during(100, 200, events[3:]) == [], "short or earlier calls do not explain the gap"
    summary = dict(count=2, by_class=[], longest=[(100, "a", "b", 50), (80, "b", "c", 300)],
                   host=[[("cudaStreamSynchronize", 110)], []])
    lines = profile_step.gap_lines(summary, steps=1)
    assert lines[-3].strip() == "host meanwhile: cudaStreamSynchronize 0.1 us", lines
    assert lines[-1].strip() == "host meanwhile: no single call (Python between launches)", lines


def test_device_gaps_reads_kernels_and_host_calls_from_one_profile_clock(profile_step):
    """device_gaps on a stand-in for torch.profiler's results: kernels at 1000-1100 and 1300-1400 ns leave a
    200 ns gap that a host synchronization at 1090-1310 covers; a user annotation on the device is not a kernel."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    class Event:
        def __init__(self, start, end, name, device, annotation=False):
            self.start_ns, self.end_ns = lambda: start, lambda: end
            self.name, self.device_type, self.is_user_annotation = lambda: name, lambda: device, lambda: annotation
    events = [Event(1000, 1100, "gemm", cuda), Event(1300, 1400, "copy", cuda), Event(1050, 1500, "range", cuda, True),
              Event(1090, 1310, "cudaStreamSynchronize", cpu), Event(900, 2000, "train_step", cpu)]
    prof = SimpleNamespace(profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events)))
    gaps = profile_step.device_gaps(prof)
    assert gaps["count"] == 2 and gaps["longest"] == [(200, "gemm", "copy", 100)], gaps
    assert gaps["host"] == [[("cudaStreamSynchronize", 220), ("train_step", 1100)]], gaps["host"]


def test_exposed_communication_is_the_part_no_compute_kernel_covers(profile_step):
    comm = [(0, 10), (5, 12), (20, 30), (40, 50)]        # union: [0, 12], [20, 30], [40, 50] = 32
    compute = [(2, 4), (3, 6), (11, 25), (29, 41), (60, 70)]
    # compute covers [2, 6] 4 + [11, 12] 1 + [20, 25] 5 + [29, 30] 1 + [40, 41] 1 = 12 of it
    total, exposed = profile_step.exposed_time(comm, compute)
    assert (total, exposed) == (32, 20), (total, exposed)
    assert profile_step.exposed_time(comm, []) == (32, 32), "nothing to hide behind: all exposed"
    assert profile_step.exposed_time([], compute) == (0, 0)
    assert profile_step.exposed_time([(0, 10)], [(-5, 20)]) == (10, 0), "fully hidden"


def test_profile_step_reports_every_phase_of_a_tiny_cpu_step(profile_step, tiny_corpus, capsys):
    """The script end to end on the tiny preset (CPU): the phase table has forward, the loader's hand-out, Adam and
    Muon, each part of the step and with the host's time beside it (the remainder and the total without); the
    timed steps' gc: line is there, the GPU-only lines (device idle, gaps, allocator calls) are not."""
    argv = ["--warmup", "1", "--time_steps", "1", "--steps", "1", "--top", "3", "--start_step", "5", "--",
            "--preset=tiny", *tiny_corpus["flags"]]
    assert profile_step.main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.split("by phase")[1].splitlines()[1:7]}
    assert set(rows) == {"adam", "forward", "loader", "muon", "backward+loss+other", "total"}, out
    total = float(rows["total"][1])
    for name in ("adam", "forward", "loader", "muon", "backward+loss+other"):
        assert 0 < float(rows[name][1]) < total, f"phase {name} ran and is part of the step: {out}"
    for name in ("adam", "forward", "loader", "muon"):
        assert rows[name][3] == "host" and float(rows[name][4]) > 0, f"phase {name}'s host time: {rows[name]}"
    assert "host" not in rows["total"] and "host" not in rows["backward+loss+other"], "no host time of their own"
    assert "gc: " in out and "device idle" not in out and "allocator:" not in out, "GPU-only lines on a CPU run"


def test_plot_draws_each_variants_loss_against_time_in_one_color(bench, tmp_path, capsys, monkeypatch):
    from test_verify import our_log
    logs = []
    for name, loss, seed in (("base", 3.30, 0), ("base", 3.31, 1), ("ns5", 3.29, 0)):
        logs.append(tmp_path / f"{name}_{seed}.txt")
        logs[-1].write_text(our_log(loss, seed=seed, n_steps=200, val_every=50, time_ms=20_000.0 + seed))
    assert [bench.variant_of(p) for p in logs] == ["base", "base", "ns5"], "NAME_SEED.txt: variant NAME"
    assert bench.variant_of(tmp_path / "x.txt") == "x"
    png = tmp_path / "cmp.png"
    bench.main(["--logs", *map(str, logs), "--plot", str(png), "--peak_tflops=1"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out
    monkeypatch.setattr(bench.verify, "_pyplot", lambda: None)
    assert bench.main(["--logs", *map(str, logs), "--plot", str(tmp_path / "no.png"), "--peak_tflops=1"]) == 1
    assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "no.png").exists()


def test_fused_kernel_benchmark_runs_every_case_and_reports_agreement(capsys):
    """benchmarks/bench_fused.py at tiny shapes on CPU (the torch paths of the fused ops, eager): each case (MLP,
    MLP with the FP8 up-projection, head, DC) times both arms, and the fused arm agrees with the plain one (equal
    outputs; gradients within e5m2 rounding for the head, equal for the MLP's weights; the FP8 arm within e4m3's
    rounding, and not equal); so the GPU run of it will not fail on a typo."""
    fused = load_script("benchmarks/bench_fused.py", "bench_fused")
    tiles = fused.train_gpt.MLP_MATMUL_CONFIG
    launch, forms = fused.train_gpt.CE_LAUNCH, fused.train_gpt.CE_PASS_MATH
    transpose_launch = fused.train_gpt.TRANSPOSE_LAUNCH
    rows, sweep, ce_sweep, transposes = fused.main(["--device", "cpu", "--tokens", "64", "--dim", "64", "--hidden", "256",
                                        "--vocab", "512", "--no_compile", "--reps", "2",
                                        "--mlp_configs", "32,32,32,4,1;64,64,32,4,2;128,256,64,8,4",
                                        "--shared_mem_limit", "232448", "--ce_configs", "4096,8;1024,4",
                                        "--ce_pass_math", "exact,exact;tanh,tanh",
                                        "--transpose_configs", "64,64,4;128,64,8"])
    assert [r["case"] for r in rows] == ["mlp", "mlp fp8", "mlp fp8 down", "qkv fp8", "head", "dc"]
    for r in rows:
        bound = 0.1 if "fp8" in r["case"] else 1e-5  # e4m3's rounding of the products' operands
        assert r["plain_ms"] > 0 and r["fused_ms"] > 0 and r["output_difference"] < bound, r
        assert max(r["gradient_differences"]) < (0.1 if r["case"] == "mlp fp8" else 0.05), r
    assert all(rows[i]["output_difference"] > 1e-4 for i in (1, 2, 3)), "the fp8 arms must round (not the bf16 path)"
    assert max(rows[2]["gradient_differences"] + rows[3]["gradient_differences"]) < 1e-6, (
        "--fp8_mlp_down's and --fp8_qkv's backward is the bf16 one")
    assert [r["config"] for r in sweep] == [(32, 32, 32, 4, 1), (64, 64, 32, 4, 2), (128, 256, 64, 8, 4)]
    assert "skipped" in sweep[2] and "skipped" not in sweep[0], "a tile over the shared-memory limit must be skipped"
    for r in sweep[:2]:  # bf16 outputs against float32 references
        assert r["forward_ms"] > 0 and r["forward_error"] < 1e-2 and r["backward_error"] < 1e-2, r
    out = capsys.readouterr().out
    assert "| mlp |" in out and "| 64,64,32,4,2 |" in out
    assert fused.train_gpt.MLP_MATMUL_CONFIG == tiles, "the sweep restores the trainer's tiles"
    assert [(r["config"], r["pass_math"]) for r in ce_sweep] == [
        ((4096, 8), ("exact", "exact")), ((4096, 8), ("tanh", "tanh")), ((1024, 4), ("exact", "exact")),
        ((1024, 4), ("tanh", "tanh"))]
    assert fused.train_gpt.CE_LAUNCH == launch and fused.train_gpt.CE_PASS_MATH == forms, "restored"
    assert all(r["ms"] > 0 and r["loss_difference"] < 1e-6 and r["gradient_difference"] < 1e-6 for r in ce_sweep)
    assert "| 1024,4 | tanh,tanh |" in out
    assert [(r["config"], r["exact"]) for r in transposes] == [((64, 64, 4), True), ((128, 64, 8), True)]
    assert fused.train_gpt.TRANSPOSE_LAUNCH == transpose_launch and "| 128,64,8 |" in out


def test_kernel_sass_counts_the_loss_kernels_loops(capsys):
    """benchmarks/kernel_sass.py compiles the loss kernel for sm_90 here and reports its two column loops (the
    loss pass and the gradient pass), each with its special-function (MUFU) instructions."""
    import train_gpt
    if not train_gpt.HAS_TRITON or train_gpt._kernels_interpreted():
        pytest.skip("needs Triton's compiler (not the interpreter)")
    pytest.importorskip("triton.backends.nvidia")
    kernel_sass = load_script("benchmarks/kernel_sass.py", "kernel_sass")
    rows = kernel_sass.main(["--pass_math", "exact,exact"])
    assert len(rows) == 2 and all(0 < r["mufu"] < r["instructions"] for r in rows), rows
    assert rows[0]["instructions"] < rows[1]["instructions"], "the gradient pass does more per column"
    assert "loop 1:" in capsys.readouterr().out
    tanh = kernel_sass.main(["--pass_math", "tanh,tanh"])
    assert [3 * r["mufu"] for r in tanh] == [2 * r["mufu"] for r in rows], (
        f"the tanh form takes 2 MUFU instructions per column where the exact one takes 3: {tanh} against {rows}")
    # each pass takes its own form: the loss pass is loop 0, the gradient pass loop 1
    loss_only, grad_only = (kernel_sass.main(["--pass_math", forms]) for forms in ("tanh,exact", "exact,tanh"))
    assert [r["mufu"] for r in loss_only] == [tanh[0]["mufu"], rows[1]["mufu"]], loss_only
    assert [r["mufu"] for r in grad_only] == [rows[0]["mufu"], tanh[1]["mufu"]], grad_only


def test_the_fineweb_schedule_estimate_counts_each_stages_steps_at_the_runs_step_times(bench):
    """A proxy run compresses the schedule; its per-stage step times carry over to the track's FineWeb schedule
    (the trainer's default steps, stage starts at the same fractions, the same extension): 1270 + 15 steps
    start their stages at 0, 423 and 847. A stage without a measured time gives no estimate."""
    import train_gpt
    hp = train_gpt.parse_args(["--num_iterations=190"])
    assert bench.fineweb_iterations("small") == 1270
    got = bench.schedule_estimate_s(hp, [200.0, 400.0, 600.0, 700.0], 1270)
    assert got == pytest.approx((423 * 200 + 424 * 400 + 423 * 600 + 15 * 700) / 1000), got
    assert bench.schedule_estimate_s(hp, [200.0, 400.0, 600.0, None], 1270) is None
    assert bench.schedule_estimate_s(hp, None, 1270) is None
    assert bench.fineweb_iterations("medium") > 1270, "the medium track's longer schedule"
