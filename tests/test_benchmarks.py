"""benchmarks/proxy_speedrun.py: FLOP accounting and the numbers it reads from a real training log."""
import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/proxy_speedrun.py", "proxy_speedrun")


def test_flops_per_token_counts_weights_and_windowed_attention(bench):
    import train_gpt
    hp = train_gpt.parse_args(["--preset=tiny", "--window_start=256", "--window_end=256"])
    # 4 layers: layers 0 and 3 see the 256-token window, layers 1 and 2 half of it; causal halves again.
    attended = (2 * 256 + 2 * 128) / 4 / 2
    weights = 4 * (4 * 64 * 64 + 2 * 4 * 64 * 64) + 50304 * 64
    assert bench.flops_per_token(hp) == pytest.approx(6 * weights + 12 * 4 * 64 * attended)


def test_summary_of_a_cpu_log_matches_its_lines(bench, tiny_corpus, tmp_path):
    import train_gpt
    args = ["--preset=tiny", f"--train_files={tiny_corpus['train']}", f"--val_files={tiny_corpus['val']}",
            f"--log_dir={tmp_path}", "--run_id=r", "--num_iterations=4", "--val_loss_every=2", "--warmup_steps=0"]
    assert train_gpt.main(args) == 0
    log = tmp_path / "r.txt"
    row = bench.summarize_log(log, target=20.0, peak_tflops=1.0)
    assert row["time_to_target_s"] == 0.0, "the step-0 loss (10.8) is already below a target of 20"
    assert bench.summarize_log(log, target=0.01, peak_tflops=None)["time_to_target_s"] is None
    assert row["ms_per_step"] > 0 and row["tokens_per_s"] == pytest.approx(512 / row["ms_per_step"] * 1000)
    finals = [line for line in log.read_text().splitlines() if line.startswith("step:4/4 val_loss:")]
    assert row["final_loss"] == float(finals[-1].split("val_loss:")[1].split()[0])
    assert row["compile_s"] is not None and row["startup_s"] >= row["compile_s"]
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 1e12)


def test_logs_from_before_the_layer_pattern_still_summarize(bench):
    """benchmarks/results holds logs that name `long_window_every` instead of `layer_attention`."""
    import dataclasses
    import train_gpt
    logged = dataclasses.asdict(train_gpt.parse_args([]))
    del logged["layer_attention"]
    logged["long_window_every"] = 4
    hp = bench.hyperparameters_of_log(logged)
    assert hp.layer_attention == "LSSSLSSSLSSL", "long windows at 0, 4, 8 and the last layer; attention in all"


@pytest.fixture(scope="module")
def profile_step():
    return load_script("benchmarks/profile_step.py", "profile_step")


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
    argv = ["--warmup", "1", "--time_steps", "1", "--steps", "1", "--top", "3", "--start_step", "5", "--",
            "--preset=tiny", f"--train_files={tiny_corpus['train']}", f"--val_files={tiny_corpus['val']}"]
    assert profile_step.main(argv) == 0
    out = capsys.readouterr().out
    phases = dict(line.split()[:2] for line in out.split("by phase")[1].splitlines()[1:6])
    assert set(phases) == {"adam", "forward", "muon", "backward+loss+other", "total"}, out
    for name in ("adam", "forward", "muon", "backward+loss+other"):
        assert 0 < float(phases[name]) < float(phases["total"]), f"phase {name} ran and is part of the step: {out}"
