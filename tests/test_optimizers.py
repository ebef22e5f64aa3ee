"""Specification of the Optimizers section (Muon, NorMuon, cautious weight decay, OrScale, Scion: the papers cited in train_gpt.py).

Three parts. First, distributed equivalence: on 2, 3 and 4 gloo ranks, with parameter counts that
split unevenly (so shards are padded), two steps of DistAdam and of DistMuon in every variant give
the same parameters as the single-process run (world_size == 1, which calls no collective). Second,
the variants' defining properties, checked by calling the pure functions (`normuon_normalize`,
`muon_update`, `muon_shape_scale`) and DistAdam on one process. Third, the public recipe's settings
behind flags (off by default): the residual and sublayer weights' Adam lrs and betas, and the attention
output matrix stored (out, in) for NorMuon, in the tiny model, on one process and on 2 gloo ranks.

Tests run against train_gpt.py; train_gpt_medium.py shares this code line for line
(tests/test_tracks.py). Property tests run in float64 where the formula is to be checked exactly: the
orthogonalizer then computes in float64 and `muon_update` rounds its output O to float32, so the
remaining error is one float32 rounding of O (relative 6e-8) times lr.
"""
import importlib
import math

import pytest
import torch
from conftest import SMALL_BOS, SMALL_VOCAB_FLAGS, one_torch_thread, run_gloo_ranks, run_interpreted, shared_code_only

F64 = torch.float64


# Code train_gpt_medium.py shares line for line (tests/test_tracks.py): tested through train_gpt.py.
pytestmark = shared_code_only

# -----------------------------------------------------------------------------
# Distributed equivalence
# -----------------------------------------------------------------------------

# Muon parameters, grouped by DistMuon by matrix shape: (16, 8) 8 tall matrices, (24, 8) 2 tall,
# (12, 20) 3 wide, (20, 12) 1. On 3 ranks these pad to 9, 3, 3, 3 matrices; on 4 ranks to 8, 4, 4,
# 4; on 2 ranks to 8, 2, 4, 2: every world size pads some group, and some ranks own only padding.
MUON_SHAPES = [(4, 16, 8), (4, 16, 8), (2, 24, 8), (12, 20), (12, 20), (12, 20), (20, 12)]
# Adam parameters: 50, 63 and 3 elements, none a multiple of 4; 63 and 3 are odd, 50 is not a
# multiple of 3, so each world size pads some flat shard.
ADAM_SHAPES = [(50,), (7, 9), (3,)]
ADAM_LRS = [0.01, 0.02, 0.03]
ADAM_BETAS = [(0.8, 0.95), (0.5, 0.95), (0.9, 0.99)]  # each parameter its own, as the recipe's groups
ADAM_WDS = [0.0, 50.0, 400.0]  # decay lr^2 wd W: 0, 0.5% and 3.6% of W per step at these lrs
MUON_LR_MULS = [1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0]  # the (24, 8) group at 2x, as the MLP output matrices
# (lr_factor, momentum) of the two steps: different, so a step that ignores either is seen.
STEPS = [(1.0, 0.85), (0.5, 0.9)]

# Flag overrides (after --preset=tiny) of every variant the trainer offers.
VARIANTS = {
    "muon/newton_schulz5": ["--muon_ortho=newton_schulz5"],
    "muon/polar_express": ["--muon_ortho=polar_express"],
    "muon/turbo_muon": ["--muon_ortho=turbo_muon"],
    "muon+normuon": ["--normuon=true"],
    "muon+cautious_wd": ["--muon_weight_decay=3", "--cautious_wd=true"],
    "muon+plain_wd": ["--muon_weight_decay=3", "--cautious_wd=false"],
    "adam+cautious_wd": ["--adam_cautious_wd=true"],  # Adam's decay (ADAM_WDS) only where step and weight agree
    "orscale": ["--muon_variant=orscale", "--muon_weight_decay=0.01", "--cautious_wd=false"],
    "orscale_lm": ["--muon_variant=orscale_lm", "--muon_weight_decay=0.01", "--cautious_wd=false"],
    "scion": ["--muon_variant=scion", "--cautious_wd=false", "--muon_weight_decay=0"],
    "muon+bf16_weights": ["--muon_bf16_weights=true"],  # Muon's matrices bf16 (gradients: `_bf16_grad`)
    # cautious decay's mask on the joined float32 weight (plain decay is the default since 2026-11-30)
    "muon+cautious_wd+bf16_weights": ["--muon_weight_decay=3", "--cautious_wd=true", "--muon_bf16_weights=true"],
    # bf16 weights with the other update rules: each computes on the joined float32 weight
    "orscale_lm+bf16_weights": ["--muon_variant=orscale_lm", "--muon_weight_decay=0.01", "--cautious_wd=false",
                                "--muon_bf16_weights=true"],
    "scion+bf16_weights": ["--muon_variant=scion", "--cautious_wd=false", "--muon_weight_decay=0",
                           "--muon_bf16_weights=true"],
}

# Comparison tolerance of a distributed result against the single-process one (float32). The
# rank-summed gradient equals the single-process gradient exactly (see `_grad`), so the only
# possible differences come from batched matmuls over a different number of stacked matrices and
# from the thread count, i.e. float32 reduction order: ~1e-7 relative in O, at most a few 1e-6
# after the iterations, times lr <= 0.05 in the parameters (measured on CPU: bitwise equal, 0.0). The failures this guards against (a wrong shard,
# a lost padding row, state not carried to step 2, a rank stepping on its own gradient) move
# parameters by ~lr * O(1) >= 1e-3; the negative control below checks the data are that far apart.
# An average in place of the sum would not show in the steps: Adam and the orthogonalized updates
# are invariant to the gradient's scale up to their eps. So the workers also record what the
# collectives `reduce_scatter_sum` and `all_gather` return, and those are checked directly.
DIST_TOL = dict(rtol=1e-5, atol=1e-5)

def gloo_worker(rank, world_size, module):
    """One gloo rank (conftest.run_gloo_ranks): `two_steps` of every variant and the collectives'
    results, built by the same code as the parent's single-process reference."""
    trainer = importlib.import_module(module)
    results = {name: two_steps(trainer, flags, rank, world_size) for name, flags in VARIANTS.items()}
    results["collectives"] = collectives(trainer, rank, world_size)
    return results


def _dyadic(shape, seed):
    """Standard normal values rounded to multiples of 2^-10: sums of a few stay exact in float32."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return torch.round(x * 1024) / 1024


def _grad(shape, step, index, rank, world_size):
    """Rank r's share of the step's gradient G: [r == 0] G + (r - (W-1)/2) D, different on every rank
    and summing to exactly G over the ranks (the trainer divides each rank's loss by the step's
    micro-batch count over all ranks, so the reduce-scatter sums).

    G and D are multiples of 2^-10 of size < 2^4 and the offsets are multiples of 1/2, so every
    rank's share and their sum are exact in float32.
    """
    G = _dyadic(shape, seed=1000 * step + 2 * index)
    D = _dyadic(shape, seed=1000 * step + 2 * index + 1)
    return (rank == 0) * G + (rank - (world_size - 1) / 2) * D


def _bf16_grad(shape, step, index, rank, world_size):
    """For bf16 parameters (whose gradients are bf16): rank 0's share G + D, rank 1's -D, the others' zero,
    with G, D multiples of 1/16 below 8 in size: every share and the sum G are exact in bf16 (8 significant
    bits), so the ranks' summed gradient is the single process's exactly."""
    G, D = (torch.round(_dyadic(shape, seed=1000 * step + 2 * index + j).clamp(-7.9, 7.9) * 16) / 16 for j in (0, 1))
    if world_size == 1:
        return G
    return G + D if rank == 0 else -D if rank == 1 else torch.zeros(shape)


def _make_params():
    """Fresh Muon and Adam parameters (float32, seeded): ([MUON_SHAPES...], [ADAM_SHAPES...])."""
    gen = torch.Generator().manual_seed(0)
    muon_params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.5 / s[-1] ** 0.5) for s in MUON_SHAPES]
    with torch.no_grad():
        muon_params[-1].zero_()  # like the model's zero-initialized output projections
    adam_params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ADAM_SHAPES]
    return muon_params, adam_params


def two_steps(trainer, flags, rank, world_size, grads_of=None):
    """Parameters [muon..., adam...] after two training-loop steps of DistAdam and DistMuon.

    grads_of = (rank, world_size) whose gradients to use; default: this process's own.
    """
    grad_rank, grad_world = grads_of or (rank, world_size)
    hp = _hp(trainer, *flags)
    muon_params, adam_params = _make_params()
    adam = trainer.DistAdam(list(zip(adam_params, ADAM_LRS, ADAM_BETAS, ADAM_WDS)), hp.adam_eps, rank, world_size,
                            cautious=hp.adam_cautious_wd)
    muon = trainer.DistMuon(list(zip(muon_params, MUON_LR_MULS)), hp, rank, world_size)
    params = muon_params + adam_params
    grad = _bf16_grad if hp.muon_bf16_weights else _grad
    for step, (lr_factor, momentum) in enumerate(STEPS):
        for i, p in enumerate(params):
            p.grad = grad(p.shape, step, i, grad_rank, grad_world).to(p.dtype)
        adam.reduce_grads()
        muon.reduce_grads()
        adam.step(lr_factor)
        muon.step(lr_factor, momentum)
        adam.finish()
        muon.finish()
    return [p.detach().clone() for p in params]


def _rank_rows(rank, world_size):
    """Rank r's input to the collectives: [2 * world_size, 3], every entry distinct across ranks."""
    return torch.arange(6.0 * world_size).view(2 * world_size, 3) * (rank + 1) + 0.25 * rank


def collectives(trainer, rank, world_size):
    """What this rank receives from reduce_scatter_sum of `_rank_rows` and all_gather of its row."""
    full = _rank_rows(rank, world_size)
    return dict(reduce_scatter_sum=trainer.reduce_scatter_sum(full, world_size).wait().clone(),
                all_gather=trainer.all_gather(full[:1] + 100 * rank, world_size).wait().clone())


def _param_name(i):
    shapes = MUON_SHAPES + ADAM_SHAPES
    kind = "muon" if i < len(MUON_SHAPES) else "adam"
    return f"{kind} param {i} {list(shapes[i])}"


# 8 ranks: the speedrun's 8-way sharding (every group padded, most ranks own one matrix or padding).
@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_two_steps_of_every_variant_on_gloo_ranks_equal_the_single_process_steps(trainer, world_size, tmp_path):
    """Issue requirement: on W gloo ranks (uneven splits, padding) every variant's steps equal the
    single-process steps, and all ranks end with identical parameters. W = 1 is the reference itself:
    its path calls no collective. Two steps, so momentum, NorMuon's v and OrScale-LM's one-time
    calibration must persist correctly on each rank's shard."""
    ranks = run_gloo_ranks("test_optimizers:gloo_worker", world_size, tmp_path, trainer.__name__)
    sum_rows = torch.stack([_rank_rows(r, world_size) for r in range(world_size)]).sum(dim=0)
    gathered = torch.cat([_rank_rows(r, world_size)[:1] + 100 * r for r in range(world_size)])
    for rank, results in enumerate(ranks):
        torch.testing.assert_close(results["collectives"]["reduce_scatter_sum"], sum_rows[2 * rank:2 * rank + 2],
                                   rtol=1e-6, atol=0, msg=lambda m: (
                                       f"reduce_scatter_sum on rank {rank} of {world_size} must return rows "
                                       f"{2 * rank}..{2 * rank + 1} of the sum over ranks\n{m}"))
        assert torch.equal(results["collectives"]["all_gather"], gathered), (
            f"all_gather on rank {rank} of {world_size} must concatenate every rank's shard in rank order")
    for name, flags in VARIANTS.items():
        expected = two_steps(trainer, flags, 0, 1)
        for rank, results in enumerate(ranks):
            for i, (got, want) in enumerate(zip(results[name], expected)):
                torch.testing.assert_close(got, want, **DIST_TOL, msg=lambda m: (
                    f"{name}: {_param_name(i)} on rank {rank} of {world_size} differs from the "
                    f"single-process step\n{m}"))
                assert torch.equal(got, ranks[0][name][i]), (
                    f"{name}: {_param_name(i)} differs between rank {rank} and rank 0 of {world_size}; "
                    "the all-gather should give every rank the same bytes")


def test_dist_muon_on_one_rank_applies_muon_update_to_every_matrix(trainer):
    """The single-process reference itself: DistMuon's grouping, stacking and write-back change
    nothing, i.e. each parameter moves as muon_update on its own matrices (every statistic is per
    matrix or per row), with lr = muon_lr * lr_factor and its own lr multiplier, for two steps of every variant."""
    for name, flags in VARIANTS.items():
        hp = _hp(trainer, *flags)
        params, _ = _make_params()
        refs = [p.detach().clone().reshape(-1, *p.shape[-2:]) for p in params]
        states = [dict(momentum=torch.zeros_like(W), v=torch.zeros(W.shape[0], max(W.shape[1:])),
                       c=torch.zeros(W.shape[0])) for W in refs]
        muon = trainer.DistMuon(list(zip(params, MUON_LR_MULS)), hp, rank=0, world_size=1)
        grad = _bf16_grad if hp.muon_bf16_weights else _grad
        for step, (lr_factor, momentum) in enumerate(STEPS):
            for i, p in enumerate(params):
                p.grad = grad(p.shape, step, i, 0, 1).to(p.dtype)
                refs[i] = trainer.muon_update(refs[i], p.grad.float().reshape(refs[i].shape), states[i], hp,
                                              hp.muon_lr * lr_factor, momentum, MUON_LR_MULS[i])
            muon.reduce_grads()
            muon.step(lr_factor, momentum)
            muon.finish()
        for i, (p, ref) in enumerate(zip(params, refs)):
            want = trainer.split_fp32(ref)[0] if hp.muon_bf16_weights else ref  # bf16 weights: the high halves
            # Batched and per-parameter matmuls may round differently (float32): see DIST_TOL.
            torch.testing.assert_close(p.detach(), want.view_as(p), **DIST_TOL, msg=lambda m: (
                f"{name}: {_param_name(i)} after DistMuon(world_size=1) differs from muon_update on it alone\n{m}"))


def test_distributed_equivalence_data_would_expose_a_missing_gradient_sum(trainer):
    """Negative control for the test above: had a rank stepped on its own share of the gradient (no
    reduce-scatter), its parameters would miss the reference by far more than the tolerance, in every variant."""
    for name, flags in VARIANTS.items():
        expected = two_steps(trainer, flags, 0, 1)
        unreduced = two_steps(trainer, flags, 0, 1, grads_of=(0, 4))
        gap = max((a - b).abs().max().item() for a, b in zip(unreduced, expected))
        assert gap > 100 * DIST_TOL["atol"], f"{name}: rank 0's own gradient moves params by only {gap:.2e}"


# -----------------------------------------------------------------------------
# Variant properties (single process)
# -----------------------------------------------------------------------------


NO_DECAY = ("--muon_weight_decay=0", "--cautious_wd=false")  # Muon decay is on by default


def _hp(trainer, *flags):
    """The tiny preset with plain Muon (NorMuon off, though the trainer's default) unless flags say otherwise."""
    return trainer.parse_args(["--preset=tiny", "--normuon=false", *flags])


def _state(shape, momentum=None):
    """muon_update's per-stack buffers for W [B, m, n], zero unless a momentum buffer is given."""
    B, m, n = shape
    M = torch.zeros(shape, dtype=F64) if momentum is None else momentum.clone()
    return dict(momentum=M, v=torch.zeros(B, max(m, n), dtype=F64), c=torch.zeros(B, dtype=F64))


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale


def _rows_of_unequal_scale(seed=0):
    """[3, 20, 12] float32 (tall: NorMuon's statistic is per row) with row norms spread over a factor of 100
    (as O's rows are after NS)."""
    O = torch.randn(3, 20, 12, generator=torch.Generator().manual_seed(seed))
    return O * torch.logspace(-1, 1, 20).view(1, 20, 1)


def test_normuon_keeps_each_matrix_frobenius_norm(trainer):
    O = _rows_of_unequal_scale()
    out = trainer.normuon_normalize(O, torch.zeros(3, 20), 0.95, 1e-10)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), O.norm(dim=(-2, -1)), rtol=1e-5, atol=0,
                               msg=lambda m: f"NorMuon must rescale O_hat back to ||O||_F per matrix\n{m}")
    assert not torch.allclose(out, O, rtol=1e-3), "the normalization should change the matrix, not only keep its norm"


def test_normuon_updates_v_in_place_as_ema_of_row_mean_square(trainer):
    O = _rows_of_unequal_scale()
    v0 = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) + 0.5
    v = v0.clone()
    trainer.normuon_normalize(O, v, 0.9, 1e-10)
    torch.testing.assert_close(v, 0.9 * v0 + 0.1 * O.square().mean(dim=-1), rtol=1e-6, atol=0,
                               msg=lambda m: f"v must become b2 v + (1-b2) mean(O^2, dim=-1), in place\n{m}")


def test_normuon_from_zero_state_with_beta2_zero_equalizes_row_rms(trainer):
    """With v = 0 and b2 = 0, v is this step's row mean square, so every row gets the same RMS,
    which keeping ||O||_F fixes at ||O||_F / sqrt(m n); a wide matrix's columns likewise."""
    O = _rows_of_unequal_scale()
    rms_in = O.square().mean(dim=-1).sqrt()
    assert (rms_in.amax(-1) / rms_in.amin(-1) > 10).all(), "negative control: input rows must differ in RMS"
    out = trainer.normuon_normalize(O, torch.zeros(3, 20), 0.0, 1e-10)
    rms_out = out.square().mean(dim=-1).sqrt()
    target = (O.norm(dim=(-2, -1)) / math.sqrt(12 * 20)).unsqueeze(-1).expand_as(rms_out)
    torch.testing.assert_close(rms_out, target, rtol=1e-5, atol=0,
                               msg=lambda m: f"after one NorMuon step from v=0, b2=0, rows should share one RMS\n{m}")
    wide = trainer.normuon_normalize(O.mT.contiguous(), torch.zeros(3, 20), 0.0, 1e-10)
    torch.testing.assert_close(wide, out.mT, rtol=1e-5, atol=0, msg=lambda m: (
        f"a wide matrix is normalized per column: the transpose of the tall case\n{m}"))


def test_plain_muon_step_is_shape_scaled_orthogonalized_nesterov_momentum(trainer):
    """W <- W - lr * max(1, m/n)^0.5 * orth((1-b) G + b M), M <- b M + (1-b) G (github KellerJordan/Muon)."""
    hp = _hp(trainer, "--muon_ortho=polar_express", "--muon_weight_decay=0")
    lr, b = 0.05, 0.9
    W, G, M0 = _randn(2, 24, 8, seed=0, scale=0.1), _randn(2, 24, 8, seed=1), _randn(2, 24, 8, seed=2)
    state = _state(W.shape, momentum=M0)
    W_new = trainer.muon_update(W, G, state, hp, lr, b, lr_mul=2.0)
    M1 = b * M0 + (1 - b) * G
    torch.testing.assert_close(state["momentum"], M1, rtol=1e-12, atol=1e-12)
    O = trainer.orthogonalize((1 - b) * G + b * M1, "polar_express").float()
    torch.testing.assert_close(W_new, W - lr * 2.0 * math.sqrt(24 / 8) * O, rtol=0, atol=1e-7,
                               msg=lambda m: f"the step is lr * lr_mul * shape scale * O\n{m}")


def test_cautious_weight_decay_skips_entries_where_update_and_weight_disagree(trainer):
    """W <- W - lr_eff (O + wd lr 1[O W >= 0] W) (arXiv 2510.12402; decay rate wd * lr, the speedrun's
    form): compared with the wd = 0 step, the cautious step moves exactly lr_eff wd lr W on agreeing
    entries and nothing elsewhere (lr_eff = lr * shape scale, 1 for this wide matrix)."""
    lr, wd = 0.05, 2.0
    W, G, M0 = _randn(3, 12, 20, seed=0, scale=0.1), _randn(3, 12, 20, seed=1), _randn(3, 12, 20, seed=2)
    no_wd, cautious, plain = (_hp(trainer, "--muon_weight_decay=0"),
                              _hp(trainer, f"--muon_weight_decay={wd}", "--cautious_wd=true"),
                              _hp(trainer, f"--muon_weight_decay={wd}", "--cautious_wd=false"))
    W0 = trainer.muon_update(W, G, _state(W.shape, M0), no_wd, lr, 0.95)
    W_c = trainer.muon_update(W, G, _state(W.shape, M0), cautious, lr, 0.95)
    W_p = trainer.muon_update(W, G, _state(W.shape, M0), plain, lr, 0.95)
    U = (W - W0) / lr
    agree = (U * W) >= 0
    assert 0.2 < agree.double().mean() < 0.8, "negative control: the mask should have both kinds of entries"
    # Without decay muon_update forms lr*U in float32 (U is float32), with decay in float64: the steps
    # differ by up to one float32 rounding of lr*U (~1e-9 here), against a decay of ~5e-4.
    torch.testing.assert_close(W0 - W_c, lr * wd * lr * W * agree, rtol=0, atol=1e-8, msg=lambda m: (
        f"cautious decay must be lr*wd*lr*W where sign(U) == sign(W) and 0 elsewhere\n{m}"))
    torch.testing.assert_close(W0 - W_p, lr * wd * lr * W, rtol=0, atol=1e-8,
                               msg=lambda m: f"non-cautious decay must be lr*wd*lr*W on every entry\n{m}")


def _orscale_lm_direction(trainer, W, G, M_prev, b, wd, method):
    """OrScale-LM's D = wd W + 0.2 sqrt(max(m, n)) Q, Q = orth of the Nesterov momentum (float32 Q)."""
    m, n = W.shape[-2:]
    M = b * M_prev + (1 - b) * G
    Q = trainer.orthogonalize((1 - b) * G + b * M, method).float()
    return wd * W + 0.2 * math.sqrt(max(m, n)) * Q, M


def test_orscale_lm_calibrates_c_once_so_the_first_trust_ratio_is_one(trainer):
    """OrScale-LM (arXiv 2605.07815): c = ||W0||_F / ||D0||_F at the first step, so r = 1 there and
    W1 = W0 - lr D0; at step 2, c is kept and r = ||W1|| / (c ||D1|| + 1e-6), clipped."""
    wd, lr, b = 0.01, 0.05, 0.95
    hp = _hp(trainer, "--muon_variant=orscale_lm", f"--muon_weight_decay={wd}", "--muon_ortho=polar_express",
             "--cautious_wd=false")
    W0 = _randn(2, 12, 20, seed=0, scale=0.1)
    G0, G1 = _randn(2, 12, 20, seed=1), _randn(2, 12, 20, seed=2)
    state = _state(W0.shape)

    W1 = trainer.muon_update(W0, G0, state, hp, lr, b)
    D0, M = _orscale_lm_direction(trainer, W0, G0, torch.zeros_like(W0), b, wd, "polar_express")
    torch.testing.assert_close(W1, W0 - lr * D0, rtol=0, atol=1e-7,
                               msg=lambda m: f"step 1 must use trust ratio r = 1 (W1 = W0 - lr D0)\n{m}")
    c1 = state["c"].clone()
    torch.testing.assert_close(c1, W0.norm(dim=(-2, -1)) / D0.norm(dim=(-2, -1)), rtol=1e-12, atol=0)

    W2 = trainer.muon_update(W1, G1, state, hp, lr, b)
    assert torch.equal(state["c"], c1), "c must be set once, at the first step, and then kept"
    D1, _ = _orscale_lm_direction(trainer, W1, G1, M, b, wd, "polar_express")
    r = (W1.norm(dim=(-2, -1)) / (c1 * D1.norm(dim=(-2, -1)) + 1e-6)).clamp(hp.orscale_r_min, hp.orscale_r_max)
    assert ((r - 1).abs() > 1e-3).all(), f"negative control: step 2's ratio should differ from 1, got {r}"
    torch.testing.assert_close(W2, W1 - lr * r[:, None, None] * D1, rtol=0, atol=1e-7,
                               msg=lambda m: f"step 2 must scale D by r from the step-1 c\n{m}")


def test_orscale_clips_the_trust_ratio_into_r_min_r_max(trainer):
    """Plain OrScale (s = c = 1, wd = 0): r = ||W||_F / (||Q||_F + 1e-6), ||Q||_F ~ sqrt(12). A huge
    W gives r ~ 1e3 (clipped to r_max), a tiny W r ~ 1e-3 (clipped to r_min), a moderate W stays."""
    hp = _hp(trainer, "--muon_variant=orscale", *NO_DECAY, "--muon_ortho=polar_express",
             "--orscale_r_min=0.5", "--orscale_r_max=1.5")
    lr, b = 0.05, 0.95
    scales = torch.tensor([100.0, 1e-4, 0.22], dtype=F64).view(3, 1, 1)  # huge, tiny, moderate ||W||
    W, G = _randn(3, 12, 20, seed=0) * scales, _randn(3, 12, 20, seed=1)
    W_new = trainer.muon_update(W, G, _state(W.shape), hp, lr, b)
    Q, _ = _orscale_lm_direction(trainer, W, G, torch.zeros_like(W), b, 0.0, "polar_express")
    Q = Q / (0.2 * math.sqrt(20))  # undo the LM scale: plain OrScale uses s = 1
    raw = W.norm(dim=(-2, -1)) / (Q.norm(dim=(-2, -1)) + 1e-6)
    assert raw[0] > 100 * hp.orscale_r_max and raw[1] < hp.orscale_r_min / 100, f"precondition: raw r = {raw}"
    assert hp.orscale_r_min < raw[2] < hp.orscale_r_max, f"precondition: moderate raw r = {raw[2]}"
    expected_r = torch.stack([torch.tensor(hp.orscale_r_max, dtype=F64), torch.tensor(hp.orscale_r_min, dtype=F64),
                              raw[2]])
    # The step, divided by lr Q, is r (per matrix).
    r_used = ((W - W_new) * Q).sum(dim=(-2, -1)) / (lr * Q.square().sum(dim=(-2, -1)))
    torch.testing.assert_close(r_used, expected_r, rtol=1e-6, atol=0,
                               msg=lambda m: f"trust ratio must be clip(r, r_min, r_max) = {expected_r.tolist()}\n{m}")


@pytest.mark.parametrize("shape", [(2, 24, 8), (2, 12, 20)])
def test_scion_step_is_frank_wolfe_on_orthogonalized_ema_momentum(trainer, shape):
    """W <- (1 - lr) W - lr radius sqrt(m/n) orth(M), M <- b M + (1-b) G, no Nesterov (section 8)."""
    hp = _hp(trainer, "--muon_variant=scion", "--scion_radius=2.0", "--muon_ortho=polar_express", *NO_DECAY)
    lr, b = 0.05, 0.9
    m, n = shape[-2:]
    W, G, M0 = _randn(*shape, seed=0, scale=0.1), _randn(*shape, seed=1), _randn(*shape, seed=2)
    state = _state(shape, M0)
    W_new = trainer.muon_update(W, G, state, hp, lr, b)
    M1 = b * M0 + (1 - b) * G
    torch.testing.assert_close(state["momentum"], M1, rtol=1e-12, atol=1e-12)
    step = lr * 2.0 * math.sqrt(m / n)
    expected = (1 - lr) * W - step * trainer.orthogonalize(M1, "polar_express").float()
    torch.testing.assert_close(W_new, expected, rtol=0, atol=1e-7)
    nesterov = (1 - lr) * W - step * trainer.orthogonalize((1 - b) * G + b * M1, "polar_express").float()
    assert (W_new - nesterov).abs().max() > 1e-3, "negative control: Nesterov momentum would be visibly different"


@pytest.mark.parametrize("method", ["newton_schulz5", "polar_express", "turbo_muon"])
def test_scion_with_zero_gradient_and_momentum_only_decays_weights(trainer, method):
    """orth(0) = 0, so the Frank-Wolfe step reduces to W <- (1 - lr) W."""
    hp = _hp(trainer, "--muon_variant=scion", f"--muon_ortho={method}", *NO_DECAY)
    W = _randn(2, 12, 20, seed=0)
    W_new = trainer.muon_update(W, torch.zeros_like(W), _state(W.shape), hp, 0.05, 0.9)
    torch.testing.assert_close(W_new, (1 - 0.05) * W, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["newton_schulz5", "polar_express", "turbo_muon"])
def test_ema_and_sum_momentum_give_the_same_orthogonalized_steps(trainer, method):
    """Sum form B <- b B + G, U = G + b B is the EMA form's U divided by (1 - b); the orthogonalizers
    normalize their input, so three Muon steps are the same either way."""
    hp = _hp(trainer, f"--muon_ortho={method}", "--muon_weight_decay=0")
    lr, b = 0.05, 0.95
    W_ema = W_sum = _randn(3, 12, 20, seed=0, scale=0.1)
    state, B = _state(W_ema.shape), torch.zeros_like(W_ema)
    for step in range(3):
        G = _randn(3, 12, 20, seed=10 + step)
        W_ema = trainer.muon_update(W_ema, G, state, hp, lr, b)
        B = b * B + G
        U_sum = G + b * B
        W_sum = W_sum - lr * trainer.muon_shape_scale(12, 20) * trainer.orthogonalize(U_sum, method).float()
    # Negative control: the two momenta differ by the factor 1/(1-b) = 20, not by rounding.
    torch.testing.assert_close(state["momentum"] / (1 - b), B, rtol=1e-10, atol=1e-10)
    # The normalizations' eps (1e-7 or 1e-6 against ||U||_F ~ 5 or ~100) and float32 rounding of O
    # leave differences ~1e-8 per step.
    torch.testing.assert_close(W_ema, W_sum, rtol=0, atol=1e-6)


def test_dist_adam_on_one_rank_equals_torch_adam_for_three_steps(trainer):
    """Adam with bias correction (arXiv 1412.6980, Algorithm 1), per-parameter lr and betas, no weight decay."""
    eps = 1e-10
    mine = [torch.nn.Parameter(_randn(*s, seed=i).float()) for i, s in enumerate(ADAM_SHAPES)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    adam = trainer.DistAdam(list(zip(mine, ADAM_LRS, ADAM_BETAS, [0.0] * 3)), eps, rank=0, world_size=1)
    torch_adam = torch.optim.Adam([dict(params=[p], lr=lr, betas=b) for p, lr, b in zip(ref, ADAM_LRS, ADAM_BETAS)],
                                  eps=eps)
    for step in range(3):
        for i, (p, q) in enumerate(zip(mine, ref)):
            p.grad = _randn(*p.shape, seed=100 * step + i).float()
            q.grad = p.grad.clone()
        adam.reduce_grads()
        adam.step(1.0)
        adam.finish()
        torch_adam.step()
        for i, (p, q) in enumerate(zip(mine, ref)):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: (
                f"step {step + 1}, param {list(ADAM_SHAPES[i])}: DistAdam differs from torch.optim.Adam\n{m}"))
    assert (mine[0] - _randn(50, seed=0).float()).abs().max() > 1e-3, "negative control: the params should move"


def test_dist_adam_lr_factor_scales_every_learning_rate(trainer):
    """lr_factor multiplies each parameter's lr; bias correction does not depend on lr."""
    eps, factor = 1e-10, 0.25
    mine = [torch.nn.Parameter(_randn(*s, seed=i).float()) for i, s in enumerate(ADAM_SHAPES)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in mine]
    adam = trainer.DistAdam(list(zip(mine, ADAM_LRS, ADAM_BETAS, [0.0] * 3)), eps, rank=0, world_size=1)
    torch_adam = torch.optim.Adam([dict(params=[p], lr=lr * factor, betas=b)
                                   for p, lr, b in zip(ref, ADAM_LRS, ADAM_BETAS)], eps=eps)
    for step in range(2):
        for i, (p, q) in enumerate(zip(mine, ref)):
            p.grad = _randn(*p.shape, seed=100 * step + i).float()
            q.grad = p.grad.clone()
        adam.reduce_grads()
        adam.step(factor)
        adam.finish()
        torch_adam.step()
    for i, (p, q) in enumerate(zip(mine, ref)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: (
            f"param {list(ADAM_SHAPES[i])}: DistAdam with lr_factor {factor} differs from Adam at lr * {factor}\n{m}"))


def test_dist_adam_cautious_decay_is_lr_squared_wd_where_step_and_weight_agree(trainer):
    """Compared with the same Adam step without decay, W moves by a further lr_t^2 wd W exactly where the Adam
    step u and W agree in sign (strictly; the speedrun's Adam decay), lr_t = lr * lr_factor; with
    cautious=False (--adam_cautious_wd=false) by lr_t^2 wd W on every entry."""
    lr, wd, factor = 0.1, 2.0, 0.5
    W = _randn(40, 30, seed=3).float()
    results = []
    for decay, cautious in ((0.0, True), (wd, True), (wd, False)):
        p = torch.nn.Parameter(W.clone())
        adam = trainer.DistAdam([(p, lr, (0.9, 0.99), decay)], 1e-10, rank=0, world_size=1, cautious=cautious)
        p.grad = _randn(40, 30, seed=4).float()
        adam.reduce_grads()
        adam.step(factor)
        adam.finish()
        results.append(p.detach())
    u = W - results[0]
    agree = (u * W) > 0
    assert 0.2 < agree.float().mean() < 0.8, "negative control: the mask should have both kinds of entries"
    decay = (lr * factor) ** 2 * wd * W
    torch.testing.assert_close(results[0] - results[1], decay * agree, rtol=1e-4, atol=1e-7,
                               msg=lambda m: f"decay must be (lr*factor)^2*wd*W where u*W > 0, else 0\n{m}")
    torch.testing.assert_close(results[0] - results[2], decay, rtol=1e-4, atol=1e-7,
                               msg=lambda m: f"plain decay must be (lr*factor)^2*wd*W on every entry\n{m}")


_INTERPRETED_ADAM = r"""
import torch
import train_gpt as t
assert t._kernels_interpreted(), "TRITON_INTERPRET=1 must be set before the import"
worst = {}
# several blocks with a ragged tail, cautious and plain decay; one partial block, no decay
for n, decay, cautious in ((10_000, 0.3, True), (10_000, 0.3, False), (37, 0.0, True)):
    g = torch.Generator().manual_seed(n)
    w, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = 0.1 * torch.randn(n, generator=g), torch.rand(n, generator=g)
    args = ((0.9, 0.99), 0.05, 0.3, 1e-10, decay, cautious)
    kernel_m, kernel_v = m.clone(), v.clone()
    kernel = t.adam_update(w, grad, kernel_m, kernel_v, *args)
    t._kernels_interpreted = lambda: False  # the torch formula, the kernel's specification
    ref_m, ref_v = m.clone(), v.clone()
    ref = t.adam_update(w, grad, ref_m, ref_v, *args)
    t._kernels_interpreted = lambda: True
    for name, a, b in (("w", kernel, ref), ("m", kernel_m, ref_m), ("v", kernel_v, ref_v)):
        worst[name] = max(worst.get(name, 0.0), ((a - b).norm() / b.norm()).item())
    assert not torch.equal(kernel, w), "negative control: the weights moved"
print(max(worst.values()))
"""


def test_fused_adam_kernel_equals_the_torch_formula_under_the_interpreter(trainer):
    """The one-pass Adam kernel (GPU path of DistAdam.step), run by the Triton interpreter on CPU in float32:
    new weights and both moments equal the torch formula's within float rounding, with cautious, plain and no
    decay."""
    out = run_interpreted(_INTERPRETED_ADAM)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip()) < 1e-6, f"relative error of the interpreted Adam kernel: {out.stdout}"


def test_muon_shape_scale_is_sqrt_of_fan_out_over_fan_in_at_least_one(trainer):
    assert trainer.muon_shape_scale(3072, 768) == 2.0
    assert trainer.muon_shape_scale(768, 3072) == 1.0
    assert trainer.muon_shape_scale(768, 768) == 1.0


def test_a_paused_adam_parameter_keeps_its_state_and_can_take_over_anothers(trainer):
    """The tied embedding: while paused, a parameter is neither reduced nor updated and its moments stay; after
    copy_state it continues from the other parameter's moments (the untie step)."""
    a, b = (torch.nn.Parameter(_randn(4, 3, seed=s).float()) for s in (1, 2))
    adam = trainer.DistAdam([(a, 0.1, (0.9, 0.99), 0.0), (b, 0.1, (0.9, 0.99), 0.0)], 1e-10, rank=0, world_size=1)
    adam.set_active(b, False)
    b_before = b.detach().clone()
    for step in range(2):
        a.grad = _randn(4, 3, seed=10 + step).float()
        adam.reduce_grads()
        adam.step(1.0)
        adam.finish()
    assert torch.equal(b, b_before) and adam.entries[1]["m"].abs().sum() == 0, "a paused parameter moved"
    adam.copy_state(a, b)
    assert torch.equal(adam.entries[1]["m"], adam.entries[0]["m"]) and torch.equal(adam.entries[1]["v"],
                                                                                   adam.entries[0]["v"])
    adam.set_active(b, True)
    a.grad, b.grad = torch.zeros(4, 3), torch.zeros(4, 3)
    adam.reduce_grads()
    adam.step(1.0)
    adam.finish()
    assert not torch.equal(b, b_before), "with a's moments and a zero gradient, b still moves (negative control)"


# -----------------------------------------------------------------------------
# The public's settings behind flags, off by default: the residual and sublayer weights' own Adam lrs and
# betas (--adam_lr_resid, --adam_lr_post, --adam_betas_lambdas) and the attention output matrix stored
# (out, in), so NorMuon normalizes it per output channel (--normuon_out_rows)
# -----------------------------------------------------------------------------

PUBLIC_LAMBDAS = ("--adam_lr_post=0.008", "--adam_betas_lambdas=0.9,0.95")
SCALAR_TABLES = ("resid_scalars", "post_scalars", "layer_scalars", "global_scalars")


def _adam_settings(trainer, *flags) -> dict:
    """Scalar table -> (lr, betas, weight decay) of its DistAdam entry in the tiny trainer with `flags`."""
    hp = trainer.parse_args(["--preset=tiny", *SMALL_VOCAB_FLAGS, *flags])
    t = trainer.Trainer(hp, 0, 1, torch.device("cpu"))
    entry = {id(e["param"]): e for e in t.adam.entries}
    return {name: (entry[id(getattr(t.model, name))]["lr"], entry[id(getattr(t.model, name))]["betas"],
                   entry[id(getattr(t.model, name))]["wd"]) for name in SCALAR_TABLES}


def test_residual_and_sublayer_weights_are_tables_of_their_own_with_the_scalars_adam_settings_by_default(trainer):
    """The residual weights r and sublayer weights p of x <- r x + p f(x) have their own [L, 2] tables (the
    public's resid_lambdas and post_lambdas), so Adam can step them apart from the other scalars; by default
    with the other scalars' lr 0.04, betas (0.9, 0.99) and no decay: Adam is elementwise, so that is the step
    of the one table they were part of. Each column holds what its name says, at its initial value, and
    each layer reads its row by name. Negative control: --adam_lr_post moves the sublayer weights' lr only."""
    model = trainer.GPT(trainer.parse_args(["--preset=tiny", *SMALL_VOCAB_FLAGS]))
    L = model.hp.num_layers
    tables = {names: table for names, table in model.layer_scalar_tables()}
    assert list(tables) == [("resid_attn", "resid_mlp"), ("post_attn", "post_mlp"), model.layer_scalar_names]
    assert tables[("resid_attn", "resid_mlp")] is model.resid_scalars and model.resid_scalars.shape == (L, 2)
    assert tables[("post_attn", "post_mlp")] is model.post_scalars and model.post_scalars.shape == (L, 2)
    assert torch.equal(model.resid_scalars, torch.full((L, 2), 1.1 ** 0.5)), "r starts at sqrt(1.1) (records #45)"
    assert torch.equal(model.post_scalars, torch.ones(L, 2)), "p starts at 1"
    assert not {"resid_attn", "post_attn", "resid_mlp", "post_mlp"} & set(model.layer_scalar_names), \
        "a weight in two tables would have two optimizer entries"
    with torch.no_grad():
        model.resid_scalars[2] = torch.tensor([3.0, 4.0])
        model.post_scalars[2] = torch.tensor([5.0, 6.0])
    weights = model.layer_weights(2)
    assert {n: weights[n].item() for n in ("resid_attn", "resid_mlp", "post_attn", "post_mlp")} == \
        dict(resid_attn=3.0, resid_mlp=4.0, post_attn=5.0, post_mlp=6.0), "layer 2 reads its row by column name"
    scalar = (0.04, (0.9, 0.99), 0.0)
    assert _adam_settings(trainer) == dict.fromkeys(SCALAR_TABLES, scalar), \
        "by default every scalar table steps as the one table of before: lr 0.04, betas (0.9, 0.99), no decay"
    moved = _adam_settings(trainer, "--adam_lr_post=0.01")
    assert moved == {**dict.fromkeys(SCALAR_TABLES, scalar), "post_scalars": (0.01, (0.9, 0.99), 0.0)}, moved


def test_public_lambda_flags_step_resid_at_0_04_post_at_0_008_both_with_betas_0_9_0_95(trainer):
    """--adam_lr_post=0.008 --adam_betas_lambdas=0.9,0.95 give the public's groups (frontier 2.4, 6):
    resid_lambdas at lr_mul 5 x 0.008 = 0.04, post_lambdas at 0.008, both betas (0.9, 0.95), no decay;
    the other scalars keep 0.04 and (0.9, 0.99). Malformed betas are a usage error naming the flag."""
    got = _adam_settings(trainer, *PUBLIC_LAMBDAS)
    assert got == dict(resid_scalars=(0.04, (0.9, 0.95), 0.0), post_scalars=(0.008, (0.9, 0.95), 0.0),
                       layer_scalars=(0.04, (0.9, 0.99), 0.0), global_scalars=(0.04, (0.9, 0.99), 0.0)), got
    with pytest.raises(trainer.ConfigError, match="--adam_betas_lambdas='0.95' must be two betas"):
        trainer.parse_args(["--adam_betas_lambdas=0.95"])


def test_split_fp32_halves_join_back_bit_for_bit_and_high_is_the_nearest_bf16(trainer):
    """split_fp32 / join_fp32 on normal, subnormal, signed-zero, infinite and extreme values and on exact ties: the
    join is the input's bits; high is the nearest bf16 (x.bfloat16(), which a float32 run's forward reads), but at
    ties, which it rounds away from zero, so that the low half fits 16 signed bits. Negative control: the
    truncation the public uses differs from it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-30, 30, (4096,), generator=gen),
                   torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.3e38, -3.3e38, float("inf"), -float("inf")])])
    bits = x.view(torch.int32)
    ties = (bits[:64] & -65536) | 0x8000  # low halves exactly half of bf16's last place
    halfway_down, halfway_up = ties - 1, ties + 1
    x = torch.cat([x, *(b.view(torch.float32) for b in (ties, halfway_down, halfway_up))])
    high, low = trainer.split_fp32(x)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert torch.equal(trainer.join_fp32(high, low).view(torch.int32), x.view(torch.int32)), "join undoes split"
    tie = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert tie.sum() >= 64
    assert torch.equal(high[~tie], x[~tie].bfloat16()), "high is the bf16 nearest x"
    assert (high[tie].float().abs() > x[tie].abs()).all(), "ties round away from zero"
    truncated = (x.view(torch.int32) >> 16).to(torch.int16)
    assert not torch.equal(high.view(torch.int16), truncated), "negative control: truncation differs from rounding"


def test_bf16_weights_with_their_low_halves_are_the_float32_weights_bit_for_bit(trainer):
    """With --muon_bf16_weights the parameters are bf16 and Muon keeps the bits bf16 drops: after two steps on
    the same (bf16-exact) gradients, each bf16 parameter joined with its low halves is the float32 parameter of
    a run without the flag, bit for bit. Negative control: the bf16 parameters alone are not."""
    runs = {}
    for bf16 in (False, True):
        hp = _hp(trainer, f"--muon_bf16_weights={str(bf16).lower()}")
        params, _ = _make_params()
        muon = trainer.DistMuon(list(zip(params, MUON_LR_MULS)), hp, rank=0, world_size=1)
        assert all(p.dtype == (torch.bfloat16 if bf16 else torch.float32) for p in params)
        for step, (lr_factor, momentum) in enumerate(STEPS):
            for i, p in enumerate(params):
                p.grad = _bf16_grad(p.shape, step, i, 0, 1).to(p.dtype)
            muon.reduce_grads()
            muon.step(lr_factor, momentum)
            muon.finish()
        runs[bf16] = (params, muon)
    (fp32_params, _), (bf16_params, muon) = runs[False], runs[True]
    for i, (w32, w16) in enumerate(zip(fp32_params, bf16_params)):
        low = _stack_rows(muon, w16, "low").view_as(w16)
        joined = trainer.join_fp32(w16.detach(), low)
        assert torch.equal(joined.view(torch.int32), w32.detach().view(torch.int32)), (
            f"{_param_name(i)}: bf16 weight + low halves differ from the float32 run's weight")
    assert not all(torch.equal(w16.detach().float(), w32.detach()) for w32, w16 in zip(fp32_params, bf16_params)), \
        "negative control: the bf16 weights alone equal the float32 ones, so the low halves are untested"


def _stack_rows(muon, param, key):
    """The rows of DistMuon state `key` ([k, ...] per shape group, one process) that belong to param's matrices."""
    for g in muon.groups:
        offset = 0
        for p in g["params"]:
            count = p.numel() // (g["shape"][0] * g["shape"][1])
            if p is param:
                return g["state"][key][offset:offset + count]
            offset += count
    raise KeyError("not a Muon parameter")


def _output_matrix_step(trainer, *flags, matrix: str = "o_w") -> dict:
    """One DistMuon step (one process) of the tiny model from its initial weights on one batch of documents:
    the loss, and per attention layer the matrix parameter (O by default) before, its gradient, after and
    NorMuon's v of it; and hp."""
    hp = trainer.parse_args(["--preset=tiny", *SMALL_VOCAB_FLAGS, *flags])
    torch.manual_seed(0)
    model = trainer.GPT(hp)
    tokens = torch.randint(0, SMALL_BOS, (257,), generator=torch.Generator().manual_seed(3))
    tokens[[0, 90, 200]] = SMALL_BOS
    cu, docs, max_len = trainer.document_bounds(tokens[:-1].numpy(), SMALL_BOS)
    loss = model(tokens[:-1], tokens[1:], torch.from_numpy(cu), trainer.attention_meta(docs, max_len, (1, 2)), 0.1,
                 torch.tensor([1.0, 0.5]))
    loss.backward()
    muon = trainer.DistMuon(model.hidden_matrices(), hp, 0, 1)
    outputs = [getattr(b, matrix) for b in model.blocks if getattr(b, matrix) is not None]
    before = [(o.detach().clone(), o.grad.clone()) for o in outputs]
    muon.reduce_grads()
    muon.step(1.0, hp.muon_momentum)
    muon.finish()
    return dict(hp=hp, loss=loss.item(), W=[w for w, _ in before], G=[g for _, g in before],
                after=[o.detach().clone() for o in outputs], v=[_stack_rows(muon, o, "v")[0] for o in outputs])


def _orthogonalized(trainer, hp, G):
    """O of muon_update's first step from zero momentum: orthogonalize((1 - b) G + b M), M = (1 - b) G."""
    M = torch.zeros_like(G).lerp(G, 1 - hp.muon_momentum)
    return trainer.orthogonalize(G.lerp(M, hp.muon_momentum)[None], hp.muon_ortho).float()[0]


def test_normuon_out_rows_normalizes_the_attention_output_matrix_per_output_channel(trainer):
    """The attention output matrix O (the residual's dim outputs from the heads' hdim inputs) stored (in, out)
    (--normuon_out_rows=false) gets NorMuon's per-row statistic of the square matrix per input channel; stored
    (out, in) (the default), as the public and as Q, K, V and the MLP: one second moment per output channel, the
    update being muon_update's (normuon_normalize included) on the (out, in) matrix. The same initial weights
    (transposed) and model either way; the flag changes NorMuon's statistic only: with --normuon=false the two
    steps agree up to the transpose (Polar Express's Frobenius normalization does not care; Turbo-Muon's AOL row
    scaling of a square matrix does, so the test pins Polar Express), with NorMuon they differ (negative control)."""
    pe = "--muon_ortho=polar_express"
    off, on = (_output_matrix_step(trainer, pe, f"--normuon_out_rows={v}") for v in ("false", "true"))
    hp, dim, hdim = on["hp"], on["hp"].model_dim, on["hp"].num_heads * on["hp"].head_dim
    assert dim == hdim, "the tiny model's O is square, as the 124M model's"
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-6), "the flag changes the layout, not the model"
    b2 = hp.normuon_beta2
    for i, (W, G, after, v) in enumerate(zip(on["W"], on["G"], on["after"], on["v"])):
        assert torch.equal(W, off["W"][i].T), f"attention layer {i}: O starts at the (in, out) layout's weights, transposed"
        torch.testing.assert_close(G, off["G"][i].T, rtol=1e-4, atol=1e-9)
        O = _orthogonalized(trainer, hp, G)  # (out, in)
        per_output, per_input = O.square().mean(dim=1), O.square().mean(dim=0)
        assert v.shape == (dim,), f"attention layer {i}: v holds {tuple(v.shape)}, not one entry per output channel"
        torch.testing.assert_close(v, (1 - b2) * per_output, rtol=1e-4, atol=0, msg=lambda m: (
            f"attention layer {i}: with --normuon_out_rows, v should be the EMA of O^2 per output channel\n{m}"))
        torch.testing.assert_close(off["v"][i], (1 - b2) * per_input, rtol=1e-4, atol=0, msg=lambda m: (
            f"attention layer {i}: O stored (in, out): v should be the EMA of O^2 per input channel\n{m}"))
        assert not torch.allclose(per_output, per_input, rtol=1e-3), "negative control: the two statistics differ"
        state = dict(momentum=torch.zeros(1, dim, hdim), v=torch.zeros(1, dim), c=torch.zeros(1))
        want = trainer.muon_update(W[None], G[None], state, hp, hp.muon_lr, hp.muon_momentum)[0]
        torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-7, msg=lambda m: (
            f"attention layer {i}: DistMuon's step of O should be muon_update's on the (out, in) matrix\n{m}"))
        gap = (after - off["after"][i].T).abs().max().item()
        assert gap > 1e-5, f"attention layer {i}: per output or input channel, the steps differ by only {gap:.1e}"
    plain_off, plain_on = (_output_matrix_step(trainer, pe, "--normuon=false", *flags)
                           for flags in (["--normuon_out_rows=false"], ["--normuon_out_rows=true"]))
    for i, (a, b) in enumerate(zip(plain_on["after"], plain_off["after"])):
        torch.testing.assert_close(a, b.T, rtol=1e-5, atol=1e-7, msg=lambda m: (
            f"attention layer {i}: without NorMuon the flag should change nothing but the layout\n{m}"))


def test_normuon_out_rows_gives_a_non_square_output_matrix_the_out_in_shape_scale(trainer):
    """With hdim != dim (heads of 48 in a model of 64; value embeddings and MUDD, which add [T, dim] to the values,
    off) O stored (out, in) is [64, 96]: its own Muon shape group (V stays [96, 64]) with shape scale
    max(1, 64/96)^0.5 = 1, where (in, out) [96, 64] (--normuon_out_rows=false) shares V's group and scale (3/2)^0.5. NorMuon's statistic
    runs along the longer side, 96, in either layout."""
    non_square = ["--head_dim=48", "--value_embed_layers=", "--mudd=false"]
    for out_in, o_shape, scale in ((False, (96, 64), 1.5 ** 0.5), (True, (64, 96), 1.0)):
        flags = [f"--normuon_out_rows={str(out_in).lower()}"]
        hp = trainer.parse_args(["--preset=tiny", *SMALL_VOCAB_FLAGS, *non_square, *flags])
        model = trainer.GPT(hp)
        muon = trainer.DistMuon(model.hidden_matrices(), hp, 0, 1)
        outputs = [b.o_w for b in model.blocks if b.o_w is not None]
        group = next(g for g in muon.groups if any(p is outputs[0] for p in g["params"]))
        assert group["shape"] == o_shape and all(p.shape == o_shape for p in outputs), (flags, group["shape"])
        assert trainer.muon_shape_scale(*group["shape"]) == pytest.approx(scale)
        assert group["state"]["v"].shape[-1] == 96
        shared = any(p is model.blocks[0].v_w for p in group["params"])
        assert shared == (not out_in), "V and O share a group exactly when they have one shape"


def test_muon_qk_blocks_whole_orthogonalizes_q_and_k_each_as_one_matrix(trainer):
    """By default Muon orthogonalizes Q and K per pair of heads (records #80): the parameter is H blocks [2 D, dim],
    each its own matrix. --muon_qk_blocks=whole gives the same memory the shape [2, H D, dim]: the same initial
    weights and loss, and Muon's step of each of Q and K is muon_update's on the whole [H D, dim] matrix (so Q and
    K join V's shape group). Four heads of 16 (the tiny preset's two heads make one pair: whole). Negative control:
    the default's per-pair step of the same gradient differs from it."""
    heads = ["--num_heads=4", "--head_dim=16"]
    pair = _output_matrix_step(trainer, *heads, matrix="qk_w")
    whole = _output_matrix_step(trainer, *heads, "--muon_qk_blocks=whole", matrix="qk_w")
    hp = whole["hp"]
    H, D, dim = hp.num_heads, hp.head_dim, hp.model_dim
    assert whole["loss"] == pytest.approx(pair["loss"], rel=1e-6), "the flag changes Muon's blocks, not the model"
    for i, (W, G, after) in enumerate(zip(whole["W"], whole["G"], whole["after"])):
        assert W.shape == (2, H * D, dim) and pair["W"][i].shape == (H, 2 * D, dim), (W.shape, pair["W"][i].shape)
        assert torch.equal(W.flatten(), pair["W"][i].flatten()), f"attention layer {i}: same initial Q and K"
        torch.testing.assert_close(G.flatten(), pair["G"][i].flatten(), rtol=1e-4, atol=1e-9)
        state = dict(momentum=torch.zeros_like(W), v=torch.zeros(2, H * D), c=torch.zeros(2))
        want = trainer.muon_update(W, G, state, hp, hp.muon_lr, hp.muon_momentum)
        torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-7, msg=lambda m: (
            f"attention layer {i}: with --muon_qk_blocks=whole, Q and K should each take muon_update's step of the "
            f"whole matrix\n{m}"))
        gap = (after.flatten() - pair["after"][i].flatten()).abs().max().item()
        assert gap > 1e-5, f"attention layer {i}: per pair or whole, Q and K's steps differ by only {gap:.1e}"
    model = trainer.GPT(hp)
    muon = trainer.DistMuon(model.hidden_matrices(), hp, 0, 1)
    group = next(g for g in muon.groups if any(p is model.blocks[0].qk_w for p in g["params"]))
    assert group["shape"] == (H * D, dim) and any(p is model.blocks[0].v_w for p in group["params"]), \
        "whole Q and K are stacked with V, the matrices of their shape"


def train_two_steps(rank, world_size, module, *flags):
    """Every parameter after the tiny trainer's first two steps (two rows a step: one each on two ranks, and on
    one rank joined into one pass, --micro_batch_tokens's default, unless `flags` set it to 0)."""
    trainer = importlib.import_module(module)
    hp = trainer.parse_args(["--preset=tiny", *flags])
    run = trainer.Trainer(hp, rank, world_size, torch.device("cpu"))
    loader = trainer.DistributedTrainLoader(hp, rank, world_size, torch.device("cpu"),
                                            trainer.row_specs(range(2), hp, run.derived))
    for step in range(2):
        run.train_step(step, loader)
    return {name: p.detach().clone() for name, p in run.model.named_parameters()}


def test_one_and_two_gloo_ranks_take_the_same_steps_with_the_public_lambdas_and_out_rows(trainer, tiny_corpus,
                                                                                          tmp_path):
    """With the three public settings on, two train steps on 2 gloo ranks (each rank orthogonalizing its share
    of the stacked matrices, O in its (out, in) layout among them; each holding a shard of every Adam table)
    give the parameters of one process; only float summation order differs. Cautious decay is off here: its mask
    is a sign test, so an update entry near zero whose sign differs by summation order moves by a whole decay
    step on one side only (one O entry did, with Turbo-Muon); its ranks are compared in the variants' test.
    Negative control: without the flags the same steps end measurably elsewhere (the comparison would see a
    setting lost on one side)."""
    flags = [*tiny_corpus["flags"], *PUBLIC_LAMBDAS, "--normuon_out_rows=true", "--cautious_wd=false"]
    with one_torch_thread():
        single = train_two_steps(0, 1, trainer.__name__, *flags)
        default = train_two_steps(0, 1, trainer.__name__, *tiny_corpus["flags"], "--cautious_wd=false")
    ranks = run_gloo_ranks("test_optimizers:train_two_steps", 2, tmp_path, trainer.__name__, *flags)
    tol = dict(rtol=1e-4, atol=1e-6)  # measured: 4e-6 at most (the bigram table, entries ~1)
    for rank, params in enumerate(ranks):
        assert params.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(params[name], single[name], **tol, msg=lambda m: (
                f"{name} on rank {rank} of 2 differs from one process's after two steps\n{m}"))
    for name, layout in (("resid_scalars", lambda w: w), ("post_scalars", lambda w: w), ("blocks.1.o_w", torch.t)):
        assert not torch.allclose(single[name], layout(default[name]), **tol), \
            f"negative control: {name} ends within the tolerance of where it ends with the public settings off"
