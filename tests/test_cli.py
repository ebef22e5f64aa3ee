"""The command line: every Hyperparameters field is a typed flag; bad flags fail with a useful message."""
import dataclasses

import pytest


def test_help_lists_every_field_with_its_default(trainer, capsys):
    assert trainer.main(["--help"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(trainer.Hyperparameters):
        assert f"--{f.name}={f.default!r}" in out, f"--help does not show --{f.name} with its default"


def test_flags_override_fields_with_their_types(trainer):
    hp = trainer.parse_args(["--num_iterations=300", "--muon_lr", "0.03", "--cautious_wd=true", "--run_id=x"])
    assert (hp.num_iterations, hp.muon_lr, hp.cautious_wd, hp.run_id) == (300, 0.03, True, "x")
    assert isinstance(hp.num_iterations, int) and isinstance(hp.muon_lr, float)


def test_preset_applies_first_and_later_flags_win(trainer):
    tiny = trainer.PRESETS["tiny"]["flags"]
    hp = trainer.parse_args(["--num_iterations=7", "--preset=tiny"])
    assert hp.num_iterations == 7, "an explicit flag must override the preset, whatever the order"
    assert hp.model_dim == tiny["model_dim"]


@pytest.mark.parametrize("argv, words", [
    (["--num_iteration=3"], ["unknown flag --num_iteration", "--num_iterations"]),
    (["--num_iterations=three"], ["--num_iterations expects int", "'three'"]),
    (["--compile=maybe"], ["--compile expects true or false"]),
    (["--muon_ortho=svd"], ["--muon_ortho must be one of", "turbo_muon"]),
    (["--window_end=100"], ["multiple of 128"]),
    (["--preset=huge"], ["unknown preset 'huge'", "tiny"]),
    (["num_iterations=3"], ["unexpected argument"]),
    (["--seed"], ["--seed needs a value"]),
    (["--muon_variant=scion", "--normuon=true"], ["scion has its own Frank-Wolfe decay"]),
    (["--muon_variant=orscale_lm", "--cautious_wd=true"], ["--cautious_wd does not apply"]),
    (["--num_layers=6"], ["--layer_attention needs one letter per layer (6)"]),
    (["--layer_attention=LSSSLSSXSSSL"], ["from L (long window), S (short window), - (no attention)"]),
])
def test_bad_flags_fail_with_a_message_naming_the_fix(trainer, argv, words, capsys):
    with pytest.raises(trainer.ConfigError) as err:
        trainer.parse_args(argv)
    for w in words:
        assert w in str(err.value), f"message {str(err.value)!r} should mention {w!r}"
    assert trainer.main(argv) == 2, "a usage error exits with status 2"
    assert "usage:" in capsys.readouterr().err, "the usage text follows the error"


def test_batch_must_split_evenly_over_ranks_and_accumulation(trainer):
    hp = trainer.parse_args(["--preset=tiny"])
    assert trainer.derive(hp, 1).grad_accum == hp.batch_tokens // hp.train_seq_len
    assert trainer.derive(hp, 2).grad_accum == hp.batch_tokens // (2 * hp.train_seq_len)
    with pytest.raises(trainer.ConfigError, match="multiple of world_size"):
        trainer.derive(hp, 3)


def test_default_recipe_keeps_the_speedrun_batch_on_any_gpu_count(trainer):
    hp = trainer.Hyperparameters()
    for world_size in (1, 2, 4, 8):
        d = trainer.derive(hp, world_size)
        assert d.grad_accum * world_size * hp.train_seq_len == hp.batch_tokens


def test_a_layer_without_attention_may_not_read_a_value_embedding(trainer):
    pattern = "-" + trainer.parse_args([]).layer_attention[1:]  # layer 0 reads value embedding 0
    with pytest.raises(trainer.ConfigError, match="reads a value embedding"):
        trainer.parse_args([f"--layer_attention={pattern}"])


def test_proxy_100s_preset_is_the_measured_recipe():
    """README's 100-second numbers come from the record's logs; the preset must rebuild exactly their
    hyperparameters (apart from where the data, log and seed were), or the README's command measures something else."""
    import json
    from pathlib import Path

    import train_gpt
    log = (Path(__file__).parent.parent
           / "records/track_1_short/2026-11-22_SevenLayers700Steps_H100x1_proxy/L7s700_0.txt")
    line = next(l for l in log.read_text().splitlines() if l.startswith("hyperparameters: "))
    logged = json.loads(line.removeprefix("hyperparameters: "))
    preset = dataclasses.asdict(train_gpt.parse_args(["--preset=proxy_100s"]))
    where = {"train_files", "val_files", "log_dir", "run_id", "seed"}
    differ = {k: (logged[k], preset[k]) for k in logged if k not in where and logged[k] != preset[k]}
    assert not differ, f"preset proxy_100s differs from the measured runs (logged, preset): {differ}"
