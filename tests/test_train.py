"""End to end on CPU: tiny runs learn, log in the speedrun format, are deterministic, give the same
losses on 1, 2 and 4 processes, and fail clearly (non-zero exit, log kept) on bad input and NaN loss."""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (ROOT, SMALL_BOS, SMALL_VOCAB_FLAGS, load_script, run_gloo_ranks, shared_code_only,
                      synthetic_tokens, write_shard)

RULE = "=" * 100
# The log grammar is written down once, in records/verify.py; these tests read logs through it.
verify = load_script("records/verify.py", "records_verify")


def _args(corpus, log_dir, run_id, *extra):
    return ["--preset=tiny", *corpus["flags"],
            f"--log_dir={log_dir}", f"--run_id={run_id}", "--num_iterations=6", "--val_loss_every=3",
            "--warmup_steps=1", *extra]


def _log_lines(log_dir, run_id):
    return (log_dir / f"{run_id}.txt").read_text().splitlines()


def _run(log_dir, run_id):
    return verify.parse_log(log_dir / f"{run_id}.txt")


def _val_losses(log_dir, run_id):
    return {p.step: p.val_loss for p in _run(log_dir, run_id).val_points}


def _torchrun(trainer, nproc: int, args: list[str]) -> None:
    """The trainer file on `nproc` gloo processes (torchrun, one thread each); fails the test with its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / f"{trainer.__name__}.py"), *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_run_learns_and_writes_a_speedrun_log(trainer, tiny_corpus, tmp_path):
    """Twenty steps of the tiny preset: the loss falls, and the log has the public grammar."""
    assert trainer.main(_args(tiny_corpus, tmp_path, "run", "--num_iterations=20", "--val_loss_every=10")) == 0
    lines = _log_lines(tmp_path, "run")
    source = (ROOT / f"{trainer.__name__}.py").read_text()
    run = _run(tmp_path, "run")
    assert run.source == source.rstrip("\n") and lines[:len(source.splitlines())] == source.splitlines(), \
        "the log begins with the trainer's own source"
    after = lines[len(source.splitlines()):]
    assert after[0] == RULE and RULE in after[1:], "source, rule, versions and nvidia-smi, rule"
    total = trainer.total_steps(trainer.parse_args(_args(tiny_corpus, tmp_path, "run", "--num_iterations=20")))
    assert total == 20 + trainer.PRESETS["tiny"]["flags"]["extension_steps"], "the extension steps follow the 20"
    assert [p.step for p in run.step_points] == list(range(1, total + 1)), "one line per step"
    train_lines = [line for line in after if line.startswith("step:") and " train_loss:" in line]
    assert [line.split()[0] for line in train_lines] == [f"step:{k}/{total}" for k in range(1, total + 1)], \
        "every step line carries the step's train loss"
    train_losses = [float(line.split("train_loss:")[1].split()[0]) for line in train_lines]
    assert train_losses[-1] < train_losses[0] - 1.0, f"the train loss falls: {train_losses}"
    assert after.index(train_lines[9]) < after.index(next(x for x in after if x.startswith("step:10/") and "val_loss" in x)), \
        "a step's line comes before its validation's"
    losses = {p.step: p.val_loss for p in run.val_points}
    assert sorted(losses) == [0, 10, 20, total], "validation at step 0, every val_loss_every steps and at the end"
    decimals = {p.decimals for p in run.val_points}
    track = trainer.parse_args([]).track
    assert decimals == {trainer.VAL_LOSS_DECIMALS[track]}, f"val_loss printed with {decimals} decimals ({track} track)"
    assert losses[total] < losses[10] < losses[0] - 1.0 and losses[total] < losses[0] - 1.5, \
        f"loss should fall well below the uniform ln(256): {losses}"
    assert run.output[-1].startswith("peak memory allocated: ") and run.peak_memory_mib, "the log ends with peak memory"
    t = run.timings_s
    assert t.keys() == {"warmup_and_compile_time", "first_train_step", "first_val_forward", "startup_time"}, t
    assert t["first_train_step"] + t["first_val_forward"] <= t["warmup_and_compile_time"] + 0.1 \
        <= t["startup_time"] + 0.1, f"the compile phases are parts of the warm-up, the warm-up of startup: {t}"


@shared_code_only
def test_same_seed_gives_the_same_losses(trainer, tiny_corpus, tmp_path):
    for run in ("a", "b"):
        assert trainer.main(_args(tiny_corpus, tmp_path, run, "--seed=3")) == 0
    a, b = (_val_losses(tmp_path, r) for r in ("a", "b"))
    assert a == b, f"same seed, different losses: {a} vs {b}"
    assert trainer.main(_args(tiny_corpus, tmp_path, "c", "--seed=4")) == 0
    assert _val_losses(tmp_path, "c") != a, "negative control: another seed changes the run"


@shared_code_only
def test_one_and_two_processes_give_the_same_losses(trainer, tiny_corpus, tmp_path):
    """Gradient accumulation on one process (a row per pass) equals data parallelism on two (gloo): same
    tokens, same averaged gradients, same sharded optimizer math; only float summation order differs."""
    one_row_per_pass = "--micro_batch_tokens=0"
    assert trainer.main(_args(tiny_corpus, tmp_path, "one", one_row_per_pass)) == 0
    _torchrun(trainer, 2, _args(tiny_corpus, tmp_path, "two", one_row_per_pass))
    # One process joining its rows into one forward per step (--micro_batch_tokens, 65536 by default on the small
    # track: all of the tiny preset's 2 / 4 / 2 rows per step) keeps the rows' math: the same losses again.
    assert trainer.main(_args(tiny_corpus, tmp_path, "joined", "--micro_batch_tokens=4096")) == 0
    one, two, joined = (_val_losses(tmp_path, r) for r in ("one", "two", "joined"))
    assert one.keys() == two.keys() == joined.keys()
    for step in one:
        assert abs(one[step] - two[step]) < 2e-3, f"step {step}: 1 process {one[step]}, 2 processes {two[step]}"
        assert abs(one[step] - joined[step]) < 2e-3, f"step {step}: rows one by one {one[step]}, joined {joined[step]}"
    assert "world_size:2 grad_accum:1" in "\n".join(_log_lines(tmp_path, "two"))
    assert "rows_per_micro_batch:2,4,2" in "\n".join(_log_lines(tmp_path, "joined"))
    assert "rows_per_micro_batch:1,1,1" in "\n".join(_log_lines(tmp_path, "one")), "the control joins nothing"


@shared_code_only
def test_four_processes_joining_their_rows_give_the_one_process_losses(trainer, tiny_corpus, tmp_path):
    """Data parallelism on four gloo processes equals one process (issue 17: the same math on 1 to 8 GPUs), with
    each rank joining its own rows: a batch of 4 / 8 / 4 rows per stage runs as 1 / 2 / 1 rows per rank (the
    second stage's two in one pass), Muon's matrices and Adam's state sharded four ways, the validation split
    over four ranks; one process joins all of a step's rows in one pass. Only float summation order differs."""
    batch = "--stage_batch_tokens=1024,2048,2048"  # the tiny preset's rows of 256 / 256 / 512 tokens: 4 / 8 / 4
    assert trainer.main(_args(tiny_corpus, tmp_path, "one", batch)) == 0
    _torchrun(trainer, 4, _args(tiny_corpus, tmp_path, "four", batch))
    one, four = _val_losses(tmp_path, "one"), _val_losses(tmp_path, "four")
    assert one.keys() == four.keys() and len(one) >= 3, (one, four)
    for step in one:
        assert abs(one[step] - four[step]) < 2e-3, f"step {step}: 1 process {one[step]}, 4 processes {four[step]}"
    assert "world_size:4 grad_accum:1,2,1 rows_per_micro_batch:1,2,1" in "\n".join(_log_lines(tmp_path, "four"))
    assert "world_size:1 grad_accum:4,8,4 rows_per_micro_batch:4,8,4" in "\n".join(_log_lines(tmp_path, "one"))


def first_backward_grads(rank, world_size, module, *corpus_flags):
    """Every parameter's gradient after this rank's first micro-batch backward of step 0 (tiny preset,
    2 micro-batches per step: gradient accumulation on 1 rank, one each on 2; rows not joined, or 1 rank would
    take both in one pass)."""
    trainer = importlib.import_module(module)
    hp = trainer.parse_args(["--preset=tiny", "--micro_batch_tokens=0", *corpus_flags])
    run = trainer.Trainer(hp, rank, world_size, torch.device("cpu"))
    loader = trainer.DistributedTrainLoader(hp, rank, world_size, torch.device("cpu"),
                                            trainer.row_specs(range(1), hp, run.derived))
    grads = {}

    def record_first(name):
        def hook(p):
            if name not in grads:
                grads[name] = p.grad.detach().clone()
        return hook

    for name, p in run.model.named_parameters():
        p.register_post_accumulate_grad_hook(record_first(name))
    run.train_step(0, loader)
    return grads


def collectives_by_phase(rank, world_size, module, log_dir, *corpus_flags):
    """(phase, collective, dtype, numel) of every collective of a tiny run: phase "before" (set-up and
    warm-up), "timed" (the timed loop's train steps) or "validation"."""
    import time

    import torch.distributed as dist
    trainer = importlib.import_module(module)
    hp = trainer.parse_args(["--preset=tiny", *corpus_flags, f"--log_dir={log_dir}", "--num_iterations=4",
                             "--val_loss_every=0", "--warmup_steps=2"])
    phase, calls = ["before"], set()

    def recorded(name):
        original = getattr(dist, name)

        def call(tensor, *args, **kwargs):
            calls.add((phase[0], name, str(tensor.dtype), tensor.numel()))
            return original(tensor, *args, **kwargs)
        return call

    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast"):
        setattr(dist, name, recorded(name))
    evaluate = trainer.Trainer.evaluate

    def marked_evaluate(self, step, final=False):
        saved, phase[0] = phase[0], "validation"
        try:
            return evaluate(self, step, final)
        finally:
            phase[0] = saved
    trainer.Trainer.evaluate = marked_evaluate

    def log(line, console=True):
        if line.startswith("warmup_and_compile_time:"):
            phase[0] = "timed"
    trainer.train(hp, rank, world_size, torch.device("cpu"), log, time.perf_counter())
    return sorted(calls)


@shared_code_only
def test_warm_up_runs_every_collective_of_a_timed_step(trainer, tiny_corpus, tmp_path):
    """A collective's first call can take seconds (on 2xH200 the second timed step once took 6.1 s when
    the loss all-reduce first ran inside the timed loop): every collective a timed train step calls,
    with its dtype and size, must already have run in the untimed warm-up."""
    calls = run_gloo_ranks("test_train:collectives_by_phase", 2, tmp_path, trainer.__name__,
                           str(tmp_path / "logs"), *tiny_corpus["flags"])[0]
    before = {c[1:] for c in calls if c[0] == "before"}
    timed = {c[1:] for c in calls if c[0] == "timed"}
    assert timed, f"no collectives recorded in the timed loop: {calls}"
    assert timed <= before, f"first called inside the timed loop: {sorted(timed - before)}"


@shared_code_only
def test_every_world_size_backpropagates_the_same_values(trainer, tiny_corpus, tmp_path):
    """Micro-batch 0 of step 0 is rank 0's only micro-batch on 2 ranks and the first of two on 1 rank:
    its backward must carry the same values in both, so that float8 and bf16 rounding on GPU (the FP8
    head's e5m2 cast of the logit gradient) is the same at every world size, not just the mean gradient."""
    single = first_backward_grads(0, 1, trainer.__name__, *tiny_corpus["flags"])
    rank0 = run_gloo_ranks("test_train:first_backward_grads", 2, tmp_path, trainer.__name__, *tiny_corpus["flags"])[0]
    assert single.keys() == rank0.keys() and len(single) > 10, sorted(single)
    for name in single:
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-8, msg=lambda m: (
            f"{name}: micro-batch 0's gradient on rank 0 of 2 differs from the same micro-batch's on 1 rank "
            f"(scaled by the rank's micro-batch count instead of the step's?)\n{m}"))


def test_corrupt_shard_fails_with_its_name_and_keeps_the_log(trainer, tiny_corpus, tmp_path, capsys):
    bad = write_shard(tmp_path / "bad_train_000001.bin", np.arange(1000), magic=7)
    args = _args(tiny_corpus, tmp_path, "bad")
    args[1] = f"--train_files={bad}"
    assert trainer.main(args) == 1
    assert f"error: {bad}: bad magic 7" in capsys.readouterr().err
    lines = _log_lines(tmp_path, "bad")
    assert lines[0] == (ROOT / f"{trainer.__name__}.py").read_text().splitlines()[0]
    assert lines[-1].startswith(f"error: {bad}: bad magic 7"), "the error is the log's last line"


def test_missing_validation_files_fail_naming_the_flag(trainer, tiny_corpus, tmp_path, capsys):
    args = _args(tiny_corpus, tmp_path, "missing")
    args[2] = f"--val_files={tmp_path}/nothing_*.bin"
    assert trainer.main(args) == 1
    assert "no files match --val_files=" in capsys.readouterr().err


def test_nan_loss_stops_the_run_with_the_step_and_a_nonzero_exit(trainer, tiny_corpus, tmp_path):
    args = _args(tiny_corpus, tmp_path, "nan", "--attn_scale=nan", "--val_loss_every=0")
    assert trainer.main(args) == 1
    lines = _log_lines(tmp_path, "nan")
    assert lines[-1] == "error: non-finite train loss nan at step 1"
    assert _run(tmp_path, "nan").step_points, "lines written before the failure are kept"


def test_an_unexpected_exception_still_reaches_the_log_with_its_traceback(trainer, tiny_corpus, tmp_path,
                                                                          monkeypatch):
    def broken_train(*args):
        raise RuntimeError("bug in the training loop")
    monkeypatch.setattr(trainer, "train", broken_train)
    with pytest.raises(RuntimeError, match="bug in the training loop"):
        trainer.main(_args(tiny_corpus, tmp_path, "crash"))
    text = (tmp_path / "crash.txt").read_text()
    tail = text[text.rindex("crash:"):]
    assert "Traceback" in tail and "RuntimeError: bug in the training loop" in tail, tail


def test_warmup_restores_model_and_optimizer_state_exactly(trainer, tiny_corpus):
    hp = trainer.parse_args(_args(tiny_corpus, "unused", "unused"))
    t = trainer.Trainer(hp, 0, 1, torch.device("cpu"))
    before = [x.clone() for x in list(t.model.parameters()) + t.adam.state_tensors() + t.muon.state_tensors()]
    snap = t.snapshot()
    loader = trainer.DistributedTrainLoader(hp, 0, 1, torch.device("cpu"), trainer.row_specs(range(2), hp, t.derived))
    for step in range(2):
        t.train_step(step, loader)
    after_training = list(t.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after_training, before)), "training changed nothing"
    t.restore(snap)
    now = list(t.model.parameters()) + t.adam.state_tensors() + t.muon.state_tensors()
    assert all(torch.equal(a, b) for a, b in zip(now, before, strict=True))
    assert t.adam.t == 0, "Adam's step count (bias correction) is restored too"


def test_validation_scores_val_tokens_minus_one_predictions(trainer, tiny_corpus):
    hp = trainer.parse_args(_args(tiny_corpus, "unused", "unused"))
    t = trainer.Trainer(hp, 0, 1, torch.device("cpu"))
    loss = t.evaluate(0)
    assert t.last_val_predictions == hp.val_tokens - 1, "exactly the first val_tokens tokens are scored"
    assert abs(loss - np.log(hp.vocab_size)) < 0.01, "the untrained model (head at std 0.005) is near uniform"


# -----------------------------------------------------------------------------
# Nothing lost, nothing false: logs, early errors, exit codes, signals


def test_a_reused_run_id_never_overwrites_a_finished_log(trainer, tiny_corpus, tmp_path, capsys):
    """The second run with the same --run_id, even one that would fail at once on a typo, is refused
    (exit 2) and the first run's log stays byte for byte."""
    assert trainer.main(_args(tiny_corpus, tmp_path, "same")) == 0
    finished = (tmp_path / "same.txt").read_bytes()
    typo = _args(tiny_corpus, tmp_path, "same")
    typo[2] = f"--val_files={tmp_path}/typo_*.bin"
    assert trainer.main(typo) == 2
    assert "same.txt exists" in capsys.readouterr().err
    assert (tmp_path / "same.txt").read_bytes() == finished, "the finished log was changed"


@pytest.mark.parametrize("run_id", ["../escaped", "a/b", ".hidden", ""])
def test_run_ids_that_would_leave_the_log_folder_are_refused(trainer, tiny_corpus, tmp_path, run_id, capsys):
    log_dir = tmp_path / "logs"
    code = trainer.main(_args(tiny_corpus, log_dir, "x") + [f"--run_id={run_id}"])
    if run_id == "":  # the default: a fresh uuid inside the folder
        assert code == 0 and len(list(log_dir.glob("*.txt"))) == 1
        return
    assert code == 2, f"--run_id={run_id!r} must be a usage error"
    assert "must be a plain file name" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.txt")), "nothing written anywhere"


def _unwritable_log_dirs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    return {"a file": str(a_file), "empty": "", "under a file": str(a_file / "sub"), "/proc": "/proc/x"}


@pytest.mark.parametrize("case", ["a file", "empty", "under a file", "/proc"])
def test_an_unusable_log_dir_is_one_clear_error_line(trainer, tiny_corpus, tmp_path, case, capsys):
    log_dir = _unwritable_log_dirs(tmp_path)[case]
    args = [a for a in _args(tiny_corpus, tmp_path, "r") if not a.startswith("--log_dir")] + [f"--log_dir={log_dir}"]
    assert trainer.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --log_dir") or err.startswith("error: cannot create the log"), err
    assert "Traceback" not in err


def test_inputs_are_checked_before_anything_trains_or_compiles(trainer, tiny_corpus, tmp_path, monkeypatch):
    """A typo in --val_files is reported before the warm-up (on a GPU: before minutes of compiling)."""
    def no_training(*args, **kwargs):
        raise AssertionError("a train step ran before the inputs were checked")
    monkeypatch.setattr(trainer.Trainer, "train_step", no_training)
    args = _args(tiny_corpus, tmp_path, "typo")
    args[2] = f"--val_files={tmp_path}/typo_*.bin"
    assert trainer.main(args) == 1
    assert _log_lines(tmp_path, "typo")[-1].startswith("error: no files match --val_files=")


@pytest.mark.parametrize("flag, fix", [("--val_tokens=1000", "--val_tokens=1024"),
                                       ("--stage_batch_tokens=100,1024,1024", "multiple of its stage's --stage_seq_len 256")])
def test_sizes_that_do_not_divide_are_usage_errors_naming_a_value_that_works(trainer, tiny_corpus, tmp_path, flag,
                                                                            fix, capsys):
    assert trainer.main(_args(tiny_corpus, tmp_path, "size", flag)) == 2
    err = capsys.readouterr().err
    assert fix in err and "divides 0" not in err, err
    assert not (tmp_path / "size.txt").exists(), "a usage error leaves no log"


def test_too_little_training_data_fails_before_compiling_and_names_the_fixes(trainer, tmp_path, capsys):
    small = tmp_path / "data"
    small.mkdir()
    write_shard(small / "s_train_000001.bin", synthetic_tokens(3000, seed=1, bos=SMALL_BOS))
    write_shard(small / "s_val_000000.bin", synthetic_tokens(5000, seed=2, bos=SMALL_BOS))
    args = ["--preset=tiny", f"--train_files={small}/s_train_*.bin", f"--val_files={small}/s_val_*.bin",
            *SMALL_VOCAB_FLAGS, f"--log_dir={tmp_path}", "--cycle_train_data=false", "--run_id=short"]
    assert trainer.main(args) == 1
    err = capsys.readouterr().err
    for fix in ("hold 3,000 tokens", "they suffice for 5 steps", "--num_iterations", "--cycle_train_data=true"):
        assert fix in err, err
    assert trainer.main(args[:-1] + ["--run_id=cycled", "--cycle_train_data=true"]) == 0, "negative control"
    shard_lines = [line for line in _log_lines(tmp_path, "cycled") if line.startswith("train_shard: ")]
    assert shard_lines and "rows:" in shard_lines[0], "the log says how much of each shard the rows use"


def test_sigterm_is_recorded_in_the_log_like_a_crash(trainer, tiny_corpus, tmp_path):
    """Schedulers stop jobs with SIGTERM: the log records it (not just stops) and the exit status is 143."""
    import signal
    import time
    cmd = [sys.executable, str(ROOT / f"{trainer.__name__}.py"),
           *_args(tiny_corpus, tmp_path, "term", "--num_iterations=100000", "--val_loss_every=0",
                 "--cycle_train_data=true")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "term.txt"
    deadline = time.monotonic() + 120
    while not (log.exists() and "step:2/" in log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    lines = log.read_text().splitlines()
    # after the last step line (the traceback may quote the source line that writes step lines, "step:" in it)
    last_step = max(i for i, line in enumerate(lines) if line.startswith("step:"))
    assert "crash: terminated by signal SIGTERM" in lines[last_step + 1:], "\n".join(lines[-30:])


def test_a_run_that_does_not_learn_warns(trainer, tiny_corpus, tmp_path, capsys):
    frozen = [f"--{name}=0" for name in ("adam_lr_embed", "adam_lr_head", "adam_lr_value_embed", "adam_lr_scalar",
                                         "adam_lr_gate", "muon_lr")]
    args = _args(tiny_corpus, tmp_path, "stuck", *frozen)
    assert trainer.main(args) == 0
    assert any(line.startswith("warning: the model did not learn") for line in _log_lines(tmp_path, "stuck"))
    assert trainer.main(_args(tiny_corpus, tmp_path, "learns")) == 0
    assert not any(line.startswith("warning:") for line in _log_lines(tmp_path, "learns")), "negative control"


@shared_code_only
def test_loss_readout_is_the_loss_on_cpu(trainer):
    """One process: LossReadout's value is the loss itself (its rank average is checked by the 1- vs 2-rank runs)."""
    assert trainer.LossReadout(torch.tensor(2.5) * 2, 1).value() == 5.0


@shared_code_only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_loss_readout_waits_for_its_step_not_for_later_work_on_a_gpu(trainer):
    """The step's loss is read without waiting for work queued after it (the next step's), so the host can queue
    the step after while the GPU runs: value() returns while a long kernel still runs; .item() (the control) waits."""
    import time
    loss = torch.full((), 2.5, device="cuda") * 2
    readout = trainer.LossReadout(loss, 1)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock cycles, queued behind the readout's copy
    t0 = time.perf_counter()
    assert readout.value() == 5.0
    waited = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert loss.item() == 5.0
    blocked = time.perf_counter() - t0
    assert waited < 0.1 < blocked, f"value() took {waited:.3f} s, .item() {blocked:.3f} s"


@shared_code_only
def test_gc_pauses_count_the_collector_passes_made_while_active(trainer):
    """GcPauses counts each pass of the garbage collector by generation, with its time, only while active."""
    gc = importlib.import_module("gc")
    gc.collect()
    with trainer.GcPauses() as pauses:
        gc.collect(2)
        gc.collect(0)
    gc.collect(2)  # negative control: after the context, not counted
    assert pauses.counts[2] == 1 and pauses.counts[0] >= 1, pauses.counts
    assert pauses.seconds > 0
    assert pauses.line().startswith(f"gc: {pauses.counts[0]}/{pauses.counts[1]}/1 passes (generation 0/1/2) in the timed loop, ")


@shared_code_only
def test_allocator_calls_count_the_driver_calls_made_while_active(trainer):
    """AllocatorCalls reports, by name, how much each of the caching allocator's counters grew between entry and
    exit; without CUDA (and no stand-in for memory_stats) it reports nothing, so a CPU log has no such line."""
    counters = dict(num_device_alloc=5, num_device_free=2, num_alloc_retries=0)
    with trainer.AllocatorCalls(torch.device("cpu"), stats=lambda: dict(counters)) as calls:
        counters["num_device_alloc"] += 3
        counters["num_sync_all_streams"] = 1  # a counter first seen at exit counts from zero
    counters["num_device_free"] += 4  # negative control: after the context, not counted
    assert calls.line() == "allocator: 3 cudaMalloc, 0 cudaFree, 0 retries, 1 stream syncs in the timed loop"
    assert calls.line("3 steps").endswith(" in 3 steps")
    with trainer.AllocatorCalls(torch.device("cpu")) as cpu_calls:
        pass
    assert cpu_calls.line() is None


@shared_code_only
def test_the_timed_loop_runs_with_the_warm_up_objects_frozen_and_reports_its_gc_passes(trainer, tiny_corpus, tmp_path,
                                                                                        monkeypatch):
    """With --gc_freeze (the default) the objects that exist after the warm-up (model, graphs, kernels) are out of
    the collector's reach in the timed loop (gc.freeze), so a full pass walks only what the loop made; and they
    are given back afterwards. With --gc_freeze=false nothing is frozen (the control). Either way the log says
    how many passes the loop saw and how long they took."""
    gc = importlib.import_module("gc")
    frozen_in_loop = []
    loop = trainer._timed_loop

    def recording_loop(*args, **kwargs):
        frozen_in_loop.append(gc.get_freeze_count())
        return loop(*args, **kwargs)
    monkeypatch.setattr(trainer, "_timed_loop", recording_loop)
    for run_id, flag in (("frozen", "--gc_freeze=true"), ("unfrozen", "--gc_freeze=false")):
        assert trainer.main(_args(tiny_corpus, tmp_path, run_id, flag)) == 0
        assert gc.get_freeze_count() == 0, f"{run_id}: the frozen objects are given back after the loop"
        gc_lines = [line for line in _log_lines(tmp_path, run_id) if line.startswith("gc: ")]
        assert len(gc_lines) == 1 and gc_lines[0].endswith(" ms"), gc_lines
        assert not any(line.startswith("allocator: ") for line in _log_lines(tmp_path, run_id)), "CUDA only"
    assert frozen_in_loop[0] > 1000 and frozen_in_loop[1] == 0, frozen_in_loop
