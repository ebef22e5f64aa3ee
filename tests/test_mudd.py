"""Per-token gates, MUDD connections and DC (records #81, #85) against plain references: the generator's
formula and init, which output goes where, the mixes, DC against dense masked attention, and the model at
init against the static-gate model it replaces."""
import json
import math

import pytest
import torch
from conftest import BOS, SMALL_VOCAB_FLAGS, run_interpreted, shared_code_only

pytestmark = shared_code_only


PUBLIC = ["--gate_split_layer=4", "--mudd=true", "--dc_layers=10"]  # the public record's (the default's too)


def test_gate_layout_is_the_public_26_pre_and_41_post_outputs(trainer):
    """At the public recipe's settings: pre gate (on x0) = XSA of layers 1, 3, the output gate of layer 3, then
    (x0, bigram) of layers 0..3; post gate = XSA of 4, 7, output gate of 10, (x0, bigram) of 4, 5, 7, 8, 9, skip,
    DC w1, w2 (frontier 2.6; layer 6 has no attention, layer 10's come from MUDD)."""
    hp = trainer.parse_args(PUBLIC)
    pre, post = trainer.gate_layout(hp, trainer.parse_recipe(hp))
    pairs = lambda layers: [(kind, i, 1) for i in layers for kind in ("x0_gate", "bigram_gate")]  # noqa: E731
    assert pre == [("xsa", 1, 6), ("xsa", 3, 6), ("attn_gate", 3, 6)] + pairs([0, 1, 2, 3])
    assert post == ([("xsa", 4, 6), ("xsa", 7, 6), ("attn_gate", 10, 6)] + pairs([4, 5, 7, 8, 9])
                    + [("skip_gate", 6, 1), ("dc_w1", 10, 6), ("dc_w2", 10, 6)])
    assert sum(w for *_, w in pre) == 26 and sum(w for *_, w in post) == 41
    hp = trainer.parse_args([*PUBLIC, "--mudd=false"])
    _, post = trainer.gate_layout(hp, trainer.parse_recipe(hp))
    assert ("x0_gate", 10, 1) in post, "without MUDD the last layer's x0 and bigram gates are gates too"


def test_coefficient_generator_is_the_formula_and_starts_at_its_init(trainer):
    g = torch.Generator().manual_seed(0)
    dim, init = 32, [0.0, 0.25, -0.5, 2.0]
    gen = trainer.CoefficientGenerator(dim, init, 0.1, learn_scale=True)
    x = torch.randn(7, dim, generator=g)
    torch.testing.assert_close(gen(x), torch.tensor(init).expand(7, -1), msg="W2 = 0: every token gets init")
    bound = 1 / math.sqrt(dim)  # nn.Linear's default: kaiming-uniform with a = sqrt(5)
    assert gen.w1.shape == (64, dim) and bound * 0.9 < gen.w1.abs().max() <= bound
    with torch.no_grad():
        gen.w2.normal_(generator=g)
        gen.b.normal_(generator=g)
        gen.scale.fill_(0.3)
    hidden = x @ gen.w1.T
    gelu = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    torch.testing.assert_close(gen(x), 0.3 * (gelu @ gen.w2.T + gen.b))
    fixed = trainer.CoefficientGenerator(dim, init, 0.1, learn_scale=False)
    assert fixed.scale is None and len(list(fixed.parameters())) == 3, "MUDD's scale is a constant"


def test_mudd_mixes_are_the_public_formulas_with_the_coefficients_in_order(trainer):
    """mu0..mu13 and n0..n4 by position, as frontier 2.5 lists them, with non-trivial values."""
    g = torch.Generator().manual_seed(1)
    T, D = 5, 8
    x, e, c7, last, ve, s3 = torch.randn(6, T, D, generator=g).unbind(0)
    mu = torch.randn(T, 14, generator=g)
    x_new, v_add = trainer.mudd_enter(trainer.coefficient_columns(mu, trainer.MUDD_IN), x, e, c7)
    m = [mu[:, j:j + 1] for j in range(14)]
    torch.testing.assert_close(v_add, m[0] * e + m[1] * c7 + m[2] * x)
    torch.testing.assert_close(x_new, (1 + m[5]) * x + m[3] * e + m[4] * c7)
    assert list(trainer.MUDD_IN)[6:] == ["ve_gate_a", "ve_gate_b", "resid_attn", "post_attn", "x0_gate",
                                         "bigram_gate", "resid_mlp", "post_mlp"]
    inits = list(trainer.MUDD_IN.values())
    assert inits[:6] == [0] * 6 and inits[6:] == [2, 2, 1.1 ** 0.5, 1, 0, 0.05, 1.1 ** 0.5, 1]
    n = torch.randn(T, 5, generator=g)
    out = trainer.mudd_exit(trainer.coefficient_columns(n, trainer.MUDD_OUT), x, e, c7, last, ve, s3)
    torch.testing.assert_close(out, x + n[:, :1] * e + n[:, 1:2] * c7 + n[:, 2:3] * last + n[:, 3:4] * ve
                               + n[:, 4:5] * s3)
    assert list(trainer.MUDD_OUT.values()) == [0, -0.5, 0, 0, 0], "n1 = -0.5 is the backout"


def _dense_dc(q, k, v, doc, w1, w2, window=112):
    """DC written densely: every (t, s) pair, mask t - window < s <= t and the same document."""
    T, H, _ = q.shape
    pos = torch.arange(T)
    mask = (pos[None] <= pos[:, None]) & (pos[:, None] - pos[None] < window) & (doc[:, None] == doc[None])
    probs = torch.einsum("thd,shd->hts", q, k).masked_fill(~mask, float("-inf")).softmax(-1)
    n = w1 / (w1.square().mean(-1, keepdim=True) + 1e-6).sqrt()
    a = (n.T[:, :, None] * probs).sum(0)  # [T, T]
    return w2[..., None] * torch.einsum("ts,shd->thd", a, v)


def test_dc_equals_dense_masked_attention_forward_and_gradient(trainer):
    """Blocks of 128 queries over a T that is not a multiple of 128, documents shorter and longer than the
    112-key window and crossing blocks; float64. Negative controls: window 113, and no document mask."""
    T, H, D = 300, 3, 8
    starts = [0, 20, 21, 90, 230]  # documents of 20, 1, 69, 140 (crosses blocks, longer than 112) and 70 tokens
    tokens = torch.zeros(T, dtype=torch.long)
    tokens[starts] = BOS
    cu, docs, _ = trainer.document_bounds(tokens.numpy(), BOS)
    cu = torch.from_numpy(cu)
    doc = (tokens == BOS).cumsum(0)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(T, H, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    w1, w2 = (torch.randn(T, H, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    grad = torch.randn(T, H, D, generator=g, dtype=torch.float64)
    got = trainer.local_head_mix(q, k, v, cu, w1, w2)
    want = _dense_dc(q, k, v, doc, w1, w2)
    torch.testing.assert_close(got, want)
    inputs = (q, k, v, w1, w2)
    for name, a, b in zip(["q", "k", "v", "w1", "w2"], torch.autograd.grad(got, inputs, grad),
                          torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{name} differs\n{m}")
    with torch.no_grad():
        assert not torch.allclose(got, _dense_dc(q, k, v, doc, w1, w2, window=113)), "negative control: window"
        assert not torch.allclose(got, _dense_dc(q, k, v, torch.zeros_like(doc), w1, w2)), "negative control: docs"


_INTERPRETED_DC = r"""
import json
import torch
import {module} as t
from conftest import KernelLaunches
assert t._kernels_interpreted(), "TRITON_INTERPRET=1 must be set before the import"
launches = KernelLaunches().watch(t, "_dc_forward_kernel", "_dc_backward_q_kernel", "_dc_backward_kv_kernel")
errors = {{}}
# T not a multiple of the 16-query blocks; documents shorter and longer than the window, one of one token
for T, starts in ((300, [0, 20, 21, 90, 230]), (37, [0]), (16, [0, 5])):
    tokens = torch.ones(T, dtype=torch.long)
    tokens[starts] = 0
    cu = torch.from_numpy(t.document_bounds(tokens.numpy(), 0)[0])
    g = torch.Generator().manual_seed(T)
    inputs = [torch.randn(T, 3, 16, generator=g) for _ in range(3)] + [torch.randn(T, 3, generator=g) for _ in range(2)]
    grad = torch.randn(T, 3, 16, generator=g)
    results = []
    for kernel in (True, False):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = t.local_head_mix(*leaves[:3], cu, *leaves[3:], kernel=kernel)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves, grad)))
    errors[T] = [((a - b).norm() / b.norm()).item() for a, b in zip(*results)]
print(json.dumps(dict(errors=errors, launches=[name for name, _ in launches])))
"""


def test_dc_kernels_equal_the_tensor_ops_under_the_interpreter(trainer):
    """DC by its three Triton kernels (forward; backward by query blocks and by key blocks) against the plain
    tensor ops, float32 under the interpreter: the output and the gradients of q, k, v, w1 and w2, for lengths
    that are not whole 16-query blocks and documents shorter and longer than the 112-key window. The kernels
    must have run (three launches per case), or this would compare the tensor ops with themselves."""
    if not trainer.HAS_TRITON:
        pytest.skip("triton is not installed")
    assert trainer.DC_KEYS >= trainer.DC_WINDOW + trainer.DC_QUERIES - 1, "a block's keys must cover its window"
    out = run_interpreted(_INTERPRETED_DC.format(module=trainer.__name__))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for T, errors in result["errors"].items():
        for name, error in zip(["out", "dq", "dk", "dv", "dw1", "dw2"], errors):
            assert error < 1e-5, f"T = {T}: {name} relative error {error:.2e} against the tensor ops"
    assert result["launches"] == ["_dc_forward_kernel", "_dc_backward_q_kernel", "_dc_backward_kv_kernel"] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dc_kernels_match_the_tensor_ops_in_bf16_on_a_gpu(trainer):
    """The compiled kernels at the model's shapes (a 48K-token row, 6 heads of 128, many documents): within
    bf16 rounding of the tensor ops, output and gradients."""
    T, H, D = 49152, 6, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(1, 50000, (T,), generator=g, device="cuda")
    tokens[torch.randint(0, T, (60,), generator=g, device="cuda")] = BOS
    tokens[0] = BOS
    cu = torch.from_numpy(trainer.document_bounds(tokens.cpu().numpy(), BOS)[0]).cuda()
    inputs = [torch.randn(T, H, D, generator=g, device="cuda").bfloat16() / 4 for _ in range(3)]
    inputs += [torch.randn(T, H, generator=g, device="cuda").bfloat16() for _ in range(2)]
    grad = torch.randn(T, H, D, generator=g, device="cuda").bfloat16()
    results = []
    for kernel in (True, False):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = trainer.local_head_mix(*leaves[:3], cu, *leaves[3:], kernel=kernel)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves, grad)))
    for name, a, b in zip(["out", "dq", "dk", "dv", "dw1", "dw2"], *results):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 2e-2, f"{name}: relative error {rel:.2e} against the tensor ops"


# -----------------------------------------------------------------------------
# The model: new gates against the static ones they replace

STATIC = ["--gate_split_layer=0", "--mudd=false", "--dc_layers="]
SCALAR_TABLES = ("resid_scalars", "post_scalars", "layer_scalars", "global_scalars")  # not randomized by _pair


def _slots(model):
    """(kind, layer) -> (generator, its output columns), counted from gate_layout's widths."""
    slots = {}
    for gen, layout in zip((model.pre_gate, model.post_gate), model.gate_layouts):
        start = 0
        for kind, i, w in layout:
            slots[(kind, i)] = (gen, slice(start, start + w))
            start += w
    return slots


def _set(model, kind, layer, value):
    """Set the per-token gate (kind, layer) to the constant value (a number, or one per head): W2 is zero."""
    gen, cols = _slots(model)[(kind, layer)]
    gen.b.data[cols] = torch.as_tensor(value, dtype=torch.float32) / gen.scale.data


def _columns(model) -> dict:
    """Per-layer scalar name -> its column [L] of the model's table (a view: writing it writes the parameter)."""
    return {n: table[:, j] for names, table in model.layer_scalar_tables() for j, n in enumerate(names)}


def _sync(new, static):
    """Set every gate and MUDD coefficient of `new` that has a static counterpart in `static` to that value;
    the output gates to the static ones' value at zero weights, sigmoid(0) = 0.5, and MUDD's value-embedding
    gate to the static one's 2 sigmoid(0) = 1."""
    row = _columns(static)
    glob = dict(zip(static.global_scalar_names, static.global_scalars))
    with torch.no_grad():
        for n, column in _columns(new).items():
            column.copy_(row[n])
        for j, n in enumerate(new.global_scalar_names):
            new.global_scalars[j] = glob[n]
        for kind, i in _slots(new):
            value = {"xsa": lambda: static.blocks[i].xsa_alpha, "attn_gate": lambda: 0.5,
                     "x0_gate": lambda: row["x0_gate"][i], "skip_gate": lambda: glob["skip_gate"],
                     "bigram_gate": lambda: row["bigram_gate"][i] if i else glob["bigram_gate"]}.get(kind)
            if value is not None:
                _set(new, kind, i, value())
        mudd_in = {n: j for j, n in enumerate(__import__(type(new).__module__).MUDD_IN)}
        for name in ("resid_attn", "post_attn", "bigram_gate", "resid_mlp", "post_mlp"):
            new.mudd_in.b[mudd_in[name]] = row[name][-1] / new.mudd_in.fixed_scale
        new.mudd_in.b[[mudd_in["ve_gate_a"], mudd_in["ve_gate_b"]]] = 1.0 / new.mudd_in.fixed_scale
        new.mudd_out.b[1] = -glob["backout"] / new.mudd_out.fixed_scale


def _pair(trainer, at_init=False):
    """(new, static): the tiny model with per-token gates, MUDD and DC, and the static-gate model, sharing every
    weight they both have, the shared matrices and tables randomized so every path carries signal; unless
    at_init, the static model's scalars are moved off their init too (the last layer's x0 gate stays 0: MUDD's
    weights the residual after the first bigram instead of x0)."""
    torch.manual_seed(0)
    new = trainer.GPT(trainer.parse_args(["--preset=tiny", *SMALL_VOCAB_FLAGS]))
    static = trainer.GPT(trainer.parse_args(["--preset=tiny", *SMALL_VOCAB_FLAGS, *STATIC]))
    new_params = dict(new.named_parameters())
    with torch.no_grad():
        for name, p in static.named_parameters():
            if name in SCALAR_TABLES or any(g in name for g in ("attn_gate", "xsa", "ve_gate")):
                continue
            # The output matrices 10x: a layer's attention output (values averaged over the window) would
            # otherwise be ~1% of the residual, too little for the loss to see the last layer's sublayer weight.
            p.normal_(std=0.5 if name.endswith(".o_w") else 0.05 if p.ndim > 1 else 0.5)
            new_params[name].copy_(p)
        if not at_init:
            for _, table in static.layer_scalar_tables():
                table.add_(0.2 * torch.randn_like(table))
            _columns(static)["x0_gate"][-1] = 0.0
            static.global_scalars.add_(0.3)
    _sync(new, static)
    return new, static


def _loss(model):
    module = __import__(type(model).__module__)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 250, (257,), generator=g)
    tokens[[0, 60, 61, 200]] = 255  # SMALL_VOCAB's BOS
    cu, docs, max_len = module.document_bounds(tokens[:-1].numpy(), 255)
    meta = module.attention_meta(docs, max_len, (1, 2))
    with torch.no_grad():
        return model(tokens[:-1], tokens[1:], torch.from_numpy(cu), meta, 0.1, torch.tensor([1.0, 0.5]))


def test_at_init_the_new_model_is_the_static_model_but_for_two_gate_values(trainer):
    """Every per-token gate and MUDD coefficient starts at the value of the quantity it replaces (x0, bigram and
    skip gates 0, 0.05, 0.5, XSA off, residual weights, backout 0.5) and DC's w2 at 0, so the model equals the
    static one once its output gates and MUDD's value-embedding gate are set to the static ones' 0.5 and 1
    (they start at the speedrun's 0.25 and 2). Negative control: the 0.25 output gate changes the loss."""
    new, static = _pair(trainer, at_init=True)
    fresh = trainer.GPT(new.hp)
    def attn_gates(gen):
        return [j for (kind, _), (g, cols) in _slots(new).items() if kind == "attn_gate" and g is gen
                for j in range(cols.start, cols.stop)]

    ve_gates = [list(trainer.MUDD_IN).index(n) for n in ("ve_gate_a", "ve_gate_b")]
    for name, expected in (("pre_gate", attn_gates(new.pre_gate)), ("post_gate", attn_gates(new.post_gate)),
                           ("mudd_in", ve_gates), ("mudd_out", [])):
        moved = ~torch.isclose(getattr(new, name).b, getattr(fresh, name).b)
        assert moved.nonzero().flatten().tolist() == expected, f"{name}: more moved than the two gates"
    for name in SCALAR_TABLES:
        assert torch.equal(getattr(new, name), getattr(fresh, name)), f"{name} moved off its init"
    want = _loss(static)
    torch.testing.assert_close(_loss(new), want, rtol=1e-6, atol=1e-5)
    _set(new, "attn_gate", 3, 0.25)
    assert not torch.isclose(_loss(new), want, rtol=1e-6, atol=1e-5), "negative control: the output gate"


def test_each_gate_output_reaches_the_quantity_it_replaces(trainer):
    """Moving one static quantity off its value and the per-token gate (or MUDD coefficient) that replaces it by
    as much gives equal losses, and a changed one: each output is wired to its own quantity (XSA per head). Each
    case starts from the same pair (moves made one after another can cancel: the loss is not monotone in them)."""
    new, static = _pair(trainer)
    base = _loss(new)
    torch.testing.assert_close(base, _loss(static), rtol=1e-6, atol=1e-5)
    glob = static.global_scalar_names.index
    cases = {"xsa 1": lambda m: m.blocks[1].xsa_alpha.copy_(torch.tensor([0.7, -1.3])),
             "x0 gate 1": lambda m: _columns(m)["x0_gate"][1].add_(0.4),
             "bigram gate 1": lambda m: _columns(m)["bigram_gate"][1].add_(0.4),
             "bigram gate 0": lambda m: m.global_scalars[glob("bigram_gate")].add_(0.4),
             "skip gate": lambda m: m.global_scalars[glob("skip_gate")].add_(0.7),
             "backout": lambda m: m.global_scalars[glob("backout")].add_(0.3)}
    cases |= {f"last layer {n}": lambda m, n=n: _columns(m)[n][-1].add_(0.3)
              for n in ("resid_attn", "post_attn", "bigram_gate", "resid_mlp", "post_mlp")}
    for case, move in cases.items():
        new, static = _pair(trainer)
        with torch.no_grad():
            move(static)
        _sync(new, static)
        got = _loss(new)
        torch.testing.assert_close(got, _loss(static), rtol=1e-6, atol=1e-5, msg=lambda m: f"{case}\n{m}")
        assert not torch.isclose(got, base, rtol=1e-6, atol=1e-5), f"{case} does not change the loss"


def test_generators_are_on_adam_with_the_public_lrs_and_no_decay_on_bias_or_scale(trainer):
    hp = trainer.parse_args(["--preset=tiny", *SMALL_VOCAB_FLAGS])
    t = trainer.Trainer(hp, 0, 1, torch.device("cpu"))
    entry = {id(e["param"]): e for e in t.adam.entries}
    wd = hp.adam_weight_decay * hp.adam_wd_mul_gate
    for gen, lr in ((t.model.pre_gate, 0.1 * 0.008), (t.model.post_gate, 0.1 * 0.008),
                    (t.model.mudd_in, 0.25 * 0.008), (t.model.mudd_out, 0.25 * 0.008)):
        for p, decay in ((gen.w1, wd), (gen.w2, wd), (gen.b, 0.0), (gen.scale, 0.0)):
            if p is None:
                continue
            e = entry[id(p)]
            assert (e["lr"], e["betas"], e["wd"]) == (pytest.approx(lr), (0.9, 0.99), decay)


@pytest.mark.parametrize("flags, message", [
    (["--gate_split_layer=0"], "--dc_layers takes its per-token weights from the dynamic gates"),
    (["--cache_layer=-1"], "--mudd mixes"),
    (["--dc_layers=0"], "--paired_head_layers and --dc_layers share"),
    (["--gate_split_layer=11"], "--gate_split_layer=11 must be a layer after the first"),
])
def test_inconsistent_gate_flags_are_config_errors(trainer, flags, message):
    """Each flag changed from the public record's settings alone."""
    with pytest.raises(trainer.ConfigError, match=message):
        trainer.parse_args([*PUBLIC, *flags])
