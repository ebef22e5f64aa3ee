"""The model: attention masks (GPU BlockMask == CPU dense mask), causality, document isolation, init."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BOS, shared_code_only


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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window_blocks", [1, 2, 3, 8])
def test_flex_block_mask_attends_exactly_like_the_dense_mask(trainer, layout, window_blocks):
    """FlexAttention with the BlockMask (GPU path) equals SDPA with the dense mask (CPU path)."""
    from torch.nn.attention.flex_attention import flex_attention
    tokens = _tokens_with_documents(1024, layout, BOS)
    docs = trainer.document_ids(tokens, BOS)
    q, k, v = torch.randn(3, 1, 2, 1024, 32, generator=torch.Generator().manual_seed(1)).unbind(0)
    dense = trainer.dense_attention_mask(docs, window_blocks)
    block_mask = trainer.flex_block_mask(docs, window_blocks)
    out_flex = flex_attention(q, k, v, block_mask=block_mask, scale=0.12)
    out_dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.12)
    torch.testing.assert_close(out_flex, out_dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("window_blocks", [1, 3])
def test_block_lists_cover_the_dense_mask_and_full_blocks_need_no_mask(trainer, layout, window_blocks):
    """The fused kernel reads only the block lists: a block pair is listed iff the dense mask has any
    allowed pair in it, and a pair listed as full has every pair allowed (the mask_mod is skipped there)."""
    B = trainer.ATTN_BLOCK
    tokens = _tokens_with_documents(1024, layout, BOS)
    docs = trainer.document_ids(tokens, BOS)
    dense = trainer.dense_attention_mask(docs, window_blocks)
    nb = 1024 // B
    tiles = dense.view(nb, B, nb, B).permute(0, 2, 1, 3)
    any_allowed, all_allowed = tiles.any(dim=(-2, -1)), tiles.all(dim=(-2, -1))
    bm = trainer.flex_block_mask(docs, window_blocks)

    def listed(num, idx):
        out = torch.zeros(nb, nb, dtype=torch.bool)
        for qb in range(nb):
            out[qb, idx[0, 0, qb, :num[0, 0, qb]].long()] = True
        return out

    partial = listed(bm.kv_num_blocks, bm.kv_indices)
    full = listed(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (partial & full).any(), "a block pair is either partial or full"
    assert torch.equal(partial | full, any_allowed), "listed block pairs differ from the dense mask's support"
    assert torch.equal(full & all_allowed, full), "a full block pair contains masked positions"


def _tiny_model(trainer, *flags):
    hp = trainer.parse_args(["--preset=tiny", *flags])
    torch.manual_seed(0)
    return hp, trainer.GPT(hp)


def _call(model, inputs, targets, windows=(1, 2), scale=0.1, weights=(1.0, 0.0)):
    return model(inputs, targets, windows, scale, torch.tensor(weights))


def _randomize(model, std=0.05):
    """Non-trivial weights everywhere, so every path of the forward carries signal (zero-initialized
    tables, gates and projections would hide a wrong connection)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in ("layer_scalars", "global_scalars"):
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
        if block.qkvo_w is not None:
            assert (block.qkvo_w.flatten(1).abs().amax(1) > 0).all(), "q, k, v, o start nonzero (the speedrun's init)"


def test_layers_marked_dash_have_no_attention_and_still_learn_their_mlp(trainer):
    hp, model = _tiny_model(trainer)
    no_attention = [i for i, kind in enumerate(hp.layer_attention) if kind == "-"]
    assert no_attention and all(model.blocks[i].qkvo_w is None for i in no_attention)
    attention_layers = len(hp.layer_attention) - len(no_attention)
    assert len(model.hidden_matrices()) == attention_layers + 2 * hp.num_layers, "qkvo stacks and 2 MLP matrices"
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
            f"--skip_connection=1>{n - 2}", f"--cache_layer={n - 3}"]


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
    windows = (torch.tensor(1), torch.tensor(2))  # tensors, as on GPU, so window changes do not recompile
    for step in range(2):
        loss = _call(compiled, train[:-1], train[1:], windows, torch.tensor(0.1))
        loss.backward()
        torch.testing.assert_close(loss, _call(eager, train[:-1], train[1:], windows, torch.tensor(0.1)))
        with torch.no_grad():
            torch.testing.assert_close(_call(compiled, val[:-1], val[1:], windows, torch.tensor(0.1)),
                                       _call(eager, val[:-1], val[1:], windows, torch.tensor(0.1)))
        windows = (torch.tensor(2), torch.tensor(3))
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
        _call(compiled, train[:-1], train[1:], (torch.tensor(1), torch.tensor(2)), torch.tensor(0.1)).backward()
        breaks = dict(counters["graph_break"])
        assert not breaks, f"graph breaks with per_block_inside={per_block_inside}: {breaks}"
    torch._dynamo.reset()
    assert len(graphs) == 2, f"{len(graphs)} graphs for two whole-model compiles; expected one each"
    assert graphs[0] == graphs[1], "compiled blocks inside changed the whole-model training graph"


def test_a_compiled_block_takes_a_fresh_block_mask_every_call_without_recompiling(trainer):
    """The GPU path builds new BlockMasks (new mask_mod closures) every forward; a per-block compiled graph
    must treat them as inputs, or every step would recompile until dynamo gave up and ran eagerly."""
    from torch._dynamo.utils import counters
    hp, model = _tiny_model(trainer)
    _randomize(model)
    block = model.blocks[1]  # value embedding and XSA
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, backend="eager", dynamic=False)
    x = torch.randn(1, 512, hp.model_dim)
    scalars = model.layer_scalars[1].detach()
    for window, bos in [(1, [0, 100]), (2, [0, 300, 301]), (4, [0])]:
        docs = trainer.document_ids(_tokens_with_documents(512, bos, BOS), BOS)
        mask = trainer.flex_block_mask(docs, torch.tensor(window))
        with torch.no_grad():  # FlexAttention has no CPU backward
            torch.testing.assert_close(compiled(x, x, x, x, None, scalars, mask, torch.tensor(0.1)),
                                       block(x, x, x, x, None, scalars, trainer.dense_attention_mask(docs, window), 0.1))
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs == 1, f"{graphs} graphs for one block kind: the BlockMask was guarded on, not taken as input"


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
              1 / trainer.FP8_E4M3_MAX)
    y = trainer.FP8Linear.apply(x, w, *scales)
    grad_y = 0.01 * torch.randn(y.shape, generator=g)
    y.backward(grad_y.bfloat16())
    x32, w32 = x.detach().float().requires_grad_(), w.detach().clone().requires_grad_()
    (x32 @ w32.T).backward(grad_y)
    for name, got, want in [("y", y, x32 @ w32.T), ("grad_x", x.grad, x32.grad), ("grad_w", w.grad, w32.grad)]:
        rel = ((got.float() - want).norm() / want.norm()).item()
        assert rel < 0.1, f"{name}: relative error {rel:.3f} is beyond float8 rounding"
    assert y.dtype == x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32, "dtypes follow the operands"


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
        torch.library.opcheck(trainer.fp8_mm, (a, b, 0.01, 0.05, out_f32, False), test_utils=("test_faketensor",))
