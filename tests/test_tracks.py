"""The two trainer files: one implementation, two recipes. train_gpt_medium.py is a standalone copy of
train_gpt.py (a record is one file) that differs only in its header docstring and its Hyperparameters
section; every other line is checked identical here, which is why the costliest kernel, optimizer and
loader tests run against train_gpt.py alone while the recipe-level tests run against both files."""
import pytest
from conftest import ROOT

FIRST_SHARED_SECTION = "# Distributed setup\n"


def _sections(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    cut = text.index(FIRST_SHARED_SECTION)
    return text[:cut], text[cut:]


def test_medium_trainer_differs_from_the_small_one_only_in_header_and_hyperparameters():
    if not (ROOT / "train_gpt_medium.py").exists():
        pytest.skip("no medium trainer")
    _, small_rest = _sections("train_gpt.py")
    _, medium_rest = _sections("train_gpt_medium.py")
    if small_rest != medium_rest:
        small_lines, medium_lines = small_rest.splitlines(), medium_rest.splitlines()
        first = next((i for i, (a, b) in enumerate(zip(small_lines, medium_lines)) if a != b),
                     min(len(small_lines), len(medium_lines)))
        pytest.fail(f"the shared sections differ from line {first} after {FIRST_SHARED_SECTION.strip()!r}:\n"
                    f"  train_gpt.py:        {small_lines[first] if first < len(small_lines) else '<end>'}\n"
                    f"  train_gpt_medium.py: {medium_lines[first] if first < len(medium_lines) else '<end>'}\n"
                    "change both files alike (the tests of shared code run on train_gpt.py only)")


def test_medium_defaults_are_the_medium_track_recipe():
    import train_gpt_medium as medium
    hp = medium.parse_args([])
    assert (hp.track, hp.target_val_loss, medium.VAL_LOSS_DECIMALS) == ("medium", 2.92, 6), \
        "records/verify.py reads the track and target; medium logs print val_loss with 6 decimals"
    assert (hp.num_layers, hp.model_dim, hp.num_heads * hp.head_dim) == (16, 1024, 1024)
    assert hp.layer_attention[7] == "-" and len(hp.layer_attention) == 16
    for world_size in (1, 2, 4, 8):
        d = medium.derive(hp, world_size)
        assert d.grad_accum * world_size * hp.train_seq_len == hp.batch_tokens == 8 * 64 * 1024


def test_both_trainers_import_in_one_process_with_their_own_custom_ops():
    """Custom ops are registered per file; one name for both would let the second import replace the
    first file's kernels (seen as corrupted FP8 results when the test suite imported both)."""
    import torch
    import train_gpt
    import train_gpt_medium
    assert train_gpt.OP_NAMESPACE == "train_gpt" and train_gpt_medium.OP_NAMESPACE == "train_gpt_medium"
    x = torch.randint(0, 256, (5, 7), dtype=torch.uint8).view(torch.float8_e4m3fn)
    for module in (train_gpt, train_gpt_medium):
        assert torch.equal(module.transpose_bytes(x).view(torch.uint8), x.view(torch.uint8).T), module.__name__
