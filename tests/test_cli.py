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
    (["--muon_qk_blocks=halves"], ["--muon_qk_blocks must be one of pair, whole"]),
    (["--preset=huge"], ["unknown preset 'huge'", "tiny"]),
    (["--preset=tiny", "--preset=tiny"], ["one --preset at most"]),
    (["num_iterations=3"], ["unexpected argument"]),
    (["--seed"], ["--seed needs a value"]),
    (["--muon_variant=scion", "--normuon=true"], ["scion has its own Frank-Wolfe decay",
                                                   "--normuon=false", "--muon_weight_decay=0"]),
    (["--muon_variant=orscale_lm", "--cautious_wd=true"], ["--cautious_wd does not apply"]),
    (["--fp8_mlp_up=true", "--fused_mlp=false"], ["--fp8_mlp_up (the small track's default) runs in the fused MLP kernel",
                                                  "--fused_mlp=true", "or --fp8_mlp_up=false"]),
    (["--fp8_mlp_down=true", "--fused_mlp=false", "--fp8_mlp_up=false", "--micro_batch_tokens=0"],
     ["--fp8_mlp_down takes post's scale", "--fused_mlp=true"]),
    (["--num_layers=6"], ["--layer_attention needs one letter per layer (6)"]),
    (["--layer_attention=SSSLSSXSSSL"], ["from L (long window), S (short window), - (no attention)"]),
    (["--stage_batch_tokens=131072,262144"], ["--stage_batch_tokens", "needs 3 entries, one per stage"]),
    (["--stage_batch_tokens=131072,262144,100000"], ["100000 is not a positive multiple of its stage's --stage_seq_len 49152"]),
    (["--stage_starts=2/3,1/3"], ["--stage_starts", "increasing fractions"]),
    (["--stage_windows=1:3,3,5:11"], ["--stage_windows: '3' is not short:long"]),
    (["--mtp_weights=1;1"], ["--mtp_weights has 2 stage(s)", "the schedule has 3"]),
    (["--mtp_weights=1,0.5>-1;1;1"], ["is not a weight w >= 0 or a ramp a>b"]),
    (["--prefix_weights=0.25;0"], ["--prefix_weights has 2 stage(s)", "the schedule has 3"]),
    (["--prefix_weights=0.25,0.1;0;0"], ["--prefix_weights: '0.25,0.1' has 2 weights; a stage has one"]),
    (["--xsa_layers=1,11"], ["--xsa_layers: layer 11 does not exist"]),
    (["--value_embed_layers=1,6"], ["--value_embed_layers: layer 6 has no attention"]),
    (["--skip_connection=6>3"], ["--skip_connection='6>3' must be a>b"]),
    (["--untie_stage=4"], ["--untie_stage=4: the schedule has 3 stages"]),
    (["--fp8_mlp_down=true", "--micro_batch_tokens=65536"], ["a row would round by its neighbours'",
                                                              "--micro_batch_tokens=0 or --fp8_mlp_down=false"]),
    (["--adam_betas_embed=0.5"], ["--adam_betas_embed='0.5' must be two betas"]),
    (["--tokenizer_vocab=60000"], ["--vocab_size=50304 must hold --tokenizer_vocab=60000", "--vocab_size=60032"]),
])
def test_bad_flags_fail_with_a_message_naming_the_fix(trainer, argv, words, capsys):
    if trainer.__name__ == "train_gpt_medium" and any(a.split("=")[0] in STAGE_LIST_FLAGS for a in argv):
        pytest.skip("the medium recipe has one stage; the stage-count cases are the small track's")
    with pytest.raises(trainer.ConfigError) as err:
        trainer.parse_args(argv)
    for w in words:
        assert w in str(err.value), f"message {str(err.value)!r} should mention {w!r}"
    assert trainer.main(argv) == 2, "a usage error exits with status 2"
    assert "usage:" in capsys.readouterr().err, "the usage line follows the error"


def test_fp8_mlp_down_alone_names_the_joined_rows_default_it_conflicts_with():
    """The small track joins rows by default (--micro_batch_tokens=65536), which --fp8_mlp_down's per-pass scale
    cannot serve: the flag alone is a usage error naming the fix, not a silently different rounding."""
    import train_gpt
    with pytest.raises(train_gpt.ConfigError, match=r"--micro_batch_tokens=0 or --fp8_mlp_down=false"):
        train_gpt.parse_args(["--fp8_mlp_down=true"])
    assert train_gpt.parse_args(["--fp8_mlp_down=true", "--micro_batch_tokens=0"]).fp8_mlp_down, "with 0 it is allowed"


STAGE_LIST_FLAGS = {"--stage_batch_tokens", "--stage_starts", "--stage_windows", "--mtp_weights", "--prefix_weights", "--untie_stage",
                    "--xsa_layers", "--value_embed_layers", "--skip_connection"}


def test_batch_must_split_evenly_over_ranks_and_accumulation(trainer):
    hp = trainer.parse_args(["--preset=tiny"])
    batches = [int(b) for b in hp.stage_batch_tokens.split(",")]
    seq_lens = [int(t) for t in hp.stage_seq_len.split(",")]
    assert trainer.derive(hp, 1).grad_accum == tuple(b // t for b, t in zip(batches, seq_lens))
    assert trainer.derive(hp, 2).grad_accum == tuple(b // (2 * t) for b, t in zip(batches, seq_lens))
    with pytest.raises(trainer.ConfigError, match="multiple of world_size"):
        trainer.derive(hp, 3)


def test_default_recipe_runs_the_same_batches_on_any_gpu_count(trainer):
    hp = trainer.parse_args([])
    stages = trainer.parse_recipe(hp).stages
    for world_size in (1, 2, 4, 8):
        accum = trainer.derive(hp, world_size).grad_accum
        assert [a * world_size * s.seq_len for a, s in zip(accum, stages)] == [s.batch_tokens for s in stages]


def test_help_shows_each_flags_meaning_and_allowed_values(trainer, capsys):
    assert trainer.main(["--help"]) == 0
    out = capsys.readouterr().out
    ortho = trainer.Hyperparameters().muon_ortho
    assert f"--muon_ortho='{ortho}'  (newton_schulz5 | polar_express | turbo_muon): orthogonalization" in out
    assert "--cycle_train_data=False  (true | false): restart the training shards" in out
    assert "tiny (tracks: small, medium): --num_layers=4" in out, "presets are listed with the flags they set"
    comments = trainer.field_comments()
    assert comments["val_tokens"].startswith("validation loss is measured over"), comments.get("val_tokens")
    assert "num_layers" not in comments, "a field without a comment has none (negative control)"
