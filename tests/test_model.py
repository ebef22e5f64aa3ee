"""The model: attention within documents and windows (paired heads too), causality, document isolation, init."""
import math

import importlib
import json
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BOS, KernelLaunches, run_interpreted, shared_code_only


# Code train_gpt_medium.py shares line for line (tests/test_tracks.py): tested through train_gpt.py.
pytestmark = shared_code_only


def _tokens_with_documents(n, bos_positions, bos_id, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (n,), generator=g)
    tokens[list(bos_positions)] = bos_id
    return tokens


# Layouts: documents shorter than a block, exactly block-aligned, spanning several blocks, one long document.
LAYOUTS = [
    [0, 20, 105, 118, 128, 225, 365, 484, 630, 652, 683, 706, 783],
    [0, 128, 256, 512, 640],
    [0, 300, 301, 302, 900],
    [0],
    [5, 700],  # tokens before the first BOS form their own "document 0"
]


def _doc_ids(tokens):
    """Document index per position, written independently of the trainer: a BOS opens a new document."""
    return (tokens == BOS).cumsum(0)


def _bounds(trainer, tokens):
    cu, docs, max_len = trainer.document_bounds(tokens.numpy(), BOS)
    return torch.from_numpy(cu), docs, max_len


def _naive_attention(q, k, v, visible):
    """out[t, h] = sum over keys (s, h') with visible(t, h, s, h') of softmax(q[t, h] . k[s, h']) v[s, h'],
    one query at a time (q, k, v [T, H, D])."""
    T, H, _ = q.shape
    out = torch.zeros_like(q)
    for t in range(T):
        for h in range(H):
            keys = [(s, g) for s in range(t + 1) for g in range(H) if visible(t, h, s, g)]
            scores = torch.stack([q[t, h] @ k[s, g] for s, g in keys])
            out[t, h] = (scores.softmax(0)[:, None] * torch.stack([v[s, g] for s, g in keys])).sum(0)
    return out


def test_document_bounds_lists_each_document_start_then_pads_with_the_row_length(trainer):
    tokens = _tokens_with_documents(1024, [5, 700, 701], BOS).numpy()
    cu, docs, max_len = trainer.document_bounds(tokens, BOS)
    assert cu.shape == (1025,) and cu.dtype == np.int32, "one int32 shape for every row of 1024 tokens"
    assert list(cu[:5]) == [0, 5, 700, 701, 1024], "tokens before the first BOS form document 0"
    assert (cu[4:] == 1024).all(), "padding entries are empty documents at the row's end"
    assert (docs, max_len) == (4, 695)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window", [0, 1, 127, 384, 2000])
def test_window_attention_sees_exactly_the_window_of_its_own_document(trainer, layout, window):
    """window_attention (the CPU path of the op the GPU runs with FlashAttention) against a per-query loop:
    query t sees keys t - window .. t of its own document."""
    T = 256
    tokens = _tokens_with_documents(T, [p // 4 for p in layout], BOS)
    cu, docs, max_len = _bounds(trainer, tokens)
    q, k, v = torch.randn(3, T, 2, 16, generator=torch.Generator().manual_seed(1)).unbind(0)
    out, _ = trainer.window_attention(q, k, v, cu, torch.tensor([docs, max_len, window]))
    doc = _doc_ids(tokens)
    ref = _naive_attention(q, k, v, lambda t, h, s, g: g == h and t - s <= window and doc[s] == doc[t])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_window_attention_gradient_is_the_softmax_attention_gradient(trainer):
    """The op's own backward (FlashAttention's on GPU, the formula on CPU) against autograd through masked
    SDPA, with the mask written independently; a wrong window in the mask is seen (negative control)."""
    T, window = 200, 37
    tokens = _tokens_with_documents(T, [0, 50, 51, 120], BOS)
    cu, docs, max_len = _bounds(trainer, tokens)
    q, k, v = (torch.randn(T, 3, 8, generator=torch.Generator().manual_seed(i)).requires_grad_() for i in range(3))
    grad = torch.randn(T, 3, 8, generator=torch.Generator().manual_seed(9))
    out, _ = trainer.window_attention(q, k, v, cu, torch.tensor([docs, max_len, window]))
    got = torch.autograd.grad(out, (q, k, v), grad)
    doc, pos = _doc_ids(tokens), torch.arange(T)

    def reference(w):
        mask = (pos[None] <= pos[:, None]) & (pos[:, None] - pos[None] <= w) & (doc[:, None] == doc[None])
        y = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)), attn_mask=mask, scale=1.0)
        return torch.autograd.grad(y.transpose(0, 1), (q, k, v), grad)

    for name, a, b in zip("qkv", got, reference(window)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name} differs\n{m}")
    assert not torch.allclose(got[0], reference(window - 1)[0], atol=1e-4), "negative control: window - 1"


def test_paired_heads_score_both_heads_of_each_visible_token_in_one_softmax(trainer):
    """Heads j and j + H/2 as one sequence (pair_heads): position 2t + e holds token t's head e H/2 + j; a
    query sees the pair's positions up to its own, within the window (in positions) and its document."""
    T, H, window = 96, 4, 41
    tokens = _tokens_with_documents(T, [0, 30, 31, 70], BOS)
    cu, docs, max_len = _bounds(trainer, tokens)
    q, k, v = torch.randn(3, T, H, 8, generator=torch.Generator().manual_seed(2)).unbind(0)
    pair = trainer.pair_heads
    out, _ = trainer.window_attention(pair(q), pair(k), pair(v), 2 * cu, torch.tensor([docs, 2 * max_len, window]))
    doc, P = _doc_ids(tokens), H // 2

    def visible(t, h, s, g):
        p, p_key = 2 * t + h // P, 2 * s + g // P
        return g % P == h % P and p_key <= p and p - p_key <= window and doc[s] == doc[t]

    torch.testing.assert_close(out.view(T, H, 8), _naive_attention(q, k, v, visible), atol=1e-5, rtol=1e-5)
    unpaired, _ = trainer.window_attention(q, k, v, cu, torch.tensor([docs, max_len, window]))
    assert not torch.allclose(out.view(T, H, 8), unpaired, atol=1e-3), "negative control: pairing changes attention"


def _tiny_model(trainer, *flags):
    hp = trainer.parse_args(["--preset=tiny", *flags])
    torch.manual_seed(0)
    return hp, trainer.GPT(hp)


def _call(model, inputs, targets, windows=(1, 2), scale=0.1, weights=(1.0, 0.0)):
    trainer = importlib.import_module(type(getattr(model, "_orig_mod", model)).__module__)
    cu, docs, max_len = _bounds(trainer, inputs)
    return model(inputs, targets, cu, trainer.attention_meta(docs, max_len, windows), scale, torch.tensor(weights))


# Scalar tables _randomize leaves at their initial values (drawn like the rest, residual weights would be near 0).
SCALAR_TABLES = ("resid_scalars", "post_scalars", "layer_scalars", "global_scalars")


def _randomize(model, std=0.05):
    """Non-trivial weights everywhere, so every path of the forward carries signal (zero-initialized
    tables, gates and projections would hide a wrong connection)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in SCALAR_TABLES:
                p.normal_(std=std if p.ndim > 1 else 0.5)
        model.global_scalars.add_(0.3)  # the smear weight starts at 0: turn it on


def test_initial_loss_is_near_uniform_over_the_padded_vocabulary(trainer):
    """The head starts at std 0.005 (tied to the embedding), so the first loss is close to ln(vocab_size)."""
    hp, model = _tiny_model(trainer)
    tokens = _tokens_with_documents(257, [0, 100], BOS)
    loss = _call(model, tokens[:-1], tokens[1:]) / 256
    assert abs(loss.item() - math.log(hp.vocab_size)) < 0.01


def _per_position_loss(model, inputs, targets, position):
    masked = torch.full_like(targets, -100)
    masked[position] = targets[position]
    return _call(model, inputs, masked).item()


def _joined_call(trainer, model, rows, weights, joined):
    """The model on `rows` (each [L + 1] tokens, on the host) as one micro-batch on the model's device: inputs
    and targets the rows' own, joined."""
    device = model.lm_head_w.device
    inputs, targets = torch.cat([r[:-1] for r in rows]), torch.cat([r[1:] for r in rows])
    cu, docs, max_len = trainer.document_bounds(inputs.numpy(), BOS, joined)
    meta = trainer.attention_meta(docs, max_len, (1, 2))
    row_pos = trainer.row_positions(len(inputs), joined, device) if joined > 1 else None
    return model(inputs.to(device), targets.to(device), torch.from_numpy(cu).to(device), meta, 0.1,
                 torch.tensor(weights, device=device), row_pos)


def _loss_and_grads(model, fn):
    """fn()'s loss (detached) and every parameter's gradient (float32 copies) after its backward."""
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_joined_rows_give_the_sum_of_each_rows_own_loss_and_gradients(trainer):
    """A micro-batch of rows joined (GPT.forward's row_pos, the loader's --micro_batch_tokens) computes each row as
    if alone: rotary positions, smear, the bigram hash and the key offset start again at each row (the tiny
    model has paired heads and a key offset), multi-token targets stop at its end, and a row that does not
    begin with BOS still begins a document. So loss and gradients are the sum of the rows' own. Negative
    control: the same tokens as one row differ."""
    hp, model = _tiny_model(trainer)
    _randomize(model)
    with torch.no_grad():  # byte-prefix targets for half the vocabulary (GPT's own table is empty: all -1)
        model.prefix_table.copy_(torch.where(torch.arange(hp.vocab_size) % 2 == 0,
                                             torch.randperm(hp.vocab_size, generator=torch.Generator().manual_seed(4)), -1))
    rows = [_tokens_with_documents(129, [0, 50], BOS, seed=1), _tokens_with_documents(129, [30, 90], BOS, seed=2),
            _tokens_with_documents(129, [0], BOS, seed=3)]
    weights = (1.0, 0.5, 0.25)  # the next token, the one after (multi-token prediction), the prefix target
    alone_loss, alone_grads = _loss_and_grads(model, lambda: sum(_call(model, r[:-1], r[1:], weights=weights)
                                                                 for r in rows))
    joined_loss, joined_grads = _loss_and_grads(model, lambda: _joined_call(trainer, model, rows, weights, len(rows)))
    torch.testing.assert_close(joined_loss, alone_loss, rtol=1e-5, atol=1e-4)
    assert joined_grads.keys() == alone_grads.keys()
    for name, grad in alone_grads.items():
        torch.testing.assert_close(joined_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    as_one_row = _joined_call(trainer, model, rows, weights, 1).detach()
    assert (as_one_row - alone_loss).abs() > 1e-3, "negative control: one long row crosses the rows' boundaries"
    with pytest.raises(ValueError, match="386 tokens do not split into 3 equal rows"):
        trainer.document_bounds(torch.cat(rows)[:-1].numpy(), BOS, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_joined_rows_give_the_rows_own_loss_on_a_gpu(trainer):
    """The joined-rows property on the GPU's paths (bf16, FP8 head with the loss kernel's gradient, fused MLP
    with the FP8 up-projection, FlashAttention varlen, the DC kernel): the loss of three joined rows is the sum
    of the rows' own up to float rounding, the gradients within bf16's; one long row (rows=1) is not."""
    hp = trainer.parse_args(["--preset=tiny"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = trainer.GPT(hp)
    _randomize(model)
    # 3 x 320 tokens: as one row (the negative control) they still fit the rotary tables (tiny: val_seq_len 1024).
    rows = [_tokens_with_documents(321, [0, 50], BOS, seed=1), _tokens_with_documents(321, [30, 190], BOS, seed=2),
            _tokens_with_documents(321, [0], BOS, seed=3)]
    weights = (1.0, 0.5, 0.25)
    alone, alone_grads = _loss_and_grads(model, lambda: sum(_joined_call(trainer, model, [r], weights, 1) for r in rows))
    joined, joined_grads = _loss_and_grads(model, lambda: _joined_call(trainer, model, rows, weights, 3))
    one_row, one_row_grads = _loss_and_grads(model, lambda: _joined_call(trainer, model, rows, weights, 1))
    alone, joined, one_row = alone.item(), joined.item(), one_row.item()

    def worst(grads):
        return max(((grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in alone_grads.items())
    assert abs(joined - alone) < 2e-4 * alone and worst(joined_grads) < 0.02, (
        f"joined {joined} vs alone {alone}; gradients {worst(joined_grads):.4f}")
    # The loss of one long row moves by under 0.1% (float32 on CPU: 6.8e-4), near bf16's rounding; its gradients
    # (the value path, which the rows' boundaries cut) move by about 40%.
    assert worst(one_row_grads) > 0.1, f"negative control: one long row {one_row} vs alone {alone}, gradients " \
                                       f"{worst(one_row_grads):.4f}"


def test_model_is_causal_and_documents_see_only_the_last_token_before_their_bos(trainer):
    """The future never matters. Without the key offset, a document sees nothing of the one before it but its
    last token, which smear and the bigram hash read at the BOS position. (The key offset hands the BOS key
    the previous position's unrotated key dims, which carry the previous document: the speedrun's design,
    which ignores document starts there; the attention masks themselves are exact.)"""
    hp, model = _tiny_model(trainer, "--key_offset_layers=")
    _randomize(model)
    tokens = _tokens_with_documents(257, [0, 150], BOS)
    inputs, targets = tokens[:-1].clone(), tokens[1:].clone()
    before = _per_position_loss(model, inputs, targets, 100)
    changed = inputs.clone()
    changed[101:] = (changed[101:] + 7) % 1000  # the future
    assert _per_position_loss(model, changed, targets, 100) == pytest.approx(before, abs=1e-6), \
        "the loss at position 100 depends on later tokens"
    in_doc2 = _per_position_loss(model, inputs, targets, 200)
    changed = inputs.clone()
    changed[1:149] = (changed[1:149] + 7) % 1000  # the previous document but its last token
    assert _per_position_loss(model, changed, targets, 200) == pytest.approx(in_doc2, abs=1e-6), \
        "a token sees the document before its BOS"
    changed = inputs.clone()
    changed[149] = (changed[149] + 7) % 1000  # the previous document's last token: the designed leak
    assert _per_position_loss(model, changed, targets, 200) != pytest.approx(in_doc2, abs=1e-6), \
        "the last token before the BOS reaches the document through smear, bigram and key offset"
    changed = inputs.clone()
    changed[160:200] = (changed[160:200] + 7) % 1000  # its own document: must matter
    assert _per_position_loss(model, changed, targets, 200) != pytest.approx(in_doc2, abs=1e-6), \
        "negative control: the loss should depend on the token's own document"


def test_mlp_output_projections_start_at_zero_and_attention_weights_do_not(trainer):
    _, model = _tiny_model(trainer)
    for block in model.blocks:
        assert block.mlp_proj.abs().max() == 0, "each MLP starts as a no-op"
        if block.qk_w is not None:
            assert (block.qk_w.flatten(1).abs().amax(1) > 0).all(), "q and k start nonzero (the speedrun's init)"
            for w in (block.v_w, block.o_w):
                assert (w.abs().amax(1) > 0).all(), "v and o start nonzero (the speedrun's init)"


def test_layers_marked_dash_have_no_attention_and_still_learn_their_mlp(trainer):
    hp, model = _tiny_model(trainer)
    no_attention = [i for i, kind in enumerate(hp.layer_attention) if kind == "-"]
    assert no_attention and all(model.blocks[i].qk_w is None for i in no_attention)
    attention_layers = len(hp.layer_attention) - len(no_attention)
    assert len(model.hidden_matrices()) == 3 * attention_layers + 2 * hp.num_layers, "qk stack, v, o and 2 MLP matrices"
    inputs = _tokens_with_documents(256, [0], BOS)
    _call(model, inputs, torch.roll(inputs, -1)).backward()
    assert model.blocks[no_attention[0]].mlp_proj.grad.abs().sum() > 0, "the attention-free layer's MLP learns"


def test_the_model_builds_on_another_default_device(trainer):
    """The trainer builds the model under `with device:` (CUDA on a GPU): every tensor made in __init__ must
    follow the default device or say its own; a CPU-only piece (a CPU generator) fails here as it would on a GPU."""
    hp = trainer.parse_args([])
    with torch.device("meta"):
        model = trainer.GPT(hp)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())


def _kinds_flags(n):
    """Layer sets for an n-layer tiny model whose extra depth adds only copies of one plain layer kind."""
    return [f"--num_layers={n}", f"--layer_attention={'S' * (n - 2)}-L", f"--value_embed_layers=1,{n - 1}",
            "--xsa_layers=1", f"--attn_gate_layers={n - 1}", f"--key_offset_layers={n - 1}",
            f"--skip_connection=1>{n - 2}", f"--cache_layer={n - 3}", f"--dc_layers={n - 1}"]


def _per_block_graphs(trainer, num_layers):
    """Graphs compile_per_block makes for a training and a no-grad step, after checking their losses."""
    from torch._dynamo.utils import counters
    hp, eager = _tiny_model(trainer, *_kinds_flags(num_layers))
    compiled = trainer.GPT(hp)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_per_block(backend="eager")
    train, val = _tokens_with_documents(257, [0, 90, 200], BOS), _tokens_with_documents(1025, [0, 500], BOS)
    windows = (1, 2)  # reach the graph in CPU tensors (attention_meta): a window change does not recompile
    for step in range(2):
        loss = _call(compiled, train[:-1], train[1:], windows, torch.tensor(0.1))
        loss.backward()
        torch.testing.assert_close(loss, _call(eager, train[:-1], train[1:], windows, torch.tensor(0.1)))
        with torch.no_grad():
            torch.testing.assert_close(_call(compiled, val[:-1], val[1:], windows, torch.tensor(0.1)),
                                       _call(eager, val[:-1], val[1:], windows, torch.tensor(0.1)))
        windows = (2, 3)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return graphs


def test_compiled_blocks_share_graphs_so_compile_work_does_not_grow_with_depth(trainer):
    """compile_per_block: layers of one kind share a graph. Depths 6 and 10 differ only in copies of a plain
    short-window layer, so both compile the same graphs (training and no-grad), with the eager model's losses."""
    shallow, deep = _per_block_graphs(trainer, 6), _per_block_graphs(trainer, 10)
    assert shallow == deep, f"{shallow} graphs at 6 layers, {deep} at 10: identical layers should share graphs"


def test_whole_model_compile_traces_through_compiled_blocks_into_the_same_graph(trainer):
    """The Trainer compiles blocks one by one for validation and the whole model for training: the training
    compile must inline the compiled blocks into one graph, the same as the model without them (no graph
    break per block, which would make training per-block and slower)."""
    from torch._dynamo.utils import counters
    train = _tokens_with_documents(257, [0, 90, 200], BOS)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    for per_block_inside in (False, True):
        torch._dynamo.reset()
        counters.clear()
        _, model = _tiny_model(trainer)
        if per_block_inside:
            model.compile_per_block(backend="eager")
        compiled = torch.compile(model, backend=keep_graph, dynamic=False)
        _call(compiled, train[:-1], train[1:], (1, 2), torch.tensor(0.1)).backward()
        breaks = dict(counters["graph_break"])
        assert not breaks, f"graph breaks with per_block_inside={per_block_inside}: {breaks}"
    torch._dynamo.reset()
    assert len(graphs) == 2, f"{len(graphs)} graphs for two whole-model compiles; expected one each"
    assert graphs[0] == graphs[1], "compiled blocks inside changed the whole-model training graph"


def test_a_compiled_block_takes_new_documents_and_windows_without_recompiling(trainer):
    """Every micro-batch brings new document bounds and every stage new windows; they reach the attention op
    as tensors (cu on the device, the ints in a CPU tensor), so one compiled graph serves them all."""
    from torch._dynamo.utils import counters
    hp, model = _tiny_model(trainer)
    _randomize(model)
    block = model.blocks[1]  # value embedding and XSA
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, backend="eager", dynamic=False)
    x = torch.randn(512, hp.model_dim)
    s = {name: w.detach() for name, w in model.layer_weights(1).items()}
    s |= {"xsa": torch.randn(512, hp.num_heads), "x0_gate": torch.rand(512, 1), "bigram_gate": torch.rand(512, 1)}
    for windows, bos in [((1, 2), [0, 100]), ((2, 3), [0, 300, 301]), ((4, 4), [0])]:
        cu, docs, max_len = _bounds(trainer, _tokens_with_documents(512, bos, BOS))
        meta = trainer.attention_meta(docs, max_len, windows)
        torch.testing.assert_close(compiled(x, x, x, x, None, s, cu, meta, torch.tensor(0.1)),
                                   block(x, x, x, x, None, s, cu, meta, 0.1))
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs == 1, f"{graphs} graphs for one block kind: documents or windows were guarded on, not taken as input"


def test_every_parameter_belongs_to_exactly_one_optimizer(trainer):
    hp = trainer.parse_args(["--preset=tiny"])
    t = trainer.Trainer(hp, 0, 1, torch.device("cpu"))
    adam_ids = {id(e["param"]) for e in t.adam.entries}
    muon_ids = {id(p) for g in t.muon.groups for p in g["params"]}
    assert not adam_ids & muon_ids
    assert adam_ids | muon_ids == {id(p) for p in t.model.parameters()}


def test_fp8_head_matmul_matches_float32_within_float8_rounding(trainer):
    """The FP8 head: forward and both gradients within float8's rounding of the fp32 product
    (e4m3 keeps 3 mantissa bits, about 6% per element; a 32-term dot averages it down)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    w = (0.3 * torch.randn(48, 32, generator=g)).requires_grad_()  # within the head's |w| <= 1.6
    scales = (32 ** 0.5 / trainer.FP8_E4M3_MAX, trainer.FP8_HEAD_W_MAX / trainer.FP8_E4M3_MAX,
              torch.tensor(trainer.FP8_HEAD_GRAD_SCALE))
    y = trainer.FP8Linear.apply(x, w, *scales)
    grad_y = 0.01 * torch.randn(y.shape, generator=g)
    y.backward(grad_y.bfloat16())
    x32, w32 = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    (x32 @ w32.T).backward(grad_y)
    for name, got, want in [("y", y, x32 @ w32.T), ("grad_x", x.grad, x32.grad), ("grad_w", w.grad, w32.grad)]:
        rel = ((got.float() - want).norm() / want.norm()).item()
        assert rel < 0.1, f"{name}: relative error {rel:.3f} is beyond float8 rounding"
    assert y.dtype == x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32, "dtypes follow the operands"


def test_fp8_forward_linear_rounds_the_forward_only(trainer):
    """FP8ForwardLinear (--fp8_qkv): the forward is the product of x / x_scale and w / (amax|w| / 448), each cast to
    e4m3, times both scales, within bf16's rounding of it, and differs from the bf16 product by e4m3's rounding only
    (negative control: it does differ); the backward is exactly the plain product's, from the unrounded x and w."""
    g = torch.Generator().manual_seed(0)
    x = trainer.rms_norm(torch.randn(64, 32, generator=g)).bfloat16().requires_grad_()
    w = (0.05 * torch.randn(48, 32, generator=g)).bfloat16().requires_grad_()
    x_scale = trainer.normed_e4m3_scale(32)
    y = trainer.FP8ForwardLinear.apply(x, w, x_scale)
    w_s = w.detach().float().abs().max() / trainer.FP8_E4M3_MAX
    x8, w8 = trainer._e4m3(x.detach().float(), x_scale), trainer._e4m3(w.detach().float(), w_s)
    want = (x8.float() @ w8.float().T) * x_scale * w_s
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-3)
    plain = x.detach().float() @ w.detach().float().T
    rel = ((y.float() - plain).norm() / plain.norm()).item()
    assert 1e-4 < rel < 0.1, f"the forward against bf16's: relative difference {rel:.4f}"
    grad_y = torch.randn(y.shape, generator=g).bfloat16()
    y.backward(grad_y)
    assert torch.equal(x.grad, grad_y @ w.detach()) and torch.equal(w.grad, grad_y.T @ x.detach()), "plain backward"


def test_fp8_qkv_flag_sends_the_attention_input_through_the_fp8_forward(trainer, monkeypatch):
    """With --fp8_qkv every attention layer's q, k, v projection is FP8ForwardLinear at the fixed scale
    sqrt(dim) / 448 of its RMS-normed input, with the layer's [3 hdim, dim] weight, while training; without the
    flag, or under no_grad, it is the plain product (the GPU check is forced here; the stub computes the plain
    product, so the model runs on)."""
    calls = []
    monkeypatch.setattr(trainer.FP8ForwardLinear, "apply",
                        lambda x, w, x_scale: calls.append((x_scale, tuple(w.shape))) or F.linear(x, w))
    monkeypatch.setattr(trainer, "fp8_applies", lambda enabled, x: enabled and torch.is_grad_enabled())
    inputs = torch.randint(1, 200, (64,))
    inputs[::16] = BOS
    counts = []
    for flags, grad in ((["--fp8_qkv=true"], True), (["--fp8_qkv=true"], False), (["--fp8_qkv=false"], True)):
        hp, model = _tiny_model(trainer, "--fp8_head=false", *flags)
        before = len(calls)
        with torch.set_grad_enabled(grad):
            _call(model, inputs, torch.roll(inputs, -1))
        counts.append(len(calls) - before)
    attention_layers = sum(b.qk_w is not None for b in model.blocks)
    assert counts == [attention_layers, 0, 0], f"FP8ForwardLinear calls with the flag, under no_grad, without: {counts}"
    hdim = hp.num_heads * hp.head_dim
    assert calls == [(pytest.approx(hp.model_dim ** 0.5 / 448), (3 * hdim, hp.model_dim))] * attention_layers, calls


def _fp8_head_grads(trainer, grad_s, grad_y):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    w = (0.3 * torch.randn(48, 32, generator=g)).requires_grad_()
    y = trainer.FP8Linear.apply(x, w, 32 ** 0.5 / trainer.FP8_E4M3_MAX, trainer.FP8_HEAD_W_MAX / trainer.FP8_E4M3_MAX,
                                torch.tensor(grad_s))
    y.backward(grad_y.bfloat16())
    return x.grad.float(), w.grad


def test_fp8_head_gradient_cast_follows_the_micro_batch_count(trainer):
    """The trainer divides the loss by the step's micro-batch count m and the head's e5m2 gradient scale by the
    same m: the gradients are then exactly 1/m of one micro-batch's (m a power of 2), whatever m is. A scale that
    ignored m would push small logit gradients (here 1e-6 / 32) to e5m2's subnormals and zero, losing most of
    the head's gradient: negative control."""
    grad_y = 1e-6 * torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    one = _fp8_head_grads(trainer, trainer.FP8_HEAD_GRAD_SCALE, grad_y)
    m = 32
    many = _fp8_head_grads(trainer, trainer.FP8_HEAD_GRAD_SCALE / m, grad_y / m)
    for name, a, b in zip(("grad_x", "grad_w"), one, many):
        assert torch.equal(a / m, b), f"{name}: with m micro-batches the gradient must be exactly 1/m of one's"
    fixed = _fp8_head_grads(trainer, trainer.FP8_HEAD_GRAD_SCALE, grad_y / m)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).bfloat16().float()
    exact = (grad_y.bfloat16().float() / m).T @ x  # the head's gradient in fp32
    err = {name: ((w_grad - exact).norm() / exact.norm()).item() for name, w_grad in (("followed", many[1]),
                                                                                     ("fixed", fixed[1]))}
    assert err["followed"] < 0.1 and err["fixed"] > 3 * err["followed"], f"relative error of the head's gradient: {err}"


def _fp8_head_loss_case(trainer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    w = (0.3 * torch.randn(48, 32, generator=g)).requires_grad_()
    targets = trainer.target_matrix(torch.randint(0, 48, (64,), generator=g), 2)
    scales = (32 ** 0.5 / trainer.FP8_E4M3_MAX, trainer.FP8_HEAD_W_MAX / trainer.FP8_E4M3_MAX)
    return x, w, targets, torch.tensor([1.0, 0.5]), scales


def test_fp8_head_loss_with_the_gradient_from_the_loss_kernel_matches_the_two_step_path(trainer):
    """FP8HeadLoss (the logit gradient made, scaled and cast to e5m2 by the loss kernel's forward) against
    FP8Linear then softcap_mtp_ce (bf16 gradient from the loss backward, cast after): the same loss, and
    gradients within e5m2's rounding of each other; the loss scaled by 1/m gives gradients of exactly 1/m
    (the scale rides in the matmuls, whatever m is)."""
    x, w, y, weights, scales = _fp8_head_loss_case(trainer)
    softcap = (23.0, 5.0, 7.5)
    fused = trainer.FP8HeadLoss.apply(x, w, y, weights, *scales, *softcap)
    fused.backward()
    fused_grads = x.grad.float().clone(), w.grad.clone()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits = trainer.FP8Linear.apply(x2, w2, *scales, torch.tensor(trainer.FP8_HEAD_GRAD_SCALE))
    rows, _ = trainer.softcap_mtp_ce_reference(logits, y, weights, *softcap)
    rows.sum().backward()
    assert fused.item() == pytest.approx(rows.sum().item(), rel=1e-6), "the same logits, the same loss"
    for name, got, want in [("grad_x", fused_grads[0], x2.grad.float()), ("grad_w", fused_grads[1], w2.grad)]:
        rel = ((got - want).norm() / want.norm()).item()
        assert 0 < rel < 0.05, f"{name}: relative difference {rel:.4f} (expected: e5m2 rounding, not zero)"
    x.grad = w.grad = None
    m = 8
    (trainer.FP8HeadLoss.apply(x, w, y, weights, *scales, *softcap) / m).backward()
    assert torch.equal(x.grad.float(), fused_grads[0] / m) and torch.equal(w.grad, fused_grads[1] / m)


def test_fp8_head_fused_gradient_flag_selects_the_path(trainer, monkeypatch):
    """--fp8_head_fused_grad (the default) makes head_loss call FP8HeadLoss, =false FP8Linear (FP8 needs CUDA: the
    check is forced here, and each path is stopped at its entry)."""
    class Taken(Exception):
        pass

    def stop(name):
        def stub(*args):
            raise Taken(name)
        return stub

    monkeypatch.setattr(trainer, "fp8_applies", lambda enabled, x: True)
    monkeypatch.setattr(trainer.FP8HeadLoss, "apply", stop("FP8HeadLoss"))
    monkeypatch.setattr(trainer.FP8Linear, "apply", stop("FP8Linear"))
    taken = []
    for flags in ([], ["--fp8_head_fused_grad=false"]):
        hp = trainer.parse_args(["--preset=tiny", *flags])
        with pytest.raises(Taken) as path:
            trainer.GPT(hp).head_loss(torch.randn(4, hp.model_dim), torch.zeros(4, dtype=torch.long), torch.ones(1))
        taken.append(str(path.value))
    assert taken == ["FP8HeadLoss", "FP8Linear"], taken


def _plain_mlp(x, w1, w2):
    return torch.relu(x @ w1.T).square() @ w2


def _mlp_case(T=70, D=40, H=50, seed=0):
    """Shapes that are not multiples of the kernel's tiles (32 under the interpreter)."""
    g = torch.Generator().manual_seed(seed)
    x, w1, w2 = torch.randn(T, D, generator=g), torch.randn(H, D, generator=g) / D ** 0.5, torch.randn(H, D, generator=g)
    return x, w1, w2, torch.randn(T, D, generator=g)


def _mlp_grads(fn, x, w1, w2, grad):
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def test_relu_squared_mlp_function_equals_autograd_of_the_plain_mlp(trainer):
    """ReluSquaredMLP's forward and its backward (relu(pre) recovered as sqrt(post)) against autograd of
    relu(x w1^T)^2 w2, in float32 through the torch path of its matmul op; about half the pre-activations are
    negative (their gradient must be 0)."""
    x, w1, w2, grad = _mlp_case()
    got = _mlp_grads(trainer.ReluSquaredMLP.apply, x, w1, w2, grad)
    want = _mlp_grads(_plain_mlp, x, w1, w2, grad)
    assert 0.3 < ((x @ w1.T) < 0).float().mean() < 0.7
    for name, a, b in zip(("out", "grad_x", "grad_w1", "grad_w2"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    torch.library.opcheck(trainer.mlp_matmul, (x, w1, None, 0), test_utils=("test_faketensor",))


def _fp8_mlp_reference(x, w1, w2, x_scale):
    """The FP8 up-projection's math in float32: x in e4m3 units of x_scale, w1 in units of amax / 448, their
    product times both scales, post rounded to bf16 (the op's output dtype with float8 operands)."""
    def e4m3(t, scale):
        return t.div(scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    w_s = w1.abs().amax() / 448
    post = torch.relu((e4m3(x, x_scale) @ e4m3(w1, w_s).T) * (w_s * x_scale)).square().bfloat16().float()
    return post, post @ w2


def test_fp8_up_projection_rounds_only_the_forward_product_to_e4m3(trainer):
    """ReluSquaredMLP with an x_scale (the torch path of its op, float32 here): post = relu(x8 w8^T s_x s_w)^2
    with x cast to e4m3 at the fixed scale s_x and w1 at its per-tensor scale amax/448, the output post w2; the
    backward is the bf16 path's formula on that post, from the unrounded x and w1 (dx = g_pre w1, dw1 = g_pre^T
    x, dw2 = post^T g with g_pre = (g w2^T) 2 sqrt(post)). Negative control: the fp8 product differs from the
    exact one, by the e4m3 rounding's few percent. Entries beyond 448 x_scale saturate instead of overflowing."""
    x, w1, w2, grad = _mlp_case(64, 48, 40)
    x_scale = x.abs().max().item() / 448
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    out = trainer.ReluSquaredMLP.apply(*leaves, x_scale)
    out.backward(grad)
    post, want_out = _fp8_mlp_reference(x, w1, w2, x_scale)
    torch.testing.assert_close(out.detach(), want_out, rtol=1e-4, atol=1e-4)
    grad_pre = (grad @ w2.T) * 2 * post.sqrt()
    for name, got, want in (("grad_x", leaves[0].grad, grad_pre @ w1), ("grad_w1", leaves[1].grad, grad_pre.T @ x),
                            ("grad_w2", leaves[2].grad, post.T @ grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    exact = _plain_mlp(x, w1, w2)
    rel = ((out.detach() - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.1, f"the e4m3 forward should differ from the exact one by a few percent, not {rel:.2e}"
    saturated = trainer.ReluSquaredMLP.apply(x, w1, w2, x_scale / 4)
    torch.testing.assert_close(saturated, _fp8_mlp_reference(x, w1, w2, x_scale / 4)[1], rtol=1e-4, atol=1e-4)
    assert saturated.isfinite().all(), "x beyond 448 x_scale must clamp to the e4m3 range"
    zero = torch.zeros(3, 16)
    assert torch.equal(trainer.e4m3_per_tensor(zero)[1], torch.tensor(1.0)), "an all-zero tensor gets scale 1"
    g = torch.Generator().manual_seed(1)
    a8 = torch.randn(32, 16, generator=g).to(torch.float8_e4m3fn)
    b8 = torch.randn(24, 16, generator=g).to(torch.float8_e4m3fn)
    torch.library.opcheck(trainer.mlp_matmul, (a8, b8, None, 0, torch.tensor(0.5)), test_utils=("test_faketensor",))


_INTERPRETED_MLP = r"""
import json
import torch
import train_gpt as t
from conftest import KernelLaunches
from test_model import _mlp_case, _mlp_grads, _plain_mlp
assert t._kernels_interpreted(), "TRITON_INTERPRET=1 must be set before the import"
launches = KernelLaunches().watch(t, "_mlp_matmul_kernel")
worst, kernel_launches = {}, {}
for seed, shape in enumerate([(70, 40, 52), (32, 32, 32), (5, 96, 36), (6, 33, 50)]):
    x, w1, w2, grad = _mlp_case(*shape, seed=seed)
    pre = x @ w1.T
    launches.clear()
    post = t.mlp_matmul(x, w1, None, 0)
    back = t.mlp_matmul(grad, w2, post, 1)
    kernel_launches[str(shape)] = [grid for _, grid in launches]
    pairs = [(post, torch.relu(pre).square()), (back, (grad @ w2.T) * 2 * torch.relu(pre))]
    pairs += list(zip(_mlp_grads(t.ReluSquaredMLP.apply, x, w1, w2, grad), _mlp_grads(_plain_mlp, x, w1, w2, grad)))
    worst[str(shape)] = max(((a - b).norm() / b.norm()).item() for a, b in pairs)
# float8 operands and a scale (the FP8 up-projection): rows of 64 and 96 bytes, bf16 outputs of 40 columns
for seed, (T, D, H) in enumerate([(70, 64, 40), (5, 96, 32)]):
    g = torch.Generator().manual_seed(10 + seed)
    a8 = torch.randn(T, D, generator=g).to(torch.float8_e4m3fn)
    b8 = (torch.randn(H, D, generator=g) / 4).to(torch.float8_e4m3fn)
    scale = torch.tensor(0.37)
    launches.clear()
    post = t.mlp_matmul(a8, b8, None, 0, scale)
    kernel_launches["fp8 " + str((T, D, H))] = [grid for _, grid in launches]
    want = torch.relu((a8.float() @ b8.float().T) * 0.37).square()
    assert post.dtype == torch.bfloat16, post.dtype
    worst["fp8 " + str((T, D, H))] = ((post.float() - want).norm() / want.norm()).item()
# the FP8 down-projection: bf16 a (post) cast to e4m3 at a / a_scale inside the kernel, e4m3 b, product alone.
# a / a_scale lies on e4m3's grid, so any rounding of the cast gives the same values: the interpreter's float8
# conversion rounds some values near a power of two down a binade (the GPU's cast is the GPU test's)
for seed, (T, H, D) in enumerate([(70, 64, 40), (5, 96, 32)]):
    g = torch.Generator().manual_seed(20 + seed)
    a_scale = torch.tensor(2.0 ** -3)
    a = ((4 * torch.randn(T, H, generator=g)).square().clamp(max=448).to(torch.float8_e4m3fn).float()
         * a_scale).bfloat16()
    b8 = (torch.randn(D, H, generator=g) / 4).to(torch.float8_e4m3fn)
    launches.clear()
    out = t.mlp_matmul(a, b8, None, 2, a_scale * 0.5, a_scale)
    kernel_launches["fp8 down " + str((T, H, D))] = [grid for _, grid in launches]
    want = (t._e4m3(a.float(), a_scale).float() @ b8.float().T) * a_scale * 0.5
    assert out.dtype == torch.bfloat16, out.dtype
    worst["fp8 down " + str((T, H, D))] = ((out.float() - want).norm() / want.norm()).item()
# post's amax gathered by the up-projection's kernel (one atomic max per tile)
x, w1, _, _ = _mlp_case(70, 40, 52, seed=5)
post, amax = t.mlp_matmul_amax(x, w1)
worst["amax"] = abs(amax.item() - post.max().item()) / post.max().item()
print(json.dumps(dict(worst=worst, launches=kernel_launches)))
"""


def test_mlp_matmul_kernel_equals_torch_under_the_interpreter(trainer):
    """The MLP's Triton matmul (relu^2 epilogue; gradient epilogue 2 sqrt(post)) and the whole ReluSquaredMLP
    through it, run by the interpreter in float32, against torch on ragged shapes (rows, columns and the inner
    dimension not multiples of the 32-wide tiles; TMA reads zeros and drops writes past an edge), with fewer
    programs than tiles (each walks several). Rows that are not 16-byte aligned (33 or 50 float32s) cannot have
    TMA descriptors: those calls take the torch formula, and the aligned ones must launch the kernel (else this
    test would compare torch with itself)."""
    if not trainer.HAS_TRITON:
        pytest.skip("triton is not installed")
    out = run_interpreted(_INTERPRETED_MLP)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for shape, error in result["worst"].items():
        bound = 4e-3 if shape.startswith("fp8") else 1e-5  # fp8: the bf16 output's rounding
        assert error < bound, f"relative error of the interpreted MLP at (T, D, H) = {shape}: {error}"
    programs = trainer.MLP_MATMUL_PROGRAMS_INTERPRET
    assert result["launches"] == {"(70, 40, 52)": [[programs]] * 2, "(32, 32, 32)": [[1]] * 2,
                                  "(5, 96, 36)": [[2]] * 2, "(6, 33, 50)": [],
                                  "fp8 (70, 64, 40)": [[programs]], "fp8 (5, 96, 32)": [[1]],
                                  "fp8 down (70, 64, 40)": [[programs]], "fp8 down (5, 96, 32)": [[1]]}, result["launches"]


H200_MAX_SHARED = 232448  # Triton's max_shared_mem on an H200 (its OutOfResources message on the device)
A100_MAX_SHARED = 166912  # 163 KiB, the most an A100 gives one block


def test_mlp_tile_shared_memory_estimate_matches_what_triton_asked_on_an_h200(trainer):
    """On an H200 Triton refused tile (128, 256, 64, 8, 4) in bf16 asking 262176 bytes: the estimate must not be
    below what Triton asks (else the guard lets a launch fail), and the default tile fits an H200, not an A100."""
    assert 262176 <= trainer.mlp_matmul_shared_bytes((128, 256, 64, 8, 4), 2) <= 262176 + 2048
    default = trainer.mlp_matmul_shared_bytes(trainer.MLP_MATMUL_CONFIG, 2)
    assert A100_MAX_SHARED < default <= H200_MAX_SHARED, default
    fp8 = trainer.mlp_matmul_shared_bytes(trainer.MLP_MATMUL_CONFIG_FP8, 1, 2)  # e4m3 tiles, a bf16 output tile
    assert fp8 == default, "the fp8 tile's doubled K step takes the bytes the bf16 tile's K step does"


class _RecordedLaunches:
    """Stands in for _mlp_matmul_kernel: records each launch's grid instead of running."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append(grid)


def test_mlp_matmul_takes_the_torch_formula_with_one_warning_where_the_tile_does_not_fit(trainer, monkeypatch):
    """On a GPU with too little shared memory for the tile (an A100 here, faked) --fused_mlp computes the torch
    formula and warns once; where it fits (an H200) the kernel is launched, one program per SM."""
    kernel = _RecordedLaunches()
    monkeypatch.setattr(trainer, "_triton_runs_on", lambda t: True)
    monkeypatch.setattr(trainer, "_mlp_matmul_kernel", kernel)
    monkeypatch.setattr(trainer, "_MLP_TILE_WARNED", set())
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=g).bfloat16(), torch.randn(48, 32, generator=g).bfloat16()  # the GPU's dtype
    monkeypatch.setattr(trainer, "gpu_properties", lambda index: dict(max_shared_mem=A100_MAX_SHARED,
                                                                       multiprocessor_count=108))
    with pytest.warns(UserWarning, match="needs .* bytes of shared memory"):
        out = trainer.mlp_matmul(a, b, None, 0)
    torch.testing.assert_close(out, torch.relu(a.float() @ b.float().T).square().bfloat16())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning for the same GPU and tile would raise here
        trainer.mlp_matmul(a, b, None, 0)
    assert kernel.grids == [], "the kernel was launched on a GPU its tile does not fit"
    monkeypatch.setattr(trainer, "gpu_properties", lambda index: dict(max_shared_mem=H200_MAX_SHARED,
                                                                       multiprocessor_count=132))
    trainer.mlp_matmul(a, b, None, 0)
    assert kernel.grids == [(1,)], f"one launch of min(tiles, SMs) programs expected, got {kernel.grids}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mlp_matmul_kernel_matches_torch_in_bf16_on_a_gpu(trainer):
    """The compiled kernel at the 124M model's shapes (one 48K-token row): within bf16 rounding of torch's."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(49152, 768, device="cuda", generator=g).bfloat16()
    w1, w2 = (torch.randn(3072, 768, device="cuda", generator=g).bfloat16() / 28 for _ in range(2))
    grad = torch.randn(49152, 768, device="cuda", generator=g).bfloat16()
    pre = (x.float() @ w1.float().T)
    post = trainer.mlp_matmul(x, w1, None, 0)
    back = trainer.mlp_matmul(grad, w2, post, 1)
    for name, a, b in (("post", post, torch.relu(pre).square()), ("grad", back, (grad.float() @ w2.float().T) * 2 * torch.relu(pre))):
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel < 1e-2, f"{name}: relative error {rel:.4f}"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper GPU (elsewhere the op takes the torch formula, the reference itself)")
def test_fp8_mlp_matmul_kernel_matches_torch_on_a_gpu(trainer, monkeypatch):
    """The FP8 up-projection's compiled kernel (e4m3 operands, K tile 128) at the 124M model's shapes: within bf16
    rounding of torch's product of the same e4m3 values (the kernel, not the fallback, must have run), and the
    whole fp8 MLP, forward and backward, within a few percent of bf16's."""
    monkeypatch.setattr(trainer, "_mlp_matmul_kernel", trainer._mlp_matmul_kernel)  # the watch is undone after
    launches = KernelLaunches().watch(trainer, "_mlp_matmul_kernel")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = trainer.rms_norm(torch.randn(49152, 768, device="cuda", generator=g)).bfloat16()
    w1, w2 = (torch.randn(3072, 768, device="cuda", generator=g).bfloat16() / 28 for _ in range(2))
    x_scale = 768 ** 0.5 / 448
    (w8, w_s), x8 = trainer.e4m3_per_tensor(w1), trainer._e4m3(x.float(), x_scale)
    post = trainer.mlp_matmul(x8, w8, None, 0, w_s * x_scale)
    assert len(launches) == 1, f"the fp8 product must run in the kernel, launches: {launches}"
    want = torch.relu((x8.float() @ w8.float().T) * (w_s * x_scale)).square()
    rel = ((post.float() - want).norm() / want.norm()).item()
    assert rel < 1e-2, f"fp8 kernel against torch on the same e4m3 values: relative error {rel:.4f}"
    grad = torch.randn(49152, 768, device="cuda", generator=g).bfloat16()
    fp8, exact = (_mlp_grads(lambda *a: trainer.ReluSquaredMLP.apply(*a, scale), x, w1, w2, grad)
                  for scale in (x_scale, None))
    for name, a, b in zip(("out", "grad_x", "grad_w1", "grad_w2"), fp8, exact):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < 0.1, f"fp8 MLP against bf16, {name}: relative error {rel:.4f}"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper GPU")
def test_fp8_down_projection_kernels_match_torch_on_a_gpu(trainer):
    """--fp8_mlp_down at the 124M model's shapes: the up-projection's kernel reports post's largest entry, the
    down-projection's kernel (post cast to e4m3 in registers) is within bf16 rounding of torch's product of the
    same e4m3 values, and the whole MLP with it within a few percent of bf16's, its gradients the bf16 path's."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x = trainer.rms_norm(torch.randn(49152, 768, device="cuda", generator=g)).bfloat16()
    w1, w2 = (torch.randn(3072, 768, device="cuda", generator=g).bfloat16() / 28 for _ in range(2))
    post, amax = trainer.mlp_matmul_amax(x, w1)
    torch.testing.assert_close(amax, post.float().amax().reshape(1), rtol=1e-2, atol=0)
    post_s = amax.reshape(()) / trainer.FP8_E4M3_MAX
    w2t8, w2_s = trainer.e4m3_per_tensor(w2.T.contiguous())
    out = trainer.mlp_matmul(post, w2t8, None, 2, post_s * w2_s, post_s)
    want = (trainer._e4m3(post.float(), post_s).float() @ w2t8.float().T) * post_s * w2_s
    rel = ((out.float() - want).norm() / want.norm()).item()
    assert rel < 1e-2, f"fp8 down-projection kernel against torch on the same e4m3 values: {rel:.4f}"
    grad = torch.randn(49152, 768, device="cuda", generator=g).bfloat16()
    fp8, exact = (_mlp_grads(lambda *a: trainer.ReluSquaredMLP.apply(*a, None, down), x, w1, w2, grad)
                  for down in (True, False))
    for name, a, b in zip(("out", "grad_x", "grad_w1", "grad_w2"), fp8, exact):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert rel < (0.1 if name == "out" else 1e-3), f"fp8 down MLP against bf16, {name}: relative error {rel:.4f}"


def test_fp8_applies_on_a_gpu_while_training_only(trainer):
    """An FP8 matmul (--fp8_mlp_up here) takes effect for CUDA inputs with gradients enabled: validation
    (no_grad) and CPU runs see the bf16 model, as for the FP8 head."""
    cuda, cpu = types.SimpleNamespace(is_cuda=True), types.SimpleNamespace(is_cuda=False)
    assert trainer.fp8_applies(True, cuda)
    assert not trainer.fp8_applies(False, cuda), "the flag off"
    assert not trainer.fp8_applies(True, cpu), "a CPU tensor"
    with torch.no_grad():
        assert not trainer.fp8_applies(True, cuda), "validation"


def test_fp8_matmuls_turn_off_with_a_warning_where_the_gpu_cannot_run_them(trainer, monkeypatch):
    """fp8_on_this_gpu (main calls it before the log): on a Hopper GPU the FP8 flags stay; on an Ada GPU (float8,
    but 99 KiB of shared memory per program) the up-projection's tile does not fit, so --fp8_mlp_up goes off; on an
    A100 (no float8) all go off; each change is warned about by name, and a CPU run is left alone. The GPUs are
    faked: capability and shared memory only."""
    gpus = {"h100": ((9, 0), 232448), "ada": ((8, 9), 101376), "a100": ((8, 0), 167936)}
    gpu = "h100"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpus[gpu][0])
    monkeypatch.setattr(trainer, "gpu_properties", lambda index: dict(max_shared_mem=gpus[gpu][1],
                                                                       multiprocessor_count=132))
    hp = trainer.parse_args(["--fp8_head=true", "--fp8_mlp_up=true", "--fused_mlp=true", "--fp8_qkv=true",
                             "--fp8_mlp_down=true", "--micro_batch_tokens=0"])
    cuda = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.fp8_on_this_gpu(hp, cuda) == hp, "Hopper runs both"
        assert trainer.fp8_on_this_gpu(hp, torch.device("cpu")) is hp
    for gpu, head, up in (("ada", True, False), ("a100", False, False)):
        with pytest.warns(UserWarning) as caught:
            got = trainer.fp8_on_this_gpu(hp, cuda)
        # --fp8_qkv needs float8 only; the down-projection's (bf16) tile fits Ada's shared memory no better than the up's
        assert (got.fp8_head, got.fp8_mlp_up, got.fp8_qkv, got.fp8_mlp_down) == (head, up, head, up), gpu
        message = str(caught[0].message)
        assert ("--fp8_head" in message) == (not head) and "--fp8_mlp_up=false" in message, message
    gpu = "ada"
    off = trainer.parse_args(["--fp8_mlp_up=false"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.fp8_on_this_gpu(off, cuda) == off, "nothing to turn off, nothing said"


def test_fp8_mlp_flag_reaches_the_fused_function_as_a_fixed_input_scale(trainer, monkeypatch):
    """With --fp8_mlp_up, the block passes ReluSquaredMLP the fixed input scale sqrt(dim) / 448 (its input is
    RMS-normed, so no entry exceeds sqrt(dim)) while training, and none under no_grad or without the flag; by
    default as the track's recipe says (the small track: on; the medium's, without the fused MLP: off). The GPU
    check is forced here: the path stops at the stub."""
    scales = []
    monkeypatch.setattr(trainer.ReluSquaredMLP, "apply",
                        lambda x, w1, w2, x_scale, fp8_down: scales.append(x_scale) or _plain_mlp(x, w1, w2))
    monkeypatch.setattr(trainer, "_triton_runs_on", lambda t: True)
    monkeypatch.setattr(trainer, "fp8_applies", lambda enabled, x: enabled and torch.is_grad_enabled())
    cases = ((["--fp8_mlp_up=true"], True), (["--fp8_mlp_up=true"], False), (["--fp8_mlp_up=false"], True), ([], True))
    for flags, grad in cases:
        hp = trainer.parse_args(["--preset=tiny", "--gate_split_layer=0", "--mudd=false", "--dc_layers=", *flags])
        model = trainer.GPT(hp)
        x = torch.randn(16, hp.model_dim)
        s = {name: w.detach() for name, w in model.layer_weights(2).items()}
        with torch.set_grad_enabled(grad):
            model.blocks[2](x, x, None, None, None, s, None, None, 0.1)
    scale = pytest.approx(64 ** 0.5 / 448)
    assert scales == [scale, None, None, scale if trainer.Hyperparameters().fp8_mlp_up else None], scales


def test_fp8_down_projection_rounds_post_and_w2_to_e4m3_at_their_amax(trainer, monkeypatch):
    """ReluSquaredMLP with fp8_down (the torch path of its ops, float32 here): the output is post8 w2_8^T s_p s_w
    with post cast to e4m3 at its own amax / 448 (which the up-projection's op reports) and w2 at its; the
    backward is the bf16 path's from the unrounded post. Negative control: it differs from the exact output by
    e4m3's rounding. With --fp8_mlp_down the block asks for it while training only."""
    x, w1, w2, grad = _mlp_case(64, 48, 40)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
    out = trainer.ReluSquaredMLP.apply(*leaves, None, True)
    out.backward(grad)
    post = torch.relu(x @ w1.T).square()
    post_s, w2_s = post.amax() / 448, w2.abs().amax() / 448
    want = (trainer._e4m3(post, post_s).float() @ trainer._e4m3(w2.T, w2_s).float().T) * post_s * w2_s
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-4)
    exact = _plain_mlp(x, w1, w2)
    rel = ((out.detach() - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.1, f"the e4m3 down-projection should differ from the exact one by a few percent: {rel:.2e}"
    torch.library.opcheck(trainer.mlp_matmul_amax, (x, w1), test_utils=("test_faketensor",))
    w2t8 = trainer._e4m3(w2.T, w2_s).contiguous()
    torch.library.opcheck(trainer.mlp_matmul, (post.bfloat16(), w2t8, None, 2, post_s * w2_s, post_s),
                          test_utils=("test_faketensor",))
    plain = _mlp_grads(trainer.ReluSquaredMLP.apply, x, w1, w2, grad)
    for name, got, ref in zip(("grad_x", "grad_w1", "grad_w2"), (t.grad for t in leaves), plain[1:]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    asked = []
    monkeypatch.setattr(trainer.ReluSquaredMLP, "apply",
                        lambda x, w1, w2, x_scale, fp8_down: asked.append(fp8_down) or _plain_mlp(x, w1, w2))
    monkeypatch.setattr(trainer, "_triton_runs_on", lambda t: True)
    monkeypatch.setattr(trainer, "fp8_applies", lambda enabled, x: enabled and torch.is_grad_enabled())
    down = ["--fp8_mlp_down=true", "--micro_batch_tokens=0"]  # it scales a whole pass: rows not joined
    for flags, grad_on in ((down, True), (down, False), ([], True)):
        hp = trainer.parse_args(["--preset=tiny", "--gate_split_layer=0", "--mudd=false", "--dc_layers=", *flags])
        model = trainer.GPT(hp)
        s = {name: w.detach() for name, w in model.layer_weights(2).items()}
        with torch.set_grad_enabled(grad_on):
            model.blocks[2](torch.randn(16, hp.model_dim), torch.randn(16, hp.model_dim), None, None, None, s, None,
                            None, 0.1)
    assert asked == [True, False, False], asked


def test_fused_mlp_flag_selects_the_fused_function(trainer, monkeypatch):
    """--fused_mlp makes the block call ReluSquaredMLP where the Triton kernels run (forced here) with its
    normed input and both matrices; without the flag the block never calls it."""
    calls = []  # the stub computes the plain MLP from the arguments it gets: the block must pass (x, w1, w2)
    monkeypatch.setattr(trainer.ReluSquaredMLP, "apply",
                        lambda x, w1, w2, x_scale, fp8_down: calls.append(x_scale) or _plain_mlp(x, w1, w2))
    monkeypatch.setattr(trainer, "_triton_runs_on", lambda t: True)
    outs = []
    for flags in (["--fused_mlp=true"], ["--fused_mlp=false", "--fp8_mlp_up=false"]):
        torch.manual_seed(0)
        hp = trainer.parse_args(["--preset=tiny", "--gate_split_layer=0", "--mudd=false", "--dc_layers=", *flags])
        model = trainer.GPT(hp)
        assert model.blocks[2].qk_w is None, "the tiny preset's layer 2 has no attention: the MLP alone runs"
        x = torch.randn(16, hp.model_dim)
        s = {name: w.detach() for name, w in model.layer_weights(2).items()}
        outs.append(model.blocks[2](x, x, None, None, None, s, None, None, 0.1))
    assert calls == [None], f"ReluSquaredMLP calls (their x_scale) over one fused and one plain block: {calls}"
    torch.testing.assert_close(outs[0], outs[1])


_INTERPRETED_TRANSPOSE = r"""
import torch
import {module} as t
assert t._kernels_interpreted(), "TRITON_INTERPRET=1 must be set before the import"
for M, N in ((16, 32), (37, 70), (5, 100), (64, 33)):  # whole tiles, ragged on both sides, one tile high or wide
    x = torch.randint(0, 256, (M, N), dtype=torch.uint8).view(torch.float8_e5m2)
    y = t.transpose_bytes(x)
    assert y.shape == (N, M) and y.dtype == x.dtype, (y.shape, y.dtype)
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8).T), (M, N)
print("ok")
"""


def test_transpose_kernel_copies_every_byte_transposed_under_the_interpreter(trainer):
    """The Triton transpose (rectangular tiles of 16 x 32 in the interpreter) on shapes that are and are not tile
    multiples: every byte lands at its transposed place, the masked edges included."""
    if not trainer.HAS_TRITON:
        pytest.skip("triton is not installed")
    out = run_interpreted(_INTERPRETED_TRANSPOSE.format(module=trainer.__name__))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_transpose_bytes_is_an_exact_transposed_copy_and_checks_input(trainer):
    x = torch.randint(0, 256, (5, 7), dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert torch.equal(trainer.transpose_bytes(x).view(torch.uint8), x.view(torch.uint8).T)
    for bad in (torch.zeros(4, 4), torch.zeros(2, 3, 4, dtype=torch.uint8), torch.zeros(4, 6, dtype=torch.uint8).T):
        with pytest.raises(ValueError, match="contiguous 2-d tensor of 1-byte elements"):
            trainer.transpose_bytes(bad)
    torch.library.opcheck(trainer.transpose_bytes, (x,), test_utils=("test_faketensor",))


def test_fp8_matmul_op_fake_kernel_agrees_with_the_real_one(trainer):
    """torch.compile plans with the fake kernel; a shape, dtype or stride mismatch fails on the GPU."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 16, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(48, 16, generator=g).to(torch.float8_e5m2)
    for out_f32 in (False, True):
        torch.library.opcheck(trainer.fp8_mm, (a, b, torch.tensor(0.01), torch.tensor(0.05), out_f32, False),
                              test_utils=("test_faketensor",))


def test_fp8_head_serves_training_only(trainer):
    """Validation (no gradients) reads bf16 logits so the measured loss has no e4m3 rounding; training on GPU
    casts. A CPU tensor never casts (negative control: the flag alone does not decide)."""
    hp = trainer.parse_args(["--preset=tiny"])
    on_gpu, on_cpu = types.SimpleNamespace(is_cuda=True), torch.zeros(1)
    assert hp.fp8_head and trainer.fp8_applies(hp.fp8_head, on_gpu), "training on GPU uses the FP8 head"
    with torch.no_grad():
        assert not trainer.fp8_applies(hp.fp8_head, on_gpu), "validation must read bf16 logits"
    assert not trainer.fp8_applies(hp.fp8_head, on_cpu), "CPU runs the fp32 head"
