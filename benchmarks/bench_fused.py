"""The fused kernels of train_gpt.py against the paths they replace: time, memory and agreement per call.

    python benchmarks/bench_fused.py [--tokens 49152] [--json out.json]     # one GPU, the 124M model's shapes
    python benchmarks/bench_fused.py --device cpu --tokens 64 --vocab 512 --no_compile   # a smoke run

The cases, each forward + backward of one micro-batch (one packed row of --tokens tokens), both arms inside
torch.compile as in training (unless --no_compile):
- mlp: relu(x w1^T)^2 w2 as the trainer writes it without --fused_mlp (Inductor: cuBLAS matmuls and fused
  elementwise kernels) against ReluSquaredMLP (--fused_mlp: the activation and its gradient in the epilogues
  of Triton matmuls), x [T, 768] bf16, w1 and w2 [3072, 768] bf16.
- mlp fp8: ReluSquaredMLP against itself with the FP8 up-projection (--fp8_mlp_up: x at the fixed scale
  sqrt(768)/448, w1 at its amax/448, cast to e4m3), x RMS-normed as the block's; its "difference" is e4m3's
  rounding, not an error.
- mlp fp8 down: the FP8 up-projection's MLP against itself with the FP8 down-projection too (--fp8_mlp_down:
  post cast to e4m3 at its amax / 448 inside the down-projection's kernel, w2 at its amax / 448); its output
  difference is e4m3's rounding, its gradients equal.
- qkv fp8: the attention's q, k, v projection x w^T (w [3 dim, dim] bf16) as F.linear against FP8ForwardLinear
  (--fp8_qkv: the forward from e4m3 operands, x at the fixed scale sqrt(dim)/448; the backward the same bf16
  products), x RMS-normed; its output difference is e4m3's rounding, its gradients equal.
- head: FP8Linear then softcap_mtp_ce (the loss backward writes the bf16 logit gradient, then it is cast to
  e5m2) against FP8HeadLoss (--fp8_head_fused_grad: the loss kernel writes the e5m2 gradient in its forward),
  x [T, 768] bf16, the head [V, 768] fp32, four target columns (3 next tokens and the byte prefix, stage 1's)
  and the loss divided by 8 micro-batches as the trainer does.
- dc: DC's correction by tensor ops against its Triton kernels (--dc_kernel), q, k, v [T, 6, 128] bf16 and
  the per-token weights [T, 6], documents of 200-2000 tokens.
Prints per case and arm the median ms over --reps calls after 3 warm-up calls (CUDA events on GPU, wall
clock on CPU), the peak memory of one call beyond what was allocated before it, and the relative
difference of the fused arm's output and gradients from the other's.

--ce_configs "4096,8;8192,16" times the loss-with-gradient kernel (softcap_mtp_ce_with_grad, the default
head path) per (BLOCK, warps) launch configuration (train_gpt.CE_LAUNCH is the trainer's), with its GB/s;
--ce_pass_math "exact,exact;tanh,tanh" runs each configuration with each (loss pass, gradient pass) form
(train_gpt.CE_PASS_MATH, the trainer's, by default).
--transpose_configs "64,64,4;128,128,8" times transpose_bytes (the FP8 head's transposed copy of its e5m2 logit
gradient, [tokens, vocab]) per (rows, columns, warps) tile configuration (train_gpt.TRANSPOSE_LAUNCH is the
trainer's), with its GB/s (one read and one write of every byte).
--mlp_configs "128,256,64,8,3;128,128,64,4,4" also times mlp_matmul alone with each tile configuration
(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages; train_gpt.MLP_MATMUL_CONFIG is the trainer's), forward (relu^2
epilogue) and backward (2 sqrt(post) epilogue) at [tokens, dim] x [hidden, dim]^T, against the cuBLAS matmul
of the same shape without its elementwise passes: ms, TFLOP/s and the error against torch per configuration.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # noqa: E402 (after the path inserts: benchmarks/ is a folder of scripts)
import train_gpt  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=49152, help="tokens per micro-batch (stage 3's row)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--no_compile", action="store_true", help="run both arms eagerly")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--ce_configs", default="", help="launch configurations of the loss-with-gradient kernel to time, "
                   "';'-separated 'BLOCK,warps' (GPU; the trainer's: train_gpt.CE_LAUNCH)")
    p.add_argument("--ce_pass_math", default="", help="';'-separated (loss pass, gradient pass) forms of that "
                   "kernel, 'loss,grad', each exact or tanh (the trainer's: train_gpt.CE_PASS_MATH)")
    p.add_argument("--transpose_configs", default="", help="';'-separated 'rows,columns,warps' tiles of "
                   "transpose_bytes to time (GPU; the trainer's: train_gpt.TRANSPOSE_LAUNCH)")
    p.add_argument("--shared_mem_limit", type=int, default=None, help="bytes of shared memory per program the "
                   "tile sweep assumes (default: the GPU's); tiles that need more are listed as skipped, not run")
    p.add_argument("--mlp_configs", default="", help="tile configurations of mlp_matmul to time, ';'-separated "
                   "'BLOCK_M,BLOCK_N,BLOCK_K,warps,stages' (GPU; the trainer's: train_gpt.MLP_MATMUL_CONFIG)")
    return p.parse_args(argv)


def median_ms(fn, reps: int, device: torch.device) -> float:
    """bench_attention's CUDA-event median on a GPU; wall clock after 3 warm-up calls on CPU."""
    if device.type == "cuda":
        return bench_attention.median_ms(fn, reps)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_mib(fn, device: torch.device) -> float | None:
    """Memory one call needs beyond what was allocated before it (MiB); None off GPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def forward_backward(fn, leaves, scale=1.0):
    """A call that runs fn(*leaves) and backpropagates its output times scale (a loss), or a gradient of scale
    everywhere (an activation); it returns (output, gradients), the gradients cleared first."""
    def call():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        if out.dim() == 0:  # a loss
            (out * scale).backward()
        else:
            out.backward(scale * torch.ones_like(out))
        return out.detach(), [t.grad for t in leaves]
    return call


def mlp_case(args, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.dim, device=device, generator=g).bfloat16().requires_grad_()
    w1, w2 = ((torch.randn(args.hidden, args.dim, device=device, generator=g) / args.dim ** 0.5).bfloat16()
              .requires_grad_() for _ in range(2))

    def plain(x, w1, w2):
        return F.relu(F.linear(x, w1)).square() @ w2

    def fused(x, w1, w2):
        return train_gpt.ReluSquaredMLP.apply(x, w1, w2)
    return (x, w1, w2), plain, fused, 1.0


def mlp_fp8_case(args, device):
    g = torch.Generator(device=device).manual_seed(4)
    x = train_gpt.rms_norm(torch.randn(args.tokens, args.dim, device=device, generator=g)).bfloat16().requires_grad_()
    w1, w2 = ((torch.randn(args.hidden, args.dim, device=device, generator=g) / args.dim ** 0.5).bfloat16()
              .requires_grad_() for _ in range(2))
    x_scale = train_gpt.normed_e4m3_scale(args.dim)

    def bf16(x, w1, w2):
        return train_gpt.ReluSquaredMLP.apply(x, w1, w2)

    def fp8(x, w1, w2):
        return train_gpt.ReluSquaredMLP.apply(x, w1, w2, x_scale)
    return (x, w1, w2), bf16, fp8, 1.0


def mlp_fp8_down_case(args, device):
    (x, w1, w2), _, fp8_up, scale = mlp_fp8_case(args, device)
    x_scale = train_gpt.normed_e4m3_scale(args.dim)

    def fp8_down(x, w1, w2):
        return train_gpt.ReluSquaredMLP.apply(x, w1, w2, x_scale, True)
    return (x, w1, w2), fp8_up, fp8_down, scale


def qkv_fp8_case(args, device):
    g = torch.Generator(device=device).manual_seed(5)
    x = train_gpt.rms_norm(torch.randn(args.tokens, args.dim, device=device, generator=g)).bfloat16().requires_grad_()
    w = (torch.randn(3 * args.dim, args.dim, device=device, generator=g) / args.dim ** 0.5).bfloat16().requires_grad_()
    x_scale = train_gpt.normed_e4m3_scale(args.dim)

    def bf16(x, w):
        return F.linear(x, w)

    def fp8(x, w):
        return train_gpt.FP8ForwardLinear.apply(x, w, x_scale)
    return (x, w), bf16, fp8, 1.0


def head_case(args, device):
    g = torch.Generator(device=device).manual_seed(1)
    x = train_gpt.rms_norm(torch.randn(args.tokens, args.dim, device=device, generator=g)).bfloat16().requires_grad_()
    w = (0.005 * torch.randn(args.vocab, args.dim, device=device, generator=g)).requires_grad_()
    tokens = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)
    prefix = torch.randint(-1, args.vocab, (args.vocab,), device=device, generator=g)
    targets = train_gpt.target_matrix(tokens, 3, prefix)
    weights = torch.tensor([1.0, 0.5, 0.25, 0.25], device=device)
    scales = (train_gpt.normed_e4m3_scale(args.dim), train_gpt.FP8_HEAD_W_MAX / train_gpt.FP8_E4M3_MAX)
    softcap = (23.0, 5.0, 7.5)
    micro_batches = 8
    grad_s = torch.tensor(train_gpt.FP8_HEAD_GRAD_SCALE / micro_batches, device=device)

    def plain(x, w):
        logits = train_gpt.FP8Linear.apply(x, w, *scales, grad_s)
        loss = train_gpt.softcap_mtp_ce if train_gpt._triton_runs_on(logits) else train_gpt.softcap_mtp_ce_reference
        return loss(logits, targets, weights, *softcap)[0].sum()

    def fused(x, w):
        return train_gpt.FP8HeadLoss.apply(x, w, targets, weights, *scales, *softcap)
    return (x, w), plain, fused, 1 / micro_batches


def dc_case(args, device):
    g = torch.Generator(device=device).manual_seed(3)
    H = 6
    q, k, v = ((torch.randn(args.tokens, H, args.dim // H, device=device, generator=g) / 4).bfloat16()
               .requires_grad_() for _ in range(3))
    w1, w2 = (torch.randn(args.tokens, H, device=device, generator=g).bfloat16().requires_grad_() for _ in range(2))
    lengths = torch.randint(200, 2000, (args.tokens // 200 + 1,), generator=torch.Generator().manual_seed(3))
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    starts = starts[starts < args.tokens]
    cu = torch.full((args.tokens + 1,), args.tokens, dtype=torch.int32)
    cu[:len(starts)] = starts.to(torch.int32)
    cu = cu.to(device)

    def plain(q, k, v, w1, w2):
        return train_gpt.local_head_mix(q, k, v, cu, w1, w2, kernel=False)

    def fused(q, k, v, w1, w2):
        return train_gpt.local_head_mix(q, k, v, cu, w1, w2, kernel=True)
    return (q, k, v, w1, w2), plain, fused, 1.0


def run_case(name, case, args, device):
    leaves, plain, fused, scale = case
    arms = {"plain": plain, "fused": fused}
    if not args.no_compile:
        arms = {arm: torch.compile(fn, fullgraph=True) for arm, fn in arms.items()}
    calls = {arm: forward_backward(fn, leaves, scale) for arm, fn in arms.items()}
    results = {arm: call() for arm, call in calls.items()}  # also compiles
    row = {"case": name}
    for arm, call in calls.items():
        row[f"{arm}_ms"] = median_ms(call, args.reps, device)
        row[f"{arm}_peak_mib"] = peak_mib(call, device)
    (out_p, grads_p), (out_f, grads_f) = results["plain"], results["fused"]
    row["output_difference"] = relative_difference(out_f, out_p)
    row["gradient_differences"] = [relative_difference(a, b) for a, b in zip(grads_f, grads_p)]
    row["speedup"] = row["plain_ms"] / row["fused_ms"]
    return row


def _configs(text: str, size: int, flag: str) -> list[tuple[int, ...]]:
    configs = [tuple(int(v) for v in c.split(",")) for c in text.split(";") if c.strip()]
    for c in configs:
        if len(c) != size:
            sys.exit(f"error: --{flag} entry {c} needs {size} numbers")
    return configs


def ce_launch_sweep(args, device):
    """softcap_mtp_ce_with_grad (the loss and its e5m2 logit gradient, as FP8HeadLoss calls it) per launch
    configuration, on bf16 logits [tokens, vocab] with four target columns; its HBM traffic (one read of the
    logits and one e5m2 write, the least a fused kernel moves) over its time, and its agreement with the first."""
    g = torch.Generator(device=device).manual_seed(3)
    z = (4 * torch.randn(args.tokens, args.vocab, device=device, generator=g)).bfloat16()
    tokens = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)
    targets = train_gpt.target_matrix(tokens, 3, torch.randint(-1, args.vocab, (args.vocab,), device=device, generator=g))
    weights = torch.tensor([1.0, 0.5, 0.25, 0.25], device=device)
    dtype = torch.float8_e5m2 if device.type == "cuda" else torch.float32
    call = lambda: train_gpt.softcap_mtp_ce_with_grad(z, targets, weights, 23.0, 5.0, 7.5, 1.0, 448.0, dtype)  # noqa: E731
    gbytes = args.tokens * args.vocab * (2 + dtype.itemsize) / 1e9
    forms = [tuple(f.split(",")) for f in args.ce_pass_math.split(";") if f.strip()] or [train_gpt.CE_PASS_MATH]
    for f in forms:
        try:
            train_gpt.ce_pass_math_indices(f)
        except ValueError as e:
            sys.exit(f"error: --ce_pass_math: {e}")
    rows, first, trainer_launch, trainer_forms = [], None, train_gpt.CE_LAUNCH, train_gpt.CE_PASS_MATH
    try:
        for config in _configs(args.ce_configs, 2, "ce_configs"):
            for form in forms:
                train_gpt.CE_LAUNCH, train_gpt.CE_PASS_MATH = config, form
                loss, dz = call()
                first = first or (loss, dz.float())
                rows.append(dict(config=config, pass_math=form, ms=median_ms(call, args.reps, device),
                                 loss_difference=relative_difference(loss, first[0]),
                                 gradient_difference=relative_difference(dz.float(), first[1])))
    finally:
        train_gpt.CE_LAUNCH, train_gpt.CE_PASS_MATH = trainer_launch, trainer_forms
    print(f"softcap_mtp_ce_with_grad at [{args.tokens}, {args.vocab}] bf16 -> {dtype}: {gbytes:.2f} GB read and "
          "written; differences against the first row")
    print("| BLOCK,warps | passes (loss, gradient) | ms | GB/s | loss diff | gradient diff |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {','.join(map(str, r['config']))} | {','.join(r['pass_math'])} | {r['ms']:.3f} | "
              f"{gbytes / r['ms'] * 1e3:.0f} | {r['loss_difference']:.1e} | {r['gradient_difference']:.1e} |")
    return rows


def transpose_sweep(args, device):
    """transpose_bytes of an e5m2 [tokens, vocab] matrix (the head's logit gradient) per tile configuration: ms and
    GB/s, and whether it equals torch's transposed copy."""
    g = torch.Generator(device=device).manual_seed(4)
    x = torch.randint(0, 256, (args.tokens, args.vocab), dtype=torch.uint8, device=device,
                      generator=g).view(torch.float8_e5m2)
    want = x.view(torch.uint8).T.contiguous()
    gbytes = 2 * x.numel() / 1e9
    rows, trainer_launch = [], train_gpt.TRANSPOSE_LAUNCH
    try:
        for config in _configs(args.transpose_configs, 3, "transpose_configs"):
            train_gpt.TRANSPOSE_LAUNCH = config
            call = lambda: train_gpt.transpose_bytes(x)  # noqa: E731
            exact = torch.equal(call().view(torch.uint8), want)
            rows.append(dict(config=config, ms=median_ms(call, args.reps, device), exact=exact))
    finally:
        train_gpt.TRANSPOSE_LAUNCH = trainer_launch
    print(f"transpose_bytes of [{args.tokens}, {args.vocab}] e5m2: {gbytes:.2f} GB read and written")
    print("| rows,columns,warps | ms | GB/s | exact |")
    print("|---|---:|---:|---|")
    for r in rows:
        print(f"| {','.join(map(str, r['config']))} | {r['ms']:.3f} | {gbytes / r['ms'] * 1e3:.0f} | {r['exact']} |")
    return rows


def mlp_tile_sweep(args, device):
    """mlp_matmul's two epilogues per tile configuration against cuBLAS's plain product of the same shape."""
    g = torch.Generator(device=device).manual_seed(2)
    x, grad = (torch.randn(args.tokens, args.dim, device=device, generator=g).bfloat16() for _ in range(2))
    w1, w2 = ((torch.randn(args.hidden, args.dim, device=device, generator=g) / args.dim ** 0.5).bfloat16()
              for _ in range(2))
    pre = (x @ w1.T).float()
    post_ref = torch.relu(pre).square()
    back_ref = (grad @ w2.T).float() * 2 * torch.relu(pre)
    post = post_ref.to(x.dtype)
    tflop = 2 * args.tokens * args.dim * args.hidden / 1e12
    cublas_ms = median_ms(lambda: x @ w1.T, args.reps, device)
    rows, trainer_config = [], train_gpt.MLP_MATMUL_CONFIG
    limit = args.shared_mem_limit
    if limit is None and device.type == "cuda":
        limit = train_gpt.gpu_properties(device.index if device.index is not None else torch.cuda.current_device())["max_shared_mem"]
    try:
        for config in _configs(args.mlp_configs, 5, "mlp_configs"):
            need = train_gpt.mlp_matmul_shared_bytes(config, x.element_size())
            if limit is not None and need > limit:  # the trainer would take the torch formula: nothing to time
                rows.append(dict(config=config, skipped=f"needs {need} bytes of shared memory, the limit is {limit}"))
                continue
            train_gpt.MLP_MATMUL_CONFIG = config
            fwd = lambda: train_gpt.mlp_matmul(x, w1, None, 0)  # noqa: E731
            bwd = lambda: train_gpt.mlp_matmul(grad, w2, post, 1)  # noqa: E731
            row = dict(config=config, forward_ms=median_ms(fwd, args.reps, device),
                       backward_ms=median_ms(bwd, args.reps, device), cublas_ms=cublas_ms,
                       forward_error=relative_difference(fwd(), post_ref), backward_error=relative_difference(bwd(), back_ref))
            rows.append(row)
    finally:
        train_gpt.MLP_MATMUL_CONFIG = trainer_config
    print(f"mlp_matmul tiles at [{args.tokens}, {args.dim}] x [{args.hidden}, {args.dim}]^T; cuBLAS's plain product: "
          f"{cublas_ms:.3f} ms, {tflop / cublas_ms * 1e3:.0f} TFLOP/s")
    print("| config | forward ms | TFLOP/s | backward ms | TFLOP/s | forward error | backward error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {','.join(map(str, r['config']))} | skipped: {r['skipped']} | | | | | |")
            continue
        print(f"| {','.join(map(str, r['config']))} | {r['forward_ms']:.3f} | {tflop / r['forward_ms'] * 1e3:.0f} | "
              f"{r['backward_ms']:.3f} | {tflop / r['backward_ms'] * 1e3:.0f} | {r['forward_error']:.1e} | "
              f"{r['backward_error']:.1e} |")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no GPU here; --device cpu runs a smoke test (times are not meaningful)")
    device = torch.device(args.device)
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}  torch {torch.__version__}  "
          f"tokens {args.tokens}  compile {not args.no_compile}")
    rows = [run_case("mlp", mlp_case(args, device), args, device),
            run_case("mlp fp8", mlp_fp8_case(args, device), args, device),
            run_case("mlp fp8 down", mlp_fp8_down_case(args, device), args, device),
            run_case("qkv fp8", qkv_fp8_case(args, device), args, device),
            run_case("head", head_case(args, device), args, device),
            run_case("dc", dc_case(args, device), args, device)]
    print("| case | plain ms | fused ms | speedup | plain peak MiB | fused peak MiB | output diff | gradient diffs |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:  # printed before the sweeps, so a sweep that fails does not take these numbers with it
        mib = [f"{r[k]:.0f}" if r[k] is not None else "-" for k in ("plain_peak_mib", "fused_peak_mib")]
        print(f"| {r['case']} | {r['plain_ms']:.3f} | {r['fused_ms']:.3f} | {r['speedup']:.2f}x | {mib[0]} | {mib[1]} | "
              f"{r['output_difference']:.2e} | {', '.join(f'{d:.2e}' for d in r['gradient_differences'])} |")
    sweep = mlp_tile_sweep(args, device) if args.mlp_configs else []
    ce_sweep = ce_launch_sweep(args, device) if args.ce_configs else []
    transposes = transpose_sweep(args, device) if args.transpose_configs else []
    if args.json:
        Path(args.json).write_text(json.dumps(dict(cases=rows, mlp_tiles=sweep, ce_launch=ce_sweep,
                                                   transpose=transposes), indent=1))
    return rows, sweep, ce_sweep, transposes


if __name__ == "__main__":
    main()
