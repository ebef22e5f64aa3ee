"""Checkpoints (README: "Checkpoints, resuming and sampling"): a resumed run continues the uninterrupted one
exactly, on the same or another world size; a checkpoint is complete or absent and never overwritten; a
missing, partial, corrupt or foreign one is refused with one error line before anything is built or compiled."""
import json
import shutil
import time

import pytest
import torch
import train_gpt
from conftest import load_script, one_torch_thread, run_gloo_ranks

verify = load_script("records/verify.py", "records_verify")


def _args(corpus, log_dir, run_id, *extra):
    """The tiny preset's 20 + 2 steps (validation every 10) with a one-step warm-up, which resuming follows."""
    return ["--preset=tiny", *corpus["flags"], f"--log_dir={log_dir}", f"--run_id={run_id}", "--warmup_steps=1",
            *extra]


def _val_losses(log_dir, run_id):
    return {p.step: p.val_loss for p in verify.parse_log(log_dir / f"{run_id}.txt").val_points}


def _lines(log_dir, run_id):
    return (log_dir / f"{run_id}.txt").read_text().splitlines()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def straight(tiny_corpus, tmp_path_factory):
    """The uninterrupted run, saving after steps 10 and 20 (--checkpoint_every=10) and at the end (step 22)."""
    log_dir = tmp_path_factory.mktemp("straight")
    with one_torch_thread():
        code = train_gpt.main(_args(tiny_corpus, log_dir, "straight", "--checkpoint_every=10",
                                    "--save_checkpoint=true"))
    assert code == 0
    return {"dir": log_dir, "losses": _val_losses(log_dir, "straight"),
            "step": lambda k: log_dir / "straight" / f"step_{k}"}


def test_checkpoints_are_complete_folders_named_by_step_and_logged_with_their_time(straight):
    folder = straight["dir"] / "straight"
    assert sorted(p.name for p in folder.iterdir()) == ["step_10", "step_20", "step_22"], \
        "every 10 steps before the last, and the last with --save_checkpoint; no .tmp left behind"
    for k in (10, 20, 22):
        assert sorted(p.name for p in straight["step"](k).iterdir()) == ["meta.json", "state.pt"]
    saved = [line for line in _lines(straight["dir"], "straight") if line.startswith("checkpoint: ")]
    assert [line.split()[2] for line in saved] == ["step:10/22", "step:20/22", "step:22/22"], saved
    assert all(line.split()[3].startswith("save_time:") for line in saved), saved


def test_a_resumed_run_has_the_losses_of_the_uninterrupted_run(straight, tiny_corpus, tmp_path):
    """10 steps, resume, 12 more: every val loss from step 10 on equals the uninterrupted run's, bit for bit; and
    from step 20, after the embedding untied from the head (step 13), too."""
    hp = train_gpt.parse_args(_args(tiny_corpus, tmp_path, "x"))
    untie = train_gpt.untie_step(hp, train_gpt.derive(hp, 1))
    for k in (10, 20):
        meta = json.loads((straight["step"](k) / "meta.json").read_text())
        assert meta["tied"] is (k <= untie), f"step {k}: the checkpoint must record the tie state"
        assert train_gpt.main(_args(tiny_corpus, tmp_path, f"from{k}", f"--resume_from={straight['step'](k)}")) == 0
        resumed = _val_losses(tmp_path, f"from{k}")
        expected = {s: loss for s, loss in straight["losses"].items() if s >= k}
        assert resumed == expected, f"resumed at step {k}: {resumed}, uninterrupted: {expected}"
        note = [line for line in _lines(tmp_path, f"from{k}") if line.startswith("resumed_from: ")]
        assert note and note[0].startswith(f"resumed_from: {straight['step'](k)} step:{k}/22"), \
            "the resumed run's log says so and names the checkpoint"


def test_negative_control_without_the_loader_position_the_losses_differ(straight, tiny_corpus, tmp_path, monkeypatch):
    """The loader's position is what makes the resume exact: a stream restarted at the first shard trains on
    other rows, and the losses differ."""
    original = train_gpt.TrainStream.__init__

    def from_the_first_shard(self, *args, start=None, **kwargs):
        original(self, *args, **kwargs)
    monkeypatch.setattr(train_gpt.TrainStream, "__init__", from_the_first_shard)
    assert train_gpt.main(_args(tiny_corpus, tmp_path, "lost", f"--resume_from={straight['step'](20)}")) == 0
    assert _val_losses(tmp_path, "lost")[22] != straight["losses"][22], "the loader position made no difference"


SHORT = ["--num_iterations=8", "--val_loss_every=0"]  # the gloo runs: 8 + 2 steps, every stage, untie at step 5


def straight_then_resumed(rank, world_size, log_dir, *corpus_flags):
    """On gloo ranks: the run with a checkpoint at step 5, then a run resumed from it; both final val losses."""
    finals = []
    corpus = {"flags": list(corpus_flags)}
    for run_id, extra in (("two", "--checkpoint_every=6"), ("two_resumed", f"--resume_from={log_dir}/two/step_6")):
        hp = train_gpt.parse_args(_args(corpus, log_dir, run_id, extra, *SHORT))
        if hp.resume_from:
            train_gpt.read_checkpoint(hp.resume_from, hp)
        log = train_gpt.RunLog(hp, rank)
        finals.append(train_gpt.train(hp, rank, world_size, torch.device("cpu"), log, time.perf_counter()))
        log.close()
    return finals


def test_two_ranks_resume_on_two_ranks_and_on_one(tiny_corpus, tmp_path):
    """Optimizer state is saved gathered (world-size independent): a 2-rank checkpoint resumes on 2 ranks
    exactly, and on 1 rank as closely as 1 and 2 ranks agree anyway (float summation order)."""
    log_dir = tmp_path / "logs"
    results = run_gloo_ranks("test_checkpoint:straight_then_resumed", 2, tmp_path, str(log_dir), *tiny_corpus["flags"])
    (two, two_resumed), _ = results
    assert results[0] == results[1], "every rank validates the same loss"
    assert two_resumed == two, f"2 ranks: resumed {two_resumed}, uninterrupted {two}"
    assert json.loads((log_dir / "two" / "step_6" / "meta.json").read_text())["world_size"] == 2
    assert train_gpt.main(_args(tiny_corpus, tmp_path, "one", f"--resume_from={log_dir}/two/step_6", *SHORT)) == 0
    one = _val_losses(tmp_path, "one")[10]
    assert abs(one - two) < 2e-3, f"resumed on 1 rank {one}, uninterrupted on 2 ranks {two}"


def test_bf16_weights_resume_exactly_with_their_low_halves(tiny_corpus, tmp_path, monkeypatch):
    """With --muon_bf16_weights what float32 adds to each bf16 weight lives in Muon's state ("low"): a run resumed
    from step 6 ends with the uninterrupted run's val loss and final weights, bit for bit. Negative control: the
    same resume with the low halves zeroed after loading ends with other weights (the loss, at 4 decimals, may
    not show a half-ulp shift that rounds either way)."""
    flags = ("--muon_bf16_weights=true", "--save_checkpoint=true", *SHORT)

    def final_weights(run_id):
        return torch.load(tmp_path / run_id / "step_10" / "state.pt", weights_only=True)["model"]
    assert train_gpt.main(_args(tiny_corpus, tmp_path, "bf16", "--checkpoint_every=6", *flags)) == 0
    checkpoint = f"--resume_from={tmp_path}/bf16/step_6"
    assert train_gpt.main(_args(tiny_corpus, tmp_path, "bf16_resumed", checkpoint, *flags)) == 0
    assert _val_losses(tmp_path, "bf16_resumed")[10] == _val_losses(tmp_path, "bf16")[10]
    straight, resumed = final_weights("bf16"), final_weights("bf16_resumed")
    assert all(torch.equal(resumed[name], w) for name, w in straight.items()), "the resumed run ends elsewhere"
    load = train_gpt.DistMuon.load_state_dict

    def without_low_halves(self, state):
        load(self, state)
        for g in self.groups:
            g["state"]["low"].zero_()
    monkeypatch.setattr(train_gpt.DistMuon, "load_state_dict", without_low_halves)
    assert train_gpt.main(_args(tiny_corpus, tmp_path, "bf16_lost", checkpoint, *flags)) == 0
    lost = final_weights("bf16_lost")
    assert not all(torch.equal(lost[name], w) for name, w in straight.items()), \
        "the low halves made no difference to the resume"


def _broken(case, source, tmp_path):
    """A copy of checkpoint `source` broken as `case` says; (path, words the error must contain)."""
    if case == "missing":
        return tmp_path / "no_such_step", "no such checkpoint folder"
    copy = tmp_path / "step_10"
    shutil.copytree(source, copy)
    state = copy / "state.pt"
    if case == "partial":
        (copy / "meta.json").unlink()  # what an interrupted save leaves (step_10.tmp)
        return copy, "not a complete checkpoint"
    if case == "another trainer version":  # saved before --muon_qk_blocks existed, with a flag since removed
        meta = json.loads((copy / "meta.json").read_text())
        del meta["hyperparameters"]["muon_qk_blocks"], meta["hyperparameters"]["gc_freeze"]  # gc_freeze: free
        meta["hyperparameters"]["retired_flag"] = 1
        (copy / "meta.json").write_text(json.dumps(meta))
        return copy, ("saved by another version of the trainer (it had no --muon_qk_blocks; this one has no "
                      "--retired_flag); resume it with the trainer that saved it")
    if case == "truncated":
        state.write_bytes(state.read_bytes()[:1000])
        return copy, "missing or truncated"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the tensor data
    state.write_bytes(bytes(data))
    return copy, "state.pt is corrupt"


@pytest.mark.parametrize("case", ["missing", "partial", "truncated", "corrupt", "another configuration",
                                  "another trainer version"])
def test_an_unusable_checkpoint_is_one_error_line_before_anything_is_built(straight, tiny_corpus, tmp_path, case,
                                                                         capsys, monkeypatch):
    def nothing_built(*args, **kwargs):
        raise AssertionError("a Trainer was built (and would compile on a GPU) before the checkpoint was checked")
    monkeypatch.setattr(train_gpt.Trainer, "__init__", nothing_built)
    extra = []
    if case == "another configuration":
        path, words = straight["step"](10), "another configuration: --muon_lr=0.02 here, 0.023 there"
        extra = ["--muon_lr=0.02"]
    else:
        path, words = _broken(case, straight["step"](10), tmp_path)
    assert train_gpt.main(_args(tiny_corpus, tmp_path / "logs", "r", f"--resume_from={path}", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume_from={path}: ") and words in err and "Traceback" not in err, err
    assert not (tmp_path / "logs" / "r.txt").exists(), "refused before any log is written"


def test_a_checkpoint_is_written_atomically_and_never_overwritten(tiny_corpus, tmp_path, monkeypatch):
    """A save that fails midway leaves no step_<k> folder (only step_<k>.tmp, which resuming refuses); a
    second save of the same step is refused and leaves the first as it was."""
    hp = train_gpt.parse_args(_args(tiny_corpus, tmp_path, "atomic"))
    trainer = train_gpt.Trainer(hp, 0, 1, torch.device("cpu"))
    loader = train_gpt.DistributedTrainLoader(hp, 0, 1, torch.device("cpu"),
                                              train_gpt.row_specs(range(2), hp, trainer.derived))
    trainer.train_step(0, loader)
    log = train_gpt.RunLog(hp, 0)
    save = torch.save

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        train_gpt.save_checkpoint(trainer, loader, 1, 0.0, log)
    assert not (tmp_path / "atomic" / "step_1").exists() and (tmp_path / "atomic" / "step_1.tmp").is_dir()
    monkeypatch.setattr(torch, "save", save)
    train_gpt.save_checkpoint(trainer, loader, 2, 0.0, log)
    first = (tmp_path / "atomic" / "step_2" / "state.pt").read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        train_gpt.save_checkpoint(trainer, loader, 2, 0.0, log)
    assert (tmp_path / "atomic" / "step_2" / "state.pt").read_bytes() == first
    log.close()


def test_optimizer_state_round_trips_through_any_world_size_layout():
    """state_dict gathers each rank's shards to full size (padding dropped); load_state_dict re-shards for the
    loading world size: on one rank (the path tests can run in process) the round trip is the identity."""
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    adam = train_gpt.DistAdam([(p, 0.1, (0.9, 0.99), 0.0) for p in params], 1e-8, 0, 1)
    for e in adam.entries:
        e["m"].normal_()
        e["v"].uniform_()
    adam.t = 7
    state = adam.state_dict()
    assert [e["m"].shape for e in state["entries"]] == [(15,), (7,)], "full parameter size"
    fresh = train_gpt.DistAdam([(p, 0.1, (0.9, 0.99), 0.0) for p in params], 1e-8, 0, 1)
    fresh.load_state_dict(state)
    assert fresh.t == 7 and all(torch.equal(a, b) for a, b in zip(fresh.state_tensors(), adam.state_tensors()))
    full = torch.arange(5.0)
    shards = [train_gpt.shard_rows(full, 2, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(shards), torch.tensor([0.0, 1, 2, 3, 4, 0])), "rank r holds rows r*k.., zero padded"
    with pytest.raises(ValueError, match="Adam holds 1 parameters"):
        train_gpt.DistAdam([(params[0], 0.1, (0.9, 0.99), 0.0)], 1e-8, 0, 1).load_state_dict(state)


def test_eval_checkpoint_reproduces_the_final_validation_and_compares_windows(straight, capsys):
    """tools/eval_checkpoint.py on the last checkpoint: at the run's final validation windows it prints the log's
    final val loss; other windows give other losses (negative control: the windows reach the attention)."""
    tool = load_script("tools/eval_checkpoint.py", "eval_checkpoint")
    hp = train_gpt.parse_args(["--preset=tiny"])
    final, other = hp.final_val_windows, "1:1"
    with one_torch_thread():
        assert tool.main([str(straight["step"](22)), "--windows", final, other, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    losses = {line.split()[1]: float(line.split("val_loss:")[1]) for line in lines}
    assert all(f"val_seq_len:{hp.val_seq_len} " in line for line in lines), lines
    assert set(losses) == {f"windows:{final}", f"windows:{other}"}, lines
    assert losses[f"windows:{final}"] == pytest.approx(straight["losses"][22], abs=5e-5), \
        f"the final validation logged {straight['losses'][22]}, the tool {losses}"
    assert abs(losses[f"windows:{other}"] - losses[f"windows:{final}"]) > 1e-6, losses
    assert tool.main([str(straight["step"](22)), "--windows", "3"]) == 2, "a malformed window is a usage error"
    assert "error: --windows: '3' is not short:long" in capsys.readouterr().err
    with one_torch_thread():  # longer validation chunks (fewer context resets): another loss of the same model
        assert tool.main([str(straight["step"](22)), "--windows", final, "--val_seq_len", "4096", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "val_seq_len:4096 " in out, out
    longer = float(out.split("val_loss:")[1])
    assert longer != pytest.approx(losses[f"windows:{final}"], abs=1e-6), "--val_seq_len must reach the validation"
    assert tool.main([str(straight["step"](22)), "--windows", final, "--val_seq_len", "1000"]) == 2
    assert "--val_tokens=4096 must be a multiple of --val_seq_len=1000" in capsys.readouterr().err
