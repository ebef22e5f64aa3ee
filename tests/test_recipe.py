"""The staged recipe: schedule as data (stage boundaries, lr, momentum, windows, MTP weights, YaRN), the
fused softcapped multi-token loss against naive references, the new model components against plain
formulas, tie/untie, and a warm-up that compiles everything the timed loop runs."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BOS, ROOT, SMALL_VOCAB_FLAGS, load_script, run_interpreted, shared_code_only

pytestmark = shared_code_only


# -----------------------------------------------------------------------------
# Schedule


@pytest.mark.parametrize("n", [30, 190, 1270, 1271])
def test_stages_begin_at_the_scaled_boundaries_and_the_extension_follows(trainer, n):
    """Stage k begins at round(k/3 * n) for any --num_iterations (the whole schedule scales); the extension
    steps after n keep the last stage's batch with their own windows and the lr floor."""
    hp = trainer.parse_args([f"--num_iterations={n}"])
    d = trainer.derive(hp, 1)
    stages = [trainer.plan_step(s, hp, d).stage for s in range(trainer.total_steps(hp))]
    starts = [stages.index(k) for k in range(3)]
    assert starts == [0, round(n / 3), round(2 * n / 3)], starts
    assert stages[n - 1] == stages[n] == 2 and len(stages) == n + hp.extension_steps
    ext = trainer.plan_step(n, hp, d)
    assert ext.windows == (6, 13) and ext.lr == hp.final_lr_frac and (ext.seq_len, ext.micro_batches) == (49152, 8)
    plans = [trainer.plan_step(starts[k], hp, d) for k in range(3)]
    assert [(p.seq_len, p.micro_batches) for p in plans] == [(16384, 8), (32768, 8), (49152, 8)], \
        "one GPU runs 8 micro-batches of the rows an 8-GPU rank runs (the public recipe's per-rank lengths)"


def test_lr_schedule_matches_the_public_recipe_at_known_steps(trainer):
    """Stage multipliers until the cooldown at 40% of the steps, then a blend to the 0.15 floor; the stage-3
    multiplier re-enters the blend at its start (values from the public recipe's formula)."""
    hp = trainer.parse_args([])
    d = trainer.derive(hp, 1)
    lr = {s: trainer.plan_step(s, hp, d).lr for s in (0, 422, 423, 507, 600, 846, 847, 1000, 1269, 1270, 1284)}
    expected = {0: 1.0, 422: 1.0, 423: 1.52, 507: 1.52, 600: 1.52 * (1 - 92 / 762) + 0.15 * 92 / 762,
                846: 1.52 * (1 - 338 / 762) + 0.15 * 338 / 762, 847: 1.73 * (1 - 339 / 762) + 0.15 * 339 / 762,
                1000: 1.73 * (1 - 492 / 762) + 0.15 * 492 / 762, 1269: 1.73 * (1 - 761 / 762) + 0.15 * 761 / 762,
                1270: 0.15, 1284: 0.15}
    for step, value in expected.items():
        assert lr[step] == pytest.approx(value), f"step {step}: lr multiplier {lr[step]}, expected {value}"
    assert lr[600] == pytest.approx(1.355, abs=1e-3) and lr[1000] == pytest.approx(0.710, abs=1e-3)


def test_momentum_warms_up_then_falls_back_over_the_last_steps(trainer):
    hp = trainer.parse_args([])
    d = trainer.derive(hp, 1)
    mom = [trainer.plan_step(s, hp, d).momentum for s in range(trainer.total_steps(hp))]
    assert mom[0] == pytest.approx(0.85) and mom[150] == pytest.approx(0.85 + 0.1 * 150 / (0.236 * 1270))
    assert mom[400] == pytest.approx(0.95) and mom[1235] == pytest.approx(0.95)
    assert mom[-1] == pytest.approx(0.85 + 0.1 / 50) and mom[1260] < 0.95, "back towards 0.85 over the last 50"


def test_mtp_and_prefix_weights_ramp_within_each_stage(trainer):
    """Loss weights: the next 1, 2, 3 tokens' (MTP), then the prefix target's: 0.25 in stage 1, 0.25 -> 0
    across stage 2, none after (the public recipe's, records #53 and #88; the default)."""
    hp = trainer.parse_args([])
    d = trainer.derive(hp, 1)
    w = {s: trainer.plan_step(s, hp, d).loss_weights for s in (0, 211, 422, 423, 846, 847, 1284)}
    assert w[0] == (1.0, 0.5, 0.25, 0.25) and w[422][2] == pytest.approx(0.25 * (1 - 422 / 423))
    assert w[211][2] == pytest.approx(0.25 * (1 - 211 / 423)) and w[211][3] == w[422][3] == 0.25
    assert w[423] == (1.0, 0.5, 0.0, 0.25) and w[846][1] == pytest.approx(0.5 / 424)
    assert w[846][3] == pytest.approx(0.25 / 424), "the prefix weight ramps to 0 across stage 2"
    assert w[847] == w[1284] == (1.0, 0.0, 0.0, 0.0), "stage 3 and the extension: the next token only"
    off = trainer.parse_args(["--prefix_weights=0;0;0"])
    assert trainer.plan_step(0, off, trainer.derive(off, 1)).loss_weights == (1.0, 0.5, 0.25), \
        "without a prefix weight the loss has no prefix target at all"


def test_yarn_keeps_fast_pairs_and_compresses_slow_ones(trainer):
    """YaRN at 384 -> 896 tokens: pairs turning 32+ times in 384 tokens keep omega, pairs turning at most
    once are scaled by 384/896; the softmax scale follows 0.1 -> 0.11695 -> 0.12752 -> 0.13178."""
    base = torch.cat([(1 / 1024) ** torch.linspace(0, 1, 32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64)])
    f = trainer.yarn_frequencies(base, (384, 896))
    turns = 384 * base / (2 * math.pi)
    assert torch.equal(f[turns >= 32], base[turns >= 32])
    slow = (turns <= 1) & (base > 0)
    assert slow.any() and torch.allclose(f[slow], base[slow] * 384 / 896)
    assert torch.equal(f[32:], base[32:]), "unrotated pairs stay unrotated"
    scales = [trainer.yarn_attention_scale(0.1, w) for w in ((384,), (384, 896), (384, 896, 1408),
                                                              (384, 896, 1408, 1664))]
    assert scales == pytest.approx([0.1, 0.11695, 0.12752, 0.13178], abs=5e-5)


def test_warmup_steps_cover_every_stage_the_untie_and_the_extension(trainer):
    hp = trainer.parse_args(["--warmup_steps=2"])
    d = trainer.derive(hp, 1)
    assert trainer.warmup_step_list(hp, d) == [0, 1, 423, 424, 847, 848, 1270]
    assert trainer.warmup_step_list(trainer.parse_args(["--warmup_steps=0"]), d) == [], "0 turns the warm-up off"


# -----------------------------------------------------------------------------
# Fused softcapped multi-token cross-entropy


def _naive_mtp_loss(z, targets, weights, cap, offset, temp, prefix_table=None):
    """Token by token: sum_t sum_k w_k CE(softcap(z_t), y_{t+k}) with a Python loop and F.cross_entropy, plus
    w_p CE(softcap(z_t), P[y_t]) where the table P gives y_t a prefix (w_p: the last weight)."""
    total = torch.zeros((), dtype=torch.float64)
    u = cap * torch.sigmoid((z.double() + offset) / temp)
    mtp = weights.tolist()[:-1] if prefix_table is not None else weights.tolist()
    for t in range(z.size(0)):
        for k, w in enumerate(mtp):
            if t + k < z.size(0) and targets[t + k] >= 0:
                total += w * F.cross_entropy(u[t:t + 1], targets[t + k:t + k + 1])
        if prefix_table is not None and targets[t] >= 0 and prefix_table[targets[t]] >= 0:
            total += weights[-1].item() * F.cross_entropy(u[t:t + 1], prefix_table[targets[t]].view(1))
    return total


def _ce_case(seed=0, T=37, V=300, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(T, V, generator=g)).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    targets[[4, 20]] = -100
    prefix_table = torch.randint(-1, V, (V,), generator=g)  # about one token in V without a prefix
    prefix_table[targets[7]] = -1
    return z, targets, torch.tensor([1.0, 0.5, 0.25]), prefix_table


def test_multi_token_loss_equals_a_token_by_token_reference(trainer):
    z, targets, weights, _ = _ce_case()
    y = trainer.target_matrix(targets, 3)
    rows, lse = trainer.softcap_mtp_ce(z, y, weights, 23.0, 5.0, 7.5)
    naive = _naive_mtp_loss(z, targets, weights, 23.0, 5.0, 7.5)
    assert rows.sum().item() == pytest.approx(naive.item(), rel=1e-5)
    only_next = trainer.softcap_mtp_ce(z, y, torch.tensor([1.0, 0.0, 0.0]), 23.0, 5.0, 7.5)[0].sum()
    assert only_next.item() == pytest.approx(_naive_mtp_loss(z, targets, torch.tensor([1.0]), 23.0, 5.0, 7.5).item(),
                                             rel=1e-5), "weights (1, 0, 0) are plain next-token cross-entropy"
    assert rows.sum() > only_next, "negative control: the later tokens add loss"


def test_prefix_target_loss_equals_a_token_by_token_reference(trainer):
    """With a prefix table the last weight scores CE against the next token's prefix token, where it has one
    (the -100 targets and the tokens the table maps to -1 add nothing)."""
    z, targets, weights, table = _ce_case(seed=2)
    weights = torch.tensor([1.0, 0.5, 0.25, 0.4])
    y = trainer.target_matrix(targets, 3, table)
    assert y.shape == (37, 4) and y[7, 3] == -100 and y[4, 3] == -100, "no prefix target where none exists"
    rows, _ = trainer.softcap_mtp_ce(z, y, weights, 23.0, 5.0, 7.5)
    naive = _naive_mtp_loss(z, targets, weights, 23.0, 5.0, 7.5, prefix_table=table)
    assert rows.sum().item() == pytest.approx(naive.item(), rel=1e-5)
    without = _naive_mtp_loss(z, targets, weights[:3], 23.0, 5.0, 7.5)
    assert rows.sum().item() != pytest.approx(without.item(), rel=1e-3), "negative control: the prefix adds loss"


def test_the_loss_gradient_formula_equals_autograd_of_the_reference(trainer):
    z, targets, _, table = _ce_case(seed=1)
    targets, weights = trainer.target_matrix(targets, 3, table), torch.tensor([1.0, 0.5, 0.25, 0.4])
    targets[3, 3] = targets[3, 0]  # a prefix target equal to another of the row's: both count
    zr = z.clone().requires_grad_()
    rows, _ = trainer.softcap_mtp_ce_reference(zr, targets, weights, 23.0, 5.0, 7.5)
    grad = torch.rand(z.size(0))
    (rows * grad).sum().backward()
    _, lse = trainer.softcap_mtp_ce_reference(z, targets, weights, 23.0, 5.0, 7.5)
    mine = trainer.softcap_mtp_ce_backward_reference(z, targets, weights, lse, grad, 23.0, 5.0, 7.5)
    torch.testing.assert_close(mine, zr.grad, rtol=1e-5, atol=1e-7)


_INTERPRETED_CE = r"""
import torch
import {module} as t
assert t._kernels_interpreted(), "TRITON_INTERPRET=1 must be set before the import"
worst = 0.0
for seed, (T, V) in enumerate([(37, 300), (5, 64), (70, 1000)]):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(T, V, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=g)
    targets[T // 2] = -100
    targets = t.target_matrix(targets, 3, torch.randint(-1, V, (V,), generator=g))
    w = torch.tensor([1.0, 0.5, 0.25, 0.4])
    rows, lse = t.softcap_mtp_ce(z, targets, w, 23.0, 5.0, 7.5)
    grad = torch.rand(T, generator=g)
    (rows * grad).sum().backward()
    ref_rows, ref_lse = t.softcap_mtp_ce_reference(z.detach(), targets, w, 23.0, 5.0, 7.5)
    ref_dz = t.softcap_mtp_ce_backward_reference(z.detach(), targets, w, ref_lse, grad, 23.0, 5.0, 7.5)
    # The loss and its gradient from one kernel (FP8HeadLoss's): unit row gradients times grad_mul = 3.
    unit = t.softcap_mtp_ce_backward_reference(z.detach(), targets, w, ref_lse, torch.ones(T), 23.0, 5.0, 7.5)
    pairs = [(rows, ref_rows), (lse, ref_lse), (z.grad, ref_dz)]
    # its passes' forms (CE_PASS_MATH): the tanh form's algebra on the first, ragged shape (which pass takes which
    # form, the interpreter cannot see: its tanh is exact; kernel_sass's test counts the instructions)
    trainer_forms = t.CE_PASS_MATH
    for forms in (("exact", "exact"), ("tanh", "tanh"))[:2 if seed == 0 else 1]:
        t.CE_PASS_MATH = forms
        fused_rows, fused_dz = t.softcap_mtp_ce_with_grad(z.detach(), targets, w, 23.0, 5.0, 7.5, 3.0, 1e30,
                                                          torch.float32)
        pairs += [(fused_rows, ref_rows), (fused_dz, 3 * unit)]
    t.CE_PASS_MATH = trainer_forms
    for got, want in pairs:
        worst = max(worst, ((got.detach() - want).norm() / want.norm()).item())
    _, clipped = t.softcap_mtp_ce_with_grad(z.detach(), targets, w, 23.0, 5.0, 7.5, 3.0, 1e-3, torch.float32)
    assert clipped.abs().max() == 1e-3 and (3 * unit).abs().max() > 1e-3, "the clamp reaches the output"
print(worst)
"""


def test_triton_loss_kernels_equal_the_reference_under_the_interpreter(trainer):
    """Forward, backward and loss-with-gradient kernels, run by the Triton interpreter on CPU in float32, against
    the torch reference (rows, log-sum-exp, gradient; the last also clamped, and with each form of its passes:
    the tanh form's algebra, with the interpreter's exact tanh), on shapes where the vocabulary is and is not a
    block multiple. (The interpreter's float8 conversion is not the GPU's: the e5m2 store is
    checked on a GPU, test_loss_with_gradient_kernel_casts_like_torch_on_a_gpu.)"""
    if not trainer.HAS_TRITON:
        pytest.skip("triton is not installed")
    out = run_interpreted(_INTERPRETED_CE.format(module=trainer.__name__))
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip()) < 1e-5, f"relative error of the interpreted kernels: {out.stdout}"


def _e5m2_case(trainer):
    z, targets, _, table = _ce_case(seed=3, T=64, V=1000)
    y, w = trainer.target_matrix(targets, 3, table), torch.tensor([1.0, 0.5, 0.25, 0.4])
    _, lse = trainer.softcap_mtp_ce_reference(z, y, w, 23.0, 5.0, 7.5)
    unit = trainer.softcap_mtp_ce_backward_reference(z, y, w, lse, torch.ones(z.size(0)), 23.0, 5.0, 7.5)
    return z, y, w, unit / trainer.FP8_HEAD_GRAD_SCALE


def test_loss_with_gradient_casts_the_scaled_gradient_to_e5m2(trainer):
    """softcap_mtp_ce_with_grad's gradient (the reference path, as on CPU): the unit-row-gradient dL/dz times
    grad_mul, clamped, cast to e5m2 with torch's rounding; the loss rows are the forward's."""
    z, y, w, want = _e5m2_case(trainer)
    rows, g8 = trainer.softcap_mtp_ce_with_grad(z, y, w, 23.0, 5.0, 7.5, 1 / trainer.FP8_HEAD_GRAD_SCALE,
                                                trainer.FP8_E5M2_MAX, torch.float8_e5m2)
    assert g8.dtype == torch.float8_e5m2 and g8.shape == z.shape
    assert torch.equal(g8.float(), want.to(torch.float8_e5m2).float())
    torch.testing.assert_close(rows, trainer.softcap_mtp_ce_reference(z, y, w, 23.0, 5.0, 7.5)[0])
    _, small = trainer.softcap_mtp_ce_with_grad(z, y, w, 23.0, 5.0, 7.5, 1.0, trainer.FP8_E5M2_MAX, torch.float8_e5m2)
    lost = (small.float() == 0).float().mean() - (g8.float() == 0).float().mean()
    assert lost > 0.02, "negative control: without the scale, small gradients fall below e5m2's subnormals"
    torch.library.opcheck(trainer.softcap_mtp_ce_with_grad, (z, y, w, 23.0, 5.0, 7.5, 600.0, 57344.0,
                                                             torch.float8_e5m2), test_utils=("test_faketensor",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_loss_with_gradient_kernel_casts_like_torch_on_a_gpu(trainer):
    """On a GPU the Triton kernel's e5m2 store equals torch's cast of its own fp32 gradient (round to nearest)."""
    z, y, w, want = (t.cuda() for t in _e5m2_case(trainer))
    args = (z, y, w, 23.0, 5.0, 7.5, 1 / trainer.FP8_HEAD_GRAD_SCALE, trainer.FP8_E5M2_MAX)
    _, g32 = trainer.softcap_mtp_ce_with_grad(*args, torch.float32)
    _, g8 = trainer.softcap_mtp_ce_with_grad(*args, torch.float8_e5m2)
    torch.testing.assert_close(g32, want, rtol=1e-4, atol=1e-6)
    assert torch.equal(g8.float(), g32.to(torch.float8_e5m2).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_loss_with_gradient_tanh_form_agrees_with_the_exact_one_on_a_gpu(trainer, monkeypatch):
    """CE_PASS_MATH's tanh form (tanh.approx.f32 for the sigmoid in both passes) at the model's vocabulary and
    bf16 logits: row losses within (sum of the weights) * 23 * 2^-12 of the exact form's (its worst-case bound; the
    mean far closer),
    and e5m2 gradients within e5m2's rounding of them; the forms must differ somewhere (else the option did
    nothing)."""
    g = torch.Generator(device="cuda").manual_seed(5)
    T, V = 512, 50304
    z = (4 * torch.randn(T, V, device="cuda", generator=g)).bfloat16()
    tokens = torch.randint(0, V, (T,), device="cuda", generator=g)
    y = trainer.target_matrix(tokens, 3, torch.randint(-1, V, (V,), device="cuda", generator=g))
    w = torch.tensor([1.0, 0.5, 0.25, 0.25], device="cuda")
    args = (z, y, w, 23.0, 5.0, 7.5, 1 / trainer.FP8_HEAD_GRAD_SCALE, trainer.FP8_E5M2_MAX, torch.float8_e5m2)
    monkeypatch.setattr(trainer, "CE_PASS_MATH", ("exact", "exact"))
    rows, g8 = trainer.softcap_mtp_ce_with_grad(*args)
    monkeypatch.setattr(trainer, "CE_PASS_MATH", ("tanh", "tanh"))
    rows_t, g8_t = trainer.softcap_mtp_ce_with_grad(*args)
    gap = (rows_t - rows).abs()
    bound = w.sum().item() * 23 * 2 ** -12
    assert gap.max() < bound and gap.mean() < 1e-3, f"row losses: max {gap.max():.2e}, mean {gap.mean():.2e}"
    a, b = g8_t.float(), g8.float()
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 0.05, f"gradients of the two forms: relative difference {rel:.4f}"
    assert not torch.equal(a, b) or gap.max() > 0, "the tanh form computed exactly the exact form's values"


# -----------------------------------------------------------------------------
# Components against plain formulas


def test_bigram_hash_is_the_formula_with_a_reserved_first_row(trainer):
    x = torch.tensor([50256, 7, 50255, 7, 0])
    h, s = trainer.bigram_indices(x, 377_280)
    for t in range(1, 5):
        a, b = int(x[t]), int(x[t - 1])
        assert h[t] == ((36313 * a) ^ (27191 * b)) % 377_279 and s[t] == (a ^ b) % 8192
    assert (h[0], s[0]) == (377_279, 0), "position 0 has no previous token"
    assert h[1] != h[3], "the previous token matters (negative control)"


@pytest.mark.parametrize("flags, world_size, joined", [
    (["--micro_batch_tokens=65536"], 1, (4, 2, 1)), (["--micro_batch_tokens=65536"], 2, (4, 2, 1)),
    (["--micro_batch_tokens=65536"], 4, (2, 2, 1)), (["--micro_batch_tokens=65536"], 8, (1, 1, 1)),
    ([], 1, (4, 2, 1)), (["--micro_batch_tokens=0"], 1, (1, 1, 1)), (["--micro_batch_tokens=131072"], 1, (8, 4, 2)),
    (["--micro_batch_tokens=100000"], 1, (4, 2, 2))])
def test_micro_batches_join_a_steps_rows_up_to_micro_batch_tokens(trainer, flags, world_size, joined):
    """Each stage joins the most of a rank's rows per step that divide them evenly and fit --micro_batch_tokens
    (rows of 16K / 32K / 48K tokens, 8 / world_size per rank and step; the default is 65536, 0 joins none); row_specs hands out
    rows / joined micro-batches per step, which together hold every row."""
    hp = trainer.parse_args(["--train_files=x", "--val_files=y", "--num_iterations=30", *flags])
    derived = trainer.derive(hp, world_size)
    assert derived.joined_rows == joined
    for step in (0, 10, 20, 29):
        plan = trainer.plan_step(step, hp, derived)
        specs = list(trainer.row_specs([step], hp, derived))
        assert specs == [(plan.seq_len, plan.doc_clip, plan.joined_rows)] * (plan.micro_batches // plan.joined_rows)
        assert sum(rows for *_, rows in specs) == plan.micro_batches == 8 // world_size


def test_rotary_positions_restart_at_each_joined_row(trainer):
    """Rows joined into one sequence (GPT.forward's row_pos) turn at their own positions 0 .. L - 1, exactly as
    alone. Within a document RoPE's scores depend only on position differences, so the loss alone cannot see
    this (bf16 rounding can); negative control: as one row the second turns at positions L .. 2L - 1."""
    rotary = trainer.Rotary(128, 64)
    x = torch.randn(2 * 24, 2, 128)
    alone = torch.cat([rotary(x[:24]), rotary(x[24:])])
    assert torch.equal(rotary(x, trainer.row_positions(48, 2)), alone)
    assert torch.equal(rotary(x, trainer.row_positions(48, 1)), rotary(x)), "one row: positions 0 .. T - 1"
    assert torch.equal(rotary(x)[:24], alone[:24]) and not torch.allclose(rotary(x)[24:], alone[24:])
    with pytest.raises(ValueError, match="48 positions do not split into 5 equal rows"):
        trainer.row_positions(48, 5)


def test_key_offset_moves_only_the_unrotated_dims_one_position(trainer):
    rotary = trainer.Rotary(128, 16)
    k = torch.randn(16, 2, 128)
    shifted = trainer.shift_unrotated_keys(k, rotary.unrotated)
    still = ~rotary.unrotated
    assert rotary.unrotated.sum() == 64 and torch.equal(shifted[..., still], k[..., still])
    assert torch.equal(shifted[1:, :, rotary.unrotated], k[:-1, :, rotary.unrotated])
    assert torch.equal(shifted[0], k[0]), "position 0 keeps its own key"
    x = torch.randn(16, 2, 128)
    torch.testing.assert_close(rotary(x)[..., rotary.unrotated], x[..., rotary.unrotated],
                               msg="the dims the offset moves are the ones RoPE leaves alone")


def test_xsa_removes_the_share_along_the_own_value(trainer):
    y, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    alpha = torch.tensor([0.0, 10.0])  # head 0 off, head 1 almost fully on (tanh(10) ~ 1)
    out = trainer.exclude_self_value(y, v, alpha)
    assert torch.equal(out[:, 0], y[:, 0])
    residue = (out[:, 1] * v[:, 1]).sum(-1)
    assert residue.abs().max() < 1e-4, "head 1's output is orthogonal to its value vector"


def test_smear_adds_the_gated_previous_embedding(trainer):
    hp = trainer.parse_args(["--preset=tiny", *SMALL_VOCAB_FLAGS])
    torch.manual_seed(0)
    model = trainer.GPT(hp)
    with torch.no_grad():
        model.smear_gate.normal_()
        model.global_scalars[model.global_scalar_names.index("smear")] = 0.7
    x = torch.randint(0, 255, (9,))
    e = model.embed(x)
    gate = torch.sigmoid(e[1:, :12] @ model.smear_gate)
    expected = torch.cat([e[:1], e[1:] + 0.7 * gate[:, None] * e[:-1]])
    torch.testing.assert_close(model.smear(model.embed(x)), expected)


# -----------------------------------------------------------------------------
# Training mechanics


def _trainer(trainer, tiny_corpus, *flags):
    hp = trainer.parse_args(["--preset=tiny", *tiny_corpus["flags"], *flags])
    return hp, trainer.Trainer(hp, 0, 1, torch.device("cpu"))


def test_embedding_is_the_head_until_the_untie_step_then_continues_from_its_adam_state(trainer, tiny_corpus):
    hp, t = _trainer(trainer, tiny_corpus)
    untie = t.untie_step
    steps = range(untie + 1 + hp.adam_every)  # through the first Adam step after the untie
    loader = trainer.DistributedTrainLoader(hp, 0, 1, torch.device("cpu"), trainer.row_specs(steps, hp, t.derived))
    for step in steps:
        t.train_step(step, loader)
        embed, head = t.model.embed.weight, t.model.lm_head_w
        if step < untie:
            assert torch.equal(embed, head), f"step {step}: tied, the embedding is the head's matrix"
        if step == untie:
            e, h = (next(x for x in t.adam.entries if x["param"] is p) for p in (embed, head))
            assert torch.equal(e["m"], h["m"]) and not t.tied, "at the untie step the head's moments are copied"
    assert not torch.equal(t.model.embed.weight, t.model.lm_head_w), "untied, they train apart (negative control)"


@pytest.mark.parametrize("adam_every", [2, 1])
def test_adam_steps_once_every_adam_every_steps_on_the_accumulated_gradients(trainer, tiny_corpus, adam_every):
    """Muon updates every step; Adam's parameters (here the scalars) only at the last of every adam_every steps,
    their gradients kept until then; the untie step is an Adam step. adam_every=1 is the negative control."""
    hp, t = _trainer(trainer, tiny_corpus, f"--adam_every={adam_every}")
    assert trainer.adam_steps_at(t.untie_step, hp), "the embedding unties on an Adam step"
    loader = trainer.DistributedTrainLoader(hp, 0, 1, torch.device("cpu"), trainer.row_specs(range(2), hp, t.derived))
    scalars, mlp = t.model.layer_scalars, t.model.blocks[0].mlp_fc
    before = [scalars.detach().clone(), mlp.detach().clone()]
    t.train_step(0, loader)
    assert not torch.equal(mlp, before[1]), "Muon steps every step"
    if adam_every == 2:
        assert torch.equal(scalars, before[0]) and scalars.grad is not None and mlp.grad is None, \
            "after a non-Adam step the Adam gradients are pending and Muon's are cleared"
        pending = scalars.grad.clone()
        t.train_step(1, loader)
        assert not torch.equal(scalars, before[0]) and scalars.grad is None, "Adam steps at the second step"
        assert pending.abs().sum() > 0
    else:
        assert not torch.equal(scalars, before[0]) and scalars.grad is None, "adam_every=1: Adam steps every step"


def test_checkpoints_fall_where_no_adam_gradients_are_pending(trainer):
    with pytest.raises(trainer.ConfigError, match="multiple of --adam_every"):
        trainer.parse_args(["--adam_every=2", "--checkpoint_every=5"])
    assert trainer.parse_args(["--adam_every=2", "--checkpoint_every=6"]).checkpoint_every == 6


@pytest.mark.parametrize("joined", ["0", "4096"])
def test_warmup_compiles_everything_the_timed_loop_runs(trainer, tiny_corpus, joined):
    """The timed loop must meet no new graph: after the warm-up steps (every stage, the untie, the extension)
    and a validation at training and final windows, training all steps and validating compiles nothing; also
    with rows joined per pass (--micro_batch_tokens, a count per stage that the graphs are specialized on).
    Counted with dynamo's eager backend on CPU, where windows, scale and MTP weights are tensors as on GPU."""
    from torch._dynamo.utils import counters
    hp, t = _trainer(trainer, tiny_corpus, "--num_iterations=9", "--extension_steps=2", "--warmup_steps=1",
                     f"--micro_batch_tokens={joined}")
    torch._dynamo.reset()
    counters.clear()
    t.forward = torch.compile(t.model, backend="eager", dynamic=False)
    warm = trainer.warmup_step_list(hp, t.derived)
    loader = trainer.DistributedTrainLoader(hp, 0, 1, torch.device("cpu"), trainer.row_specs(warm, hp, t.derived))
    for step in warm:
        t.train_step(step, loader)
    warm_graphs = counters["stats"]["unique_graphs"]
    steps = range(trainer.total_steps(hp))
    loader = trainer.DistributedTrainLoader(hp, 0, 1, torch.device("cpu"), trainer.row_specs(steps, hp, t.derived))
    for step in steps:
        t.train_step(step, loader)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert warm_graphs >= 1 and graphs == warm_graphs, f"{graphs - warm_graphs} graph(s) compiled in the timed loop"


@pytest.mark.parametrize("joined", [True, False])
def test_passes_of_one_length_share_a_graph_whatever_their_rows(trainer, tiny_corpus, joined):
    """Stage 1 joins 4 rows of 128 tokens per pass and stage 2 2 rows of 256 (--micro_batch_tokens=512, as the
    default joins 4 x 16K and 2 x 32K): the rows reach the model as a tensor of positions (row_positions), so
    stage 2 compiles no graph of its own. Negative control: a row per pass (--micro_batch_tokens=0) makes stage
    2's passes longer, and they get a graph. Counted with dynamo's eager backend on CPU."""
    from torch._dynamo.utils import counters
    hp, t = _trainer(trainer, tiny_corpus, "--stage_seq_len=128,256,512",
                     f"--micro_batch_tokens={512 if joined else 0}")
    assert t.derived.joined_rows == ((4, 2, 1) if joined else (1, 1, 1))
    first = {}
    for step in range(trainer.total_steps(hp)):
        first.setdefault(t.plan(step).stage, step)
    steps = [first[0], first[1]]
    loader = trainer.DistributedTrainLoader(hp, 0, 1, torch.device("cpu"), trainer.row_specs(steps, hp, t.derived))
    torch._dynamo.reset()
    counters.clear()
    t.forward = torch.compile(t.model, backend="eager", dynamic=False)
    graphs = []
    for step in steps:
        t.train_step(step, loader)
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[0] >= 1 and (graphs[1] == graphs[0]) == joined, f"graphs after stage 1, 2: {graphs}"


def test_the_default_recipe_reads_about_what_the_public_compressed_run_reads(trainer):
    """At --num_iterations=190 (the proxy budget), the run reads 63 x 131K + 64 x 262K + 63 x 393K + 15 x 393K
    tokens: the public schedule compressed, as in the issue's measurement."""
    hp = trainer.parse_args(["--num_iterations=190"])
    d = trainer.derive(hp, 1)
    tokens = sum(d.recipe.stages[trainer.plan_step(s, hp, d).stage].batch_tokens for s in range(205))
    assert tokens == 63 * 131072 + 64 * 262144 + 63 * 393216 + 15 * 393216 == 55_705_600
    assert np.isclose(tokens / 205, 271_734, atol=1)


# -----------------------------------------------------------------------------
# Prefix-token table (records #88)


def test_prefix_table_maps_each_token_to_its_longest_byte_prefix_token(trainer):
    """GPT-2's own vocabulary (data/gpt2/encoder.json): every token with a table entry has that token's bytes as
    a proper prefix, no longer proper prefix is a token, and single bytes and <|endoftext|> have none."""
    hp = trainer.parse_args([])
    table = trainer.load_prefix_table(hp)
    encoder = json.loads((ROOT / "data/gpt2/encoder.json").read_text())
    decode = trainer._gpt2_byte_decoder()
    spelled = {i: bytes(decode[c] for c in text) for text, i in encoder.items() if i != BOS}
    by_bytes = {b: i for i, b in spelled.items()}
    assert table.shape == (hp.vocab_size,) and table[BOS] == -1 and (table[hp.tokenizer_vocab:] == -1).all()
    assert (table[[by_bytes[bytes([b])] for b in range(256)]] == -1).all(), "a single byte has no proper prefix"
    assert spelled[table[by_bytes[b" hello"]]] == b" hell" and spelled[table[by_bytes[b"ing"]]] == b"in"
    for token in range(0, hp.tokenizer_vocab - 1, 97):  # a spread of the vocabulary, brute force
        b = spelled[token]
        longest = next((by_bytes[b[:n]] for n in range(len(b) - 1, 0, -1) if b[:n] in by_bytes), -1)
        assert table[token] == longest, f"token {token} {b!r}: table {table[token]}, longest prefix token {longest}"
    assert (table >= 0).sum() == hp.tokenizer_vocab - 257, "all but the 256 bytes and <|endoftext|> have a prefix"


def test_prefix_loss_needs_the_datas_own_vocabulary(trainer, tmp_path):
    """A missing file or a vocabulary of another size is a usage error naming the fix; zero prefix weights
    need no file at all."""
    with pytest.raises(trainer.ConfigError, match="cannot read it.*data/gpt2.*--prefix_weights"):
        trainer.load_prefix_table(trainer.parse_args([f"--prefix_vocab={tmp_path}/none.json"]))
    with pytest.raises(trainer.ConfigError, match="holds 50257 tokens, not --tokenizer_vocab=256"):
        trainer.load_prefix_table(trainer.parse_args(["--tokenizer_vocab=256", "--vocab_size=256", "--bos_id=255"]))
    assert not trainer.parse_recipe(trainer.parse_args(["--prefix_weights=0;0;0"])).prefix_loss


def test_the_model_scores_the_prefix_target_with_the_last_loss_weight(trainer):
    """GPT.head_loss with loss weights (1, 0, 0, w) is the next-token loss plus w times the softcapped CE of each
    position's logits against the prefix token of its target (the Trainer fills the table from the vocabulary)."""
    hp = trainer.parse_args(["--preset=tiny", *SMALL_VOCAB_FLAGS])
    torch.manual_seed(0)
    model = trainer.GPT(hp)
    table = torch.from_numpy(trainer.load_prefix_table(hp))
    model.prefix_table.copy_(table)
    x = torch.randn(64, hp.model_dim)
    targets = torch.randint(0, 255, (64,))
    targets[5] = -100
    w = 0.4
    with torch.no_grad():
        both = model.head_loss(x, targets, torch.tensor([1.0, 0.0, 0.0, w]))
        next_only = model.head_loss(x, targets, torch.tensor([1.0, 0.0, 0.0, 0.0]))
        logits = trainer.softcap_logits(trainer.F.linear(trainer.rms_norm(x), model.lm_head_w), hp.logit_softcap,
                                        hp.logit_offset, hp.logit_temp)
    prefix = table[targets.clamp_min(0)]
    keep = (targets >= 0) & (prefix >= 0)
    assert keep.sum() > 20 and (~keep).sum() > 1, "the case has tokens with and without a prefix"
    expected = next_only + w * F.cross_entropy(logits[keep], prefix[keep], reduction="sum")
    assert both.item() == pytest.approx(expected.item(), rel=1e-5)


# -----------------------------------------------------------------------------
# The Triton kernels compile for the GPU without one


_CE_SIGNATURE = {"Z": "*bf16", "TGT": "*i64", "W": "*fp32", "V": "i32", "stride_z": "i32", "cap": "fp32",
                 "offset": "fp32", "inv_temp": "fp32"}


_DC_SIGNATURE = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "MIX": "*fp32", "W2": "*fp32", "DOC": "*i32"}


@pytest.mark.parametrize("case", ["loss forward", "loss backward", "loss with e5m2 gradient", "mlp relu^2",
                                  "loss with e5m2 gradient, tanh", "mlp gradient", "mlp fp8 relu^2",
                                  "mlp relu^2 amax", "mlp fp8 down", "dc forward",
                                  "dc backward q", "dc backward kv", "transpose"])
def test_kernels_compile_for_hopper_without_a_gpu(trainer, case):
    """Each loss kernel, both MLP matmul epilogues, DC's kernels and the byte transpose compile to sm_90 SASS here with Triton's own ptxas
    (benchmarks/kernel_sass.compile_for_hopper), at the trainer's launch configurations: the GPU-only compile
    errors (a non-constexpr global, a PTX constraint) caught on a CPU machine; the loss kernels'
    transcendentals are the one-instruction PTX forms, and the MLP kernel's tiles move by TMA (UTMALDG loads,
    a UTMASTG store) into wgmma products (HGMMA; QGMMA for the FP8 up-projection's e4m3 tiles); DC's kernels at the model's 6 heads of 128 leave room for two
    programs in an SM's shared memory and spill little (at most 100 local loads and stores)."""
    if not trainer.HAS_TRITON or trainer._kernels_interpreted():
        pytest.skip("needs Triton's compiler (not the interpreter)")
    pytest.importorskip("triton.backends.nvidia")
    kernel_sass = load_script("benchmarks/kernel_sass.py", "kernel_sass")
    block, warps = trainer.CE_LAUNCH
    ce = {"K": 4, "BLOCK": block}
    kernels = {
        "loss forward": (trainer._softcap_mtp_ce_fwd_kernel, {**_CE_SIGNATURE, "ROWS": "*fp32", "LSE": "*fp32"}, ce),
        "loss backward": (trainer._softcap_mtp_ce_bwd_kernel, {**_CE_SIGNATURE, "LSE": "*fp32", "G": "*fp32",
                                                                "DZ": "*bf16", "stride_dz": "i32"}, ce),
        "loss with e5m2 gradient": (trainer._softcap_mtp_ce_grad_kernel, kernel_sass.SIGNATURE,
                                    {**ce, "CLAMP": 57344.0, "LOSS_MATH": 0, "GRAD_MATH": 0}),
        "loss with e5m2 gradient, tanh": (trainer._softcap_mtp_ce_grad_kernel, kernel_sass.SIGNATURE,
                                          {**ce, "CLAMP": 57344.0, "LOSS_MATH": 1, "GRAD_MATH": 1}),
    }
    mlp_warps = trainer.MLP_MATMUL_CONFIG[3]
    for name, config, operand, epilogue in (("mlp relu^2", trainer.MLP_MATMUL_CONFIG, "bf16", 0),
                                            ("mlp gradient", trainer.MLP_MATMUL_CONFIG, "bf16", 1),
                                            ("mlp fp8 relu^2", trainer.MLP_MATMUL_CONFIG_FP8, "fp8e4nv", 0)):
        bm, bn, bk, _, _ = config
        assert config[3] == mlp_warps, "the MLP kernel's launches share one warp count"
        out_tile = f"tensordesc<bf16[{bm}, {bn}]>"
        signature = {"a_desc": f"tensordesc<{operand}[{bm}, {bk}]>", "b_desc": f"tensordesc<{operand}[{bn}, {bk}]>",
                     "aux_desc": out_tile, "c_desc": out_tile,
                     "scale": "*bf16" if operand == "bf16" else "*fp32",  # unscaled launches pass the output
                     "amax": "*bf16", "a_scale": "*bf16", "M": "i32", "N": "i32", "K": "i32", "programs": "i32"}
        constexprs = {"EPILOGUE": epilogue, "SCALED": operand != "bf16", "AMAX": False, "A_CAST": False,
                      "PRECISION": "tf32", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
        kernels[name] = (trainer._mlp_matmul_kernel, signature, constexprs)
    # the up-projection gathering post's amax (--fp8_mlp_down), and the down-projection from bf16 post cast in
    # registers to e4m3 against an e4m3 w2 (the bf16 tile: A is read as bf16)
    up, _ = kernels["mlp relu^2"][1:]
    kernels["mlp relu^2 amax"] = (trainer._mlp_matmul_kernel, {**up, "amax": "*fp32"},
                                  {**kernels["mlp relu^2"][2], "AMAX": True})
    bm, bn, bk, _, _ = trainer.MLP_MATMUL_CONFIG
    kernels["mlp fp8 down"] = (trainer._mlp_matmul_kernel, {**up, "b_desc": f"tensordesc<fp8e4nv[{bn}, {bk}]>",
                                                            "scale": "*fp32", "a_scale": "*fp32"},
                               {**kernels["mlp relu^2"][2], "EPILOGUE": 2, "SCALED": True, "A_CAST": True})
    dc = {"H": 6, "D": 128, "WINDOW": trainer.DC_WINDOW, "BQ": trainer.DC_QUERIES, "BK": trainer.DC_KEYS,
          "PRECISION": "tf32"}
    kernels["dc forward"] = (trainer._dc_forward_kernel, {**_DC_SIGNATURE, "OUT": "*bf16", "LSE": "*fp32", "T": "i32"},
                             dc)
    kernels["dc backward q"] = (trainer._dc_backward_q_kernel, {
        **_DC_SIGNATURE, "LSE": "*fp32", "GRAD": "*bf16", "DQ": "*bf16", "DW2": "*fp32", "ROWSUM": "*fp32",
        "T": "i32"}, dc)
    kernels["dc backward kv"] = (trainer._dc_backward_kv_kernel, {
        **_DC_SIGNATURE, "LSE": "*fp32", "GRAD": "*bf16", "ROWSUM": "*fp32", "DK": "*bf16", "DV": "*bf16", "T": "i32"},
        dc)
    bm, bn, transpose_warps = trainer.TRANSPOSE_LAUNCH
    kernels["transpose"] = (trainer._transpose_kernel, {"X": "*u8", "Y": "*u8", "M": "i32", "N": "i32"},
                            {"BLOCK_M": bm, "BLOCK_N": bn})
    kernel, signature, constexprs = kernels[case]
    warps = (mlp_warps if case.startswith("mlp") else trainer.DC_WARPS if case.startswith("dc")
             else transpose_warps if case == "transpose" else warps)
    asm = kernel_sass.compile_for_hopper(kernel, signature, constexprs, warps)
    assert len(asm["cubin"]) > 0
    if case.startswith("dc"):
        spills = sum(op.startswith(("STL", "LDL")) for op in kernel_sass.opcodes(asm["cubin"]))
        assert spills <= 100, f"{spills} local-memory loads and stores: the kernel spills registers"
        # Hopper gives an SM 227 KiB: two programs of DC must fit one (Triton 3.6 asks 68 KiB, 3.9 48 KiB)
        assert asm["shared"] <= 227 * 1024 // 2, f"{asm['shared']} bytes of shared memory per program"
    elif case == "transpose":
        assert asm["shared"] <= 227 * 1024, f"{asm['shared']} bytes of shared memory per program"
    elif case.endswith("tanh"):  # the column loops' sigmoid is (1 + tanh(x / 2)) / 2 (kernel_sass counts them)
        assert "ex2.approx.ftz.f32" in asm["ptx"] and "tanh.approx.f32" in asm["ptx"], "the fast forms are used"
    elif case.startswith("loss"):
        assert "ex2.approx.ftz.f32" in asm["ptx"] and "rcp.approx.ftz.f32" in asm["ptx"], "the fast forms are used"
    else:
        opcodes = set(kernel_sass.opcodes(asm["cubin"]))
        gmma = "QGMMA" if "fp8" in case else "HGMMA"
        assert {"UTMALDG", "UTMASTG", gmma} <= opcodes, f"TMA copies and {gmma} expected; opcodes: {sorted(opcodes)}"
        assert ("ATOMG" in opcodes) == case.endswith("amax"), "one atomic max per tile, only when asked"
        if case == "mlp fp8 down":
            assert asm["shared"] <= 227 * 1024, f"{asm['shared']} bytes of shared memory per program"
