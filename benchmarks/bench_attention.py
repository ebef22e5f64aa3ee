"""The trainer's attention op on GPU: correctness against its CPU reference and time per call, for the
recipe's shapes (one packed row of documents, causal sliding window, plain and paired heads).

    python benchmarks/bench_attention.py [--tokens 16384] [--doc_len 1000] [--windows 1,3,5,7,11,13]

`train_gpt.window_attention` runs PyTorch's FlashAttention varlen kernels on GPU (bf16) and a dense
float32 reference on CPU (the one the CPU tests check against a per-query loop). For each window (in
128-token blocks) this prints the relative error of the GPU output and gradients against the reference on
the first --check_tokens tokens, and the median ms of forward + backward over the whole row, plain (6
heads) and paired (3 pairs over 2T positions). The first call's time is printed too: there is no kernel
to compile (FlashAttention ships built).
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


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def layout(ids, window, paired, device):
    """(cu_seqlens on device, the op's CPU ints) for the documents of ids [T] (CPU), as the model's layers of
    that kind (paired: heads in pairs over 2T positions) pass them."""
    stretch = 2 if paired else 1
    cu, docs, max_len = train_gpt.document_bounds(ids.numpy(), train_gpt.Hyperparameters.bos_id)
    return stretch * torch.from_numpy(cu).to(device), torch.tensor([docs, stretch * max_len, window])


def attend(q, k, v, grad, cu, meta, paired):
    """(output, (dq, dk, dv)) of the trainer's attention op for q, k, v, grad [T, H, D] on any device."""
    pair = train_gpt.pair_heads if paired else (lambda t: t)
    out, _ = train_gpt.window_attention(pair(q), pair(k), pair(v), cu, meta)
    return out, torch.autograd.grad(out, (q, k, v), pair(grad))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--doc_len", type=int, default=1000)
    ap.add_argument("--windows", default="1,3,5,7,11,13", help="windows to test, in 128-token blocks")
    ap.add_argument("--check_tokens", type=int, default=2048, help="prefix compared with the CPU reference")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a GPU", file=sys.stderr)
        return 2
    T, H, D, dev = args.tokens, 6, 128, torch.device("cuda")
    ids = documents(T, args.doc_len)
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(T, H, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    grad = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    q = (q.detach() * 0.12).requires_grad_()  # a trained scale folded into q, as the model does
    n = args.check_tokens
    rows = []
    for w in (int(x) for x in args.windows.split(",")):
        for paired in (False, True):
            window = w * train_gpt.ATTN_BLOCK
            cu, meta = layout(ids, window, paired, dev)
            t0 = time.perf_counter()
            out, _ = attend(q, k, v, grad, cu, meta, paired)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms = median_ms(lambda: attend(q, k, v, grad, cu, meta, paired))
            # Errors on the first n tokens: queries there see only keys among them (causal), so the whole row's
            # output prefix equals the prefix's; gradients are recomputed on the prefix, on the GPU and by the
            # same op on CPU in float32 (its reference).
            prefix = [t[:n].detach().requires_grad_() for t in (q, k, v)]
            _, grads = attend(*prefix, grad[:n], *layout(ids[:n], window, paired, dev), paired)
            ref_out, ref_grads = attend(*(t.float().cpu().detach().requires_grad_() for t in prefix),
                                        grad[:n].float().cpu(), *layout(ids[:n], window, paired, "cpu"), paired)
            stretch = 2 if paired else 1
            row = dict(window=w, paired=paired, ms=ms, first_call_s=first,
                       out_err=relative_error(out[:stretch * n], ref_out),
                       dq_err=relative_error(grads[0], ref_grads[0]), dk_err=relative_error(grads[1], ref_grads[1]),
                       dv_err=relative_error(grads[2], ref_grads[2]))
            rows.append(row)
            print(row, flush=True)
    print(f"\n{T} tokens, {H} heads x {D}, documents ~{args.doc_len} tokens, bf16, fwd+bwd (median of 20); errors "
          f"relative to the float32 CPU reference on the first {n} tokens:")
    print("| window (blocks) | heads | ms | first call (s) | out | dq | dk | dv |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['window']} | {'paired' if r['paired'] else 'plain'} | {r['ms']:.3f} | {r['first_call_s']:.2f} "
              f"| {r['out_err']:.1e} | {r['dq_err']:.1e} | {r['dk_err']:.1e} | {r['dv_err']:.1e} |")
    worst = max(max(r["out_err"], r["dq_err"], r["dk_err"], r["dv_err"]) for r in rows)
    print(f"worst relative error {worst:.1e} (bf16 inputs: ~1e-2 expected; a wrong mask gives ~1)")
    return 0 if worst < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
