"""The two trainer files: one implementation, two recipes. train_gpt_medium.py is generated from
train_gpt.py by tools/make_medium.py (its docstring and the medium recipe's Hyperparameters defaults
replaced; every other byte the same), which is why the costliest kernel, optimizer and loader tests run
against train_gpt.py alone while the recipe-level tests run against both files."""
import dataclasses

from conftest import ROOT, load_script


def test_committed_medium_trainer_is_what_the_generator_makes():
    """A hand edit anywhere in train_gpt_medium.py, or an edit of train_gpt.py without regenerating, fails
    here. Checked by mutation: disabling the --cooldown_frac check in __post_init__ of either file alone,
    and editing a comment in the Hyperparameters section of either file alone, each fail this test."""
    make_medium = load_script("tools/make_medium.py", "make_medium")
    expected = make_medium.make_medium((ROOT / "train_gpt.py").read_text(encoding="utf-8"))
    actual = (ROOT / "train_gpt_medium.py").read_text(encoding="utf-8")
    if actual != expected:
        a, e = actual.splitlines(), expected.splitlines()
        first = next((i for i, (x, y) in enumerate(zip(a, e)) if x != y), min(len(a), len(e)))
        raise AssertionError(
            f"train_gpt_medium.py differs from the generator's output at line {first + 1}:\n"
            f"  committed: {a[first] if first < len(a) else '<end>'}\n"
            f"  generated: {e[first] if first < len(e) else '<end>'}\n"
            "edit train_gpt.py (or the recipe in tools/make_medium.py), then run `python tools/make_medium.py`")


def test_generator_replaces_only_the_docstring_and_the_recipe_defaults():
    """Outside the docstring and the recipe's field values, generated and source lines are identical;
    a recipe naming a field train_gpt.py lacks is refused (no silent no-op)."""
    make_medium = load_script("tools/make_medium.py", "make_medium")
    small = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    medium = make_medium.make_medium(small)
    doc_lines = len(make_medium.MEDIUM_DOCSTRING.splitlines())
    small_body = small.split('"""', 2)[2].splitlines()
    medium_body = medium.split('"""', 2)[2].splitlines()
    changed = {a.split(":")[0].strip() for a, b in zip(small_body, medium_body, strict=True) if a != b}
    assert changed == set(make_medium.MEDIUM_RECIPE), f"lines changed beyond the recipe's fields: {changed}"
    assert medium.splitlines()[:doc_lines] == make_medium.MEDIUM_DOCSTRING.splitlines()
    try:
        make_medium.make_medium(small, recipe={"no_such_field": "1"})
    except make_medium.RecipeError as e:
        assert "no_such_field" in str(e)
    else:
        raise AssertionError("a recipe with an unknown field must be refused")


def test_medium_defaults_are_the_medium_track_recipe():
    import train_gpt_medium as medium
    hp = medium.parse_args([])
    assert (hp.track, hp.target_val_loss, medium.VAL_LOSS_DECIMALS[hp.track]) == ("medium", 2.92, 6), \
        "records/verify.py reads the track and target; medium logs print val_loss with 6 decimals"
    assert (hp.num_layers, hp.model_dim, hp.num_heads * hp.head_dim) == (16, 1024, 1024)
    assert len(hp.layer_attention) == 16 and "-" in hp.layer_attention
    for world_size in (1, 2, 4, 8):
        (accum,) = medium.derive(hp, world_size).grad_accum
        assert accum * world_size * int(hp.stage_seq_len) == 8 * 64 * 1024, "the public medium record's batch"
    make_medium = load_script("tools/make_medium.py", "make_medium")
    for name, expression in make_medium.MEDIUM_RECIPE.items():
        assert getattr(hp, name) == eval(expression), f"--{name}: the recipe's {expression}, not {getattr(hp, name)!r}"
    import train_gpt
    small = dataclasses.asdict(train_gpt.parse_args([]))
    same = {k for k in small if k not in make_medium.MEDIUM_RECIPE}
    assert all(small[k] == dataclasses.asdict(hp)[k] for k in same), "fields outside the recipe are the small track's"


def test_both_trainers_import_in_one_process_with_their_own_custom_ops():
    """Custom ops are registered per file: the op registry is process-wide, so one name for both files
    would let the second import replace the first file's kernels (seen as corrupted FP8 results when the
    test suite imported both). The namespace stays per file for that reason."""
    import torch
    import train_gpt
    import train_gpt_medium
    assert train_gpt.OP_NAMESPACE == "train_gpt" and train_gpt_medium.OP_NAMESPACE == "train_gpt_medium"
    x = torch.randint(0, 256, (5, 7), dtype=torch.uint8).view(torch.float8_e4m3fn)
    for module in (train_gpt, train_gpt_medium):
        assert torch.equal(module.transpose_bytes(x).view(torch.uint8), x.view(torch.uint8).T), module.__name__
