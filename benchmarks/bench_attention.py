"""Attention kernels for the recipe's shapes: FlexAttention with the trainer's document + sliding-window
BlockMask against `torch.nn.attention.varlen.varlen_attn` (FlashAttention with cu_seqlens and a token
window), forward + backward, bf16, on one GPU.

    python benchmarks/bench_attention.py [--tokens 16384] [--doc_len 1000] [--windows 3,7,11,13]

For each long window (in 128-token blocks) it prints: the cold compile time of the compiled FlexAttention
forward + backward (the first call; later windows reuse it, since the window is a tensor), the median ms
of forward + backward for both kernels, and their output difference relative to FlexAttention's output.
The two kernels differ in how the window is counted (FlexAttention here: key block within `window`
blocks of the query block; varlen_attn: key token within window * 128 tokens of the query token), so the
difference is not zero; a dense reference with varlen_attn's token window is also compared.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402 (after the path insert: benchmarks/ is a folder of scripts)


def documents(tokens: int, doc_len: int, seed: int = 0) -> torch.Tensor:
    """Token ids with a BOS at the start of documents of random length around doc_len."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (tokens,), generator=g)
    pos = 0
    while pos < tokens:
        ids[pos] = train_gpt.Hyperparameters.bos_id
        pos += int(torch.randint(doc_len // 4, 2 * doc_len, (1,), generator=g))
    return ids


def median_ms(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--doc_len", type=int, default=1000)
    ap.add_argument("--windows", default="3,7,11,13", help="long windows to time, in 128-token blocks")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a GPU", file=sys.stderr)
        return 2
    from torch.nn.attention.flex_attention import flex_attention
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    T, H, D, dev = args.tokens, 6, 128, torch.device("cuda")
    ids = documents(T, args.doc_len).to(dev)
    docs = train_gpt.document_ids(ids, train_gpt.Hyperparameters.bos_id)
    starts = torch.nonzero(ids == train_gpt.Hyperparameters.bos_id).flatten()
    if starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(T, H, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    scale = 0.12

    @torch.compile(dynamic=False)
    def flex(q, k, v, window):
        mask = train_gpt.flex_block_mask(docs, window)
        return flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                              block_mask=mask, scale=scale)[0].transpose(0, 1)

    rows = []
    for w in (int(x) for x in args.windows.split(",")):
        window = torch.tensor(w, device=dev, dtype=torch.int32)
        t0 = time.perf_counter()
        out_flex = flex(q, k, v, window)
        out_flex.backward(grad)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        flex_ms = median_ms(lambda: flex(q, k, v, window).backward(grad))
        row = dict(window=w, flex_first_call_s=first, flex_ms=flex_ms)
        if varlen_attn is not None:
            def varlen():
                return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(w * 128, 0))
            out_var = varlen()
            row["varlen_ms"] = median_ms(lambda: varlen().backward(grad))
            row["varlen_vs_flex"] = ((out_var - out_flex).float().norm() / out_flex.float().norm()).item()
            # dense reference with the token window, to check varlen_attn's semantics
            i = torch.arange(T, device=dev)
            allowed = (i[None, :] <= i[:, None]) & (docs[None, :] == docs[:, None]) & (i[:, None] - i[None, :] <= w * 128)
            n = min(T, 4096)  # the first 4096 queries: a dense [n, n] mask fits
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[:n].transpose(0, 1).float(), k[:n].transpose(0, 1).float(), v[:n].transpose(0, 1).float(),
                attn_mask=allowed[:n, :n], scale=scale).transpose(0, 1)
            row["varlen_vs_dense_token_window"] = ((out_var[:n].float() - ref).norm() / ref.norm()).item()
        rows.append(row)
        print(row, flush=True)
    print(f"\n{T} tokens, {H} heads x {D}, documents ~{args.doc_len} tokens, bf16, fwd+bwd (median of 20):")
    print("| long window (blocks) | flex first call (s) | flex ms | varlen_attn ms | varlen vs flex | varlen vs dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['window']} | {r['flex_first_call_s']:.1f} | {r['flex_ms']:.3f} | {r.get('varlen_ms', float('nan')):.3f} "
              f"| {r.get('varlen_vs_flex', float('nan')):.4f} | {r.get('varlen_vs_dense_token_window', float('nan')):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
