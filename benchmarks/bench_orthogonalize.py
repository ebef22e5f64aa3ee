"""Time and check the orthogonalizers of train_gpt.py on one GPU (H100 target), bf16.

Shapes are the 124M model's stacked Muon parameters: [48, 768, 768] (q, k, v, o of 12 layers) and
[24, 3072, 768] (MLP in [3072, 768] and out [768, 3072] of 12 layers: the trainer keeps them as two
groups, but orthogonalize transposes the tall one, so the work is the same), plus each rank's chunk for world
sizes 2 and 8.

    python benchmarks/bench_orthogonalize.py                 # timings, markdown table last
    python benchmarks/bench_orthogonalize.py --json out.json # also save every number
    python benchmarks/bench_orthogonalize.py --check         # Triton vs torch accuracy; exit 1 on mismatch
    python benchmarks/bench_orthogonalize.py --sweep         # time candidate block configs per line kernel
    python benchmarks/bench_orthogonalize.py --accuracy      # polar error and singular-value band per
        # method and input kind: bf16 on a GPU, float32 on CPU (no GPU needed); --capture=PATH adds
        # the stacks saved by tools/capture_momentum.py to the committed fixture

Timing: "ms" is triton.testing.do_bench's median over eager calls (warm-up 25 ms, 100 ms of
repeats); "graph ms" replays a CUDA graph of the call (GPU time alone); "host ms" is the CPU time
to enqueue one call. Where host ms >= ms the eager number measures Python and launch overhead.

FLOP convention: "useful" FLOPs are those of the dense products an iteration needs,
2*M*M*K (A = X X^T) + 2*M*M*M (A A^T) + 2*M*M*K (B X) with M = min(m, n), K = max(m, n), for
every backend. The symmetric Triton kernels execute about half of the first two, so their
achieved TFLOP/s (useful FLOPs / time) may exceed what the tensor cores execute. Turbo-Muon does
4 iterations (its AOL Gram matrix is the first one's line 1), NS5 and Polar Express 5.

Accuracy (--accuracy): polar error ||O - UV^T||_F / ||UV^T||_F against a float64 SVD polar factor,
and the band [1st percentile, max] of O's singular values (over the nonzero part of the input's
spectrum), on (a) momentum captured from 124M training steps (tests/data/momentum_124m.npz),
(b) Gaussian stacks, (c) ill-conditioned (singular values log-spaced over 1..1e-3, random singular
vectors) and (d) low-rank input (rank min(m, n) / 4, singular values in [0.1, 1]), at the shapes Muon
orthogonalizes: Q and K per head pair [256, 768], V and O [768, 768], MLP [3072, 768].
"""
import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/, also when loaded by path (tests)
from proxy_speedrun import PEAK_MATMUL_N, measure_peak_tflops

import train_gpt  # (the sweep patches its _ns_config)
from train_gpt import (
    ORTHO_METHODS,
    ns_line_1,
    ns_line_1_torch,
    ns_line_2,
    ns_line_2_torch,
    ns_line_3,
    ns_line_3_torch,
    orthogonalize,
    polar_factor_fp64,
)

FULL_SHAPES = {"attn": (48, 768, 768), "mlp": (24, 3072, 768)}
WORLD_SIZES = (1, 2, 8)
ITERATIONS = {"newton_schulz5": 5, "polar_express": 5, "turbo_muon": 4}
# (label, method, backend); "torch polar_express" and "triton polar_express" are the speedup
# baselines; "plain" is an independent plain-torch Polar Express (see plain_torch_polar_express)
VARIANTS = [
    ("plain torch polar_express", "polar_express", "plain"),
    ("torch newton_schulz5", "newton_schulz5", "torch"),
    ("torch polar_express", "polar_express", "torch"),
    ("triton newton_schulz5", "newton_schulz5", "triton"),
    ("triton polar_express", "polar_express", "triton"),
    ("triton turbo_muon", "turbo_muon", "triton"),
]
ERROR_SAMPLE = 4  # matrices of each stack compared with the fp64 SVD polar factor
FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "momentum_124m.npz")


def shapes():
    """(name, [B, m, n]) for the full stacks and each rank's chunk (B / world_size matrices)."""
    out = []
    for ws in WORLD_SIZES:
        for name, (b, m, n) in FULL_SHAPES.items():
            out.append((f"{name} ws{ws}", (b // ws, m, n)))
    return out


def plain_torch_polar_express(G):
    """Independent baseline in the style of modded-nanogpt's reference: normalize X, then
    A = X X^T, B = b A + c A A, X = a X + B X with plain torch ops, bf16."""
    X = G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * train_gpt.PE_SAFETY + train_gpt.PE_EPS)
    for a, b, c in train_gpt.POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if G.size(-2) > G.size(-1) else X


def run_variant(G, method, backend):
    return plain_torch_polar_express(G) if backend == "plain" else orthogonalize(G, method, backend)


def graph_ms(fn):
    """Median GPU time of CUDA-graph replays of fn: launch and Python overhead removed."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001  (capture can fail on some stacks in many ways; report rather than stop)
        print(f"  graph capture failed: {type(e).__name__}: {e}")
        return float("nan")


def host_ms(fn, calls=20):
    """CPU time to enqueue one call (no synchronization inside): at or above the GPU time, the
    variant is bound by Python and launch overhead, not by the GPU."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * elapsed / calls


def launch_overhead_us():
    """Host microseconds per call on a tiny problem [1, 256, 256], where the GPU finishes first."""
    X = torch.randn(1, 256, 256, device="cuda", dtype=torch.bfloat16)
    s = torch.rand(1, 256, device="cuda")
    calls = {
        "ns_line_1": lambda: ns_line_1(X),
        "ns_line_1 rowsum": lambda: ns_line_1(X, rowsum_abs=True),
        "ns_line_2": lambda: ns_line_2(X, 1.0, 1.0),
        "ns_line_3": lambda: ns_line_3(X, X, 1.0),
        "ns_line_3 row-scaled": lambda: ns_line_3(X, X, 1.0, s),
        "torch.baddbmm": lambda: torch.baddbmm(X, X, X),
    }
    return {name: 1e3 * host_ms(fn, calls=200) for name, fn in calls.items()}


def useful_flops(method, b, m, n):
    M, K = min(m, n), max(m, n)
    per_iteration = 2 * M * M * K + 2 * M * M * M + 2 * M * M * K
    return b * ITERATIONS[method] * per_iteration


def bench_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def polar_error(O, P):
    """||O - UV^T||_F / ||UV^T||_F over the first ERROR_SAMPLE matrices, P = polar_factor_fp64(G[:ERROR_SAMPLE])."""
    return ((O[:ERROR_SAMPLE].double() - P).norm() / P.norm()).item()


def run_timings(peak):
    rows = []
    for shape_name, (b, m, n) in shapes():
        G = torch.randn(b, m, n, device="cuda", dtype=torch.bfloat16)
        P = polar_factor_fp64(G[:ERROR_SAMPLE])
        base = {}
        for label, method, backend in VARIANTS:
            fn = functools.partial(run_variant, G, method, backend)
            ms = bench_ms(fn)
            flops = useful_flops(method, b, m, n)
            tflops = flops / ms / 1e9
            row = {"shape": shape_name, "B": b, "m": m, "n": n, "variant": label, "ms": ms, "host_ms": host_ms(fn),
                   "graph_ms": graph_ms(fn), "gflop": flops / 1e9, "tflops": tflops, "frac_peak": tflops / peak,
                   "polar_error": polar_error(fn(), P)}
            base.setdefault(label, ms)
            rows.append(row)
        for row in rows[-len(VARIANTS):]:
            row["speedup_vs_torch_pe"] = base["torch polar_express"] / row["ms"]
            row["speedup_vs_triton_pe"] = base["triton polar_express"] / row["ms"]
    return rows


def markdown(rows, peak):
    lines = [f"bf16 matmul peak ({PEAK_MATMUL_N}^3, median): {peak:.0f} TFLOP/s; useful dense-equivalent FLOPs (see docstring);",
             "ms: do_bench median of eager calls; graph ms: CUDA-graph replay (GPU time only); host ms: CPU time to",
             "enqueue one call. TFLOP/s, % peak and speedups use ms.",
             "",
             "| shape | B x m x n | variant | ms | graph ms | host ms | GFLOP | TFLOP/s | % peak | polar err | vs torch PE | vs triton PE |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['B']}x{r['m']}x{r['n']} | {r['variant']} | {r['ms']:.3f} | {r['graph_ms']:.3f} | "
                     f"{r['host_ms']:.3f} | {r['gflop']:.1f} | "
                     f"{r['tflops']:.0f} | {100 * r['frac_peak']:.0f} | {r['polar_error']:.4f} | "
                     f"{r['speedup_vs_torch_pe']:.2f}x | {r['speedup_vs_triton_pe']:.2f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --check


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _poison_allocator(nbytes):
    """Fill and free a block so that outputs which reuse it start as NaN: unwritten elements show."""
    torch.full((nbytes // 4 + 1,), float("nan"), device="cuda", dtype=torch.float32)


# A bf16 result carries a relative rounding error near 2^-9 per element, so both paths land near
# 1e-3 from fp64; Triton must be no worse than torch's own bf16 matmul by more than half again,
# plus 1e-3 for outputs the two round differently (Triton's row sums come from the fp32 tile).
def _kernel_ok(err, err_torch):
    return math.isfinite(err) and err <= 1.5 * err_torch + 1e-3


def run_check():
    failures = []
    results = []

    def record(name, err, err_torch, ok):
        results.append({"check": name, "err_triton": err, "err_torch": err_torch, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {name:58s} triton {err:.2e}  torch {err_torch:.2e}")
        if not ok:
            failures.append(name)

    for shape_name, (b, m, n) in shapes():
        G = torch.randn(b, m, n, device="cuda", dtype=torch.bfloat16)
        P = polar_factor_fp64(G[:ERROR_SAMPLE])
        X = G.mT if m > n else G  # the orientation orthogonalize iterates on (a strided view when tall)
        M, K = X.shape[-2:]
        X = X / (K**0.5)

        _poison_allocator(b * M * max(M, K) * 2)
        C, r = ns_line_1(X, rowsum_abs=True)
        C_t, r_t = ns_line_1_torch(X, rowsum_abs=True)
        C64, r64 = ns_line_1_torch(X.double(), rowsum_abs=True)
        record(f"{shape_name} ns_line_1 C", _rel(C, C64), _rel(C_t, C64), _kernel_ok(_rel(C, C64), _rel(C_t, C64)))
        record(f"{shape_name} ns_line_1 rowsum", _rel(r, r64), _rel(r_t, r64), _kernel_ok(_rel(r, r64), _rel(r_t, r64)))
        same = torch.equal(ns_line_1(X, rowsum_abs=True)[1], r)
        record(f"{shape_name} ns_line_1 deterministic", 0.0 if same else 1.0, 0.0, same)

        A = C_t  # symmetric bf16 Gram matrix, entries O(1)
        _poison_allocator(b * M * M * 2)
        C2 = ns_line_2(A, 2.0315, -4.7750)
        ref2 = ns_line_2_torch(A.double(), 2.0315, -4.7750)
        e2, e2_t = _rel(C2, ref2), _rel(ns_line_2_torch(A, 2.0315, -4.7750), ref2)
        record(f"{shape_name} ns_line_2", e2, e2_t, _kernel_ok(e2, e2_t))

        s = torch.rand(b, M, device="cuda") + 0.5  # a row scale as the first iteration uses
        _poison_allocator(b * M * M * 2)
        C2 = ns_line_2(A, 2.0315, -4.7750, s)
        ref2 = ns_line_2_torch(A.double(), 2.0315, -4.7750, s.double())
        e2, e2_t = _rel(C2, ref2), _rel(ns_line_2_torch(A, 2.0315, -4.7750, s), ref2)
        record(f"{shape_name} ns_line_2 row-scaled", e2, e2_t, _kernel_ok(e2, e2_t))

        B = ns_line_2_torch(A, 2.0315, -4.7750)
        for scale in (None, s):
            _poison_allocator(b * M * K * 2)
            C3 = ns_line_3(B, X, 3.4445, scale)
            ref3 = ns_line_3_torch(B.double(), X.double(), 3.4445, None if scale is None else scale.double())
            e3, e3_t = _rel(C3, ref3), _rel(ns_line_3_torch(B, X, 3.4445, scale), ref3)
            record(f"{shape_name} ns_line_3{'' if scale is None else ' row-scaled'}", e3, e3_t, _kernel_ok(e3, e3_t))

        # Whole path: bf16 rounding in every iteration makes the two results differ by ~1e-2, far
        # below their distance to the polar factor; Triton's polar error may exceed torch's by 5%.
        for method in ORTHO_METHODS:
            O = orthogonalize(G, method, "triton")
            O_t = orthogonalize(G, method, "torch")
            err, err_t = polar_error(O, P), polar_error(O_t, P)
            ok = bool(torch.isfinite(O).all()) and err <= 1.05 * err_t + 2e-3 and _rel(O, O_t.double()) < 5e-2
            record(f"{shape_name} orthogonalize {method}", err, err_t, ok)
    return results, failures


# ----------------------------------------------------------------------------- --accuracy

ACCURACY_SHAPES = {"qk pair": (256, 768), "v/o": (768, 768), "mlp": (3072, 768)}
ACCURACY_BATCH = 4  # matrices per generated stack
ACCURACY_KINDS = ("captured", "gaussian", "ill_conditioned", "low_rank")
# Turbo-Muon's 4 AOL tuples in microsoft/dion (dion/newton_schulz_triton.py, newton_schulz_triton_fast;
# found there by a genetic search, github thib-s/flash-newton-schulz), compared under this file's AOL
# scale (dion's own has no 1.02 safety factor).
DION_AOL_COEFFS = ((4.6051, -9.6552, 5.6769), (4.7505, -6.0861, 2.1790), (2.7763, -2.3190, 0.5523),
                   (2.4231, -2.2861, 0.8193))
# label -> (method, coefficients replacing the method's own; None: its own)
ACCURACY_METHODS = {
    "newton_schulz5": ("newton_schulz5", None),
    "polar_express": ("polar_express", None),
    "turbo_muon (fitted)": ("turbo_muon", None),
    "turbo_muon, PE tuples 2..5": ("turbo_muon", train_gpt.POLAR_EXPRESS_COEFFS[1:]),
    "turbo_muon, dion tuples": ("turbo_muon", DION_AOL_COEFFS),
}


def spectrum_matrix(kind, shape, seed=0):
    """float64 test input [..., m, n]: "gaussian"; "ill_conditioned" (singular values log-spaced
    over 1..1e-3); "low_rank" (rank k // 4, k = min(m, n), singular values linear over 1..0.1);
    the last two with Haar-like random singular vectors from QR of Gaussians."""
    *batch, m, n = shape
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(*shape, dtype=torch.float64, generator=g)
    k = min(m, n)
    if kind == "ill_conditioned":
        sigma = torch.logspace(0, -3, k, dtype=torch.float64)
    elif kind == "low_rank":
        sigma = torch.linspace(1, 0.1, k // 4, dtype=torch.float64)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    U, _ = torch.linalg.qr(torch.randn(*batch, m, sigma.numel(), dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, sigma.numel(), dtype=torch.float64, generator=g))
    return (U * sigma) @ V.mT


def captured_stacks(capture=None):
    """name -> float32 [B, m, n]: the committed fixture (one 124M layer's Q and K head-pair blocks,
    V and O), and with `capture` (a tools/capture_momentum.py output) the first ACCURACY_BATCH
    matrices of each of its stacks."""
    data = np.load(FIXTURE)
    stacks = {"captured qk pair": torch.from_numpy(np.stack([data["q_pair"], data["k_pair"]])).float(),
              "captured v/o": torch.from_numpy(np.stack([data["v"], data["o"]])).float()}
    if capture:
        for name, stack in torch.load(capture)["blocks"].items():
            stacks[f"capture {name}"] = stack[:ACCURACY_BATCH].float()
    return stacks


def accuracy_inputs(capture=None):
    """(kind, name, [B, m, n]) for every row of the accuracy table: float32 captured stacks, float64
    generated ones (the polar factor is taken before rounding, so a low-rank input keeps its rank)."""
    out = [("captured", name, G) for name, G in captured_stacks(capture).items()]
    for kind in ACCURACY_KINDS[1:]:
        for i, (name, (m, n)) in enumerate(ACCURACY_SHAPES.items()):
            out.append((kind, f"{kind} {name}", spectrum_matrix(kind, (ACCURACY_BATCH, m, n), seed=i)))
    return out


def polar_error_and_band(O, G, P=None):
    """(relative polar error, 1st percentile and max of O's singular values) against G's float64
    polar factor P (computed if not given). The band counts the top rank(P) singular values of each
    matrix: a rank-deficient input's null space is expected to stay null."""
    P = polar_factor_fp64(G) if P is None else P
    O = O.double()
    err = ((O - P).norm() / P.norm()).item()
    rank = torch.linalg.matrix_rank(P)
    sv = torch.linalg.svdvals(O)
    kept = torch.cat([s[:r] for s, r in zip(sv.reshape(-1, sv.size(-1)), rank.reshape(-1).tolist())])
    return err, torch.quantile(kept, 0.01).item(), kept.max().item()


def _time_ms(fn, cuda):
    if cuda:
        return bench_ms(fn)
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def run_accuracy(capture=None, methods=None):
    """One row per (input, method): polar error, band, GFLOP and ms per call. On a GPU the inputs
    are bf16 and the default backend (Triton) runs; on CPU float32 and the torch backend."""
    cuda = torch.cuda.is_available()
    methods = methods or ACCURACY_METHODS
    rows = []
    for kind, name, G in accuracy_inputs(capture):
        P = polar_factor_fp64(G)
        Gd = G.cuda().bfloat16() if cuda else G.float()
        b, m, n = G.shape
        for label, (method, coeffs) in methods.items():
            fn = functools.partial(orthogonalize, Gd, method, coeffs=coeffs)
            err, lo, hi = polar_error_and_band(fn().cpu(), G, P)
            steps = len(coeffs) if coeffs is not None else ITERATIONS[method]
            M, K = min(m, n), max(m, n)
            gflop = b * steps * (4 * M * M * K + 2 * M**3) / 1e9
            rows.append({"kind": kind, "input": name, "B": b, "m": m, "n": n, "method": label, "polar_error": err,
                         "band_p1": lo, "band_max": hi, "gflop": gflop, "ms": _time_ms(fn, cuda)})
            print(f"{name:28s} {label:22s} err {err:.4f} band [{lo:.3f}, {hi:.3f}] {rows[-1]['ms']:.1f} ms", flush=True)
    return rows


def accuracy_markdown(rows):
    dtype = "bf16 (GPU, default backend)" if torch.cuda.is_available() else "float32 (CPU, torch backend)"
    lines = [f"{dtype}; polar error vs float64 SVD; band = [1st percentile, max] of output singular values",
             "", "| input | B x m x n | method | polar error | band | GFLOP | ms per call |", "|---|---|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['input']} | {r['B']}x{r['m']}x{r['n']} | {r['method']} | {r['polar_error']:.4f} | "
                     f"[{r['band_p1']:.3f}, {r['band_max']:.3f}] | {r['gflop']:.1f} | {r['ms']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --sweep

SWEEP_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); sym kernels ignore BLOCK_N
    (64, 64, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (64, 64, 128, 4, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (128, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3),
]


def run_sweep():
    """Time each line kernel (and its torch reference) on every shape under each candidate config."""
    original = train_gpt._ns_config
    rows = []
    try:
        for shape_name, (b, m, n) in shapes():
            X = torch.randn(b, min(m, n), max(m, n), device="cuda", dtype=torch.bfloat16) / max(m, n) ** 0.5
            A = ns_line_1_torch(X)
            B = ns_line_2_torch(A, 2.0315, -4.7750)
            s = torch.rand(b, X.shape[1], device="cuda") + 0.5
            args = {
                "line_1+rowsum": (X, True),
                "line_1": (X, False),
                "line_2": (A, 2.0315, -4.7750),
                "line_2+scale": (A, 2.0315, -4.7750, s),
                "line_3": (B, X, 3.4445),
                "line_3+scale": (B, X, 3.4445, s),
            }
            kernels = {1: ns_line_1, 2: ns_line_2, 3: ns_line_3}
            references = {1: ns_line_1_torch, 2: ns_line_2_torch, 3: ns_line_3_torch}
            for op_name, op_args in args.items():
                line = int(op_name[5])
                fn = functools.partial(kernels[line], *op_args)
                reference_ms = bench_ms(functools.partial(references[line], *op_args))
                timings = {}
                for cfg in SWEEP_CONFIGS:
                    if line != 3 and cfg[1] != cfg[0]:
                        continue  # symmetric tiles are square: BLOCK_N is not used
                    train_gpt._ns_config = lambda *shape, cfg=cfg, **kind: cfg
                    try:
                        timings[cfg] = bench_ms(fn)
                    except Exception as e:  # noqa: BLE001  (any failing config, e.g. out of shared memory, is skipped)
                        print(f"  {shape_name} {op_name} {cfg}: {type(e).__name__}")
                    finally:
                        train_gpt._ns_config = original
                default_ms = bench_ms(fn)
                best = min(timings, key=timings.get)
                rows.append({"shape": shape_name, "op": op_name, "torch_ms": reference_ms, "default_ms": default_ms,
                             "best_cfg": list(best), "best_ms": timings[best],
                             "all": {str(k): v for k, v in timings.items()}})
                print(f"{shape_name:10s} {op_name:14s} torch {reference_ms:.3f} ms  default {default_ms:.3f} ms  "
                      f"best {timings[best]:.3f} ms {best}")
    finally:
        train_gpt._ns_config = original
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write all results to this JSON file")
    parser.add_argument("--check", action="store_true", help="compare Triton kernels with torch in bf16; exit 1 on mismatch")
    parser.add_argument("--sweep", action="store_true", help="time candidate block configs for each line kernel")
    parser.add_argument("--accuracy", action="store_true",
                        help="polar error and band table (bf16 on a GPU, float32 on CPU); runs without a GPU")
    parser.add_argument("--capture", metavar="PATH", help="with --accuracy: add the stacks of a tools/capture_momentum.py file")
    args = parser.parse_args()
    if args.accuracy:
        out = {"accuracy": run_accuracy(args.capture)}
        print(accuracy_markdown(out["accuracy"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        sys.exit(0)
    if not torch.cuda.is_available():
        sys.exit("bench_orthogonalize needs a CUDA GPU (except --accuracy)")
    import triton

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}")
    out = {"info": info}
    status = 0
    if args.check:
        out["check"], failures = run_check()
        print(f"check: {len(out['check']) - len(failures)} ok, {len(failures)} failed")
        status = 1 if failures else 0
    elif args.sweep:
        out["sweep"] = run_sweep()
    else:
        out["launch_overhead_us"] = launch_overhead_us()
        print("host us per call: " + ", ".join(f"{k} {v:.1f}" for k, v in out["launch_overhead_us"].items()))
        peak = measure_peak_tflops()
        out["peak_tflops"] = peak
        out["timings"] = run_timings(peak)
        print(markdown(out["timings"], peak))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    sys.exit(status)


if __name__ == "__main__":
    main()
