"""Kernels and Orthogonalization sections of the trainer, kept as a standalone module.

The two banner sections below are pasted verbatim into train_gpt.py. Besides torch (imported by
the trainer's header) they need only triton, which the Kernels section imports itself, optionally.
Nothing runs at import.
"""
import torch

# -----------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction as _TritonInterpretedFunction

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch backend still works
    HAS_TRITON = False

# The three matrix lines of one Newton-Schulz / Polar Express iteration on X [B, M, K], M <= K:
#   line 1  A = X X^T                     (symmetric Gram matrix, [B, M, M])
#   line 2  B = b A + c A A^T             (ns_line_2(A, alpha=c, beta=b); A symmetric)
#   line 3  X = a X + B X                 (ns_line_3(B, X, a))
# Lines 2 and 3 take an optional row scale s [B, M]: they then act on X1 = diag(s) X and
# A1 = diag(s) A diag(s) = X1 X1^T without materializing either. That is how the first iteration
# applies the Frobenius normalization (s uniform) or Turbo-Muon's AOL scaling: no extra pass over
# X or A (on an H100 a torch elementwise pass for AOL cost 0.4 ms of a 1.5 ms orthogonalize).
# Names follow the Turbo-Muon PR (modded-nanogpt, seed 003) and microsoft/dion
# `dion/newton_schulz_triton.py`. Each Triton launcher has a plain-torch reference with the same
# signature (`*_torch`); both validate inputs through the same `_check_line_*` helpers, so tests
# and `orthogonalize` can swap one set of line ops for the other.

_LINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels accept


def _check_line_1(X):
    """X [B, M, K] floating, non-empty; returns (B, M, K)."""
    if not isinstance(X, torch.Tensor) or X.ndim != 3:
        raise ValueError(f"expected X of shape [B, M, K], got {getattr(X, 'shape', type(X))}")
    if not X.is_floating_point():
        raise ValueError(f"expected a floating dtype, got {X.dtype}")
    if X.numel() == 0:
        raise ValueError(f"empty input of shape {tuple(X.shape)}")
    return tuple(X.shape)


def _check_scale(scale, batch, M, device):
    if scale is not None and (not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (batch, M)
                              or not scale.is_floating_point() or scale.device != device):
        raise ValueError(f"expected a floating row scale of shape {(batch, M)} on {device}, "
                         f"got {getattr(scale, 'shape', type(scale))}")


def _check_line_2(A, scale=None):
    """A [B, M, M] floating, non-empty (symmetry is a documented precondition, not checked)."""
    batch, M, N = _check_line_1(A)
    if M != N:
        raise ValueError(f"expected a square (symmetric) A [B, M, M], got {tuple(A.shape)}")
    _check_scale(scale, batch, M, A.device)
    return batch, M


def _check_line_3(B, X, scale=None):
    """B [Bt, M, M] and X [Bt, M, K], same dtype and device; returns (Bt, M, K)."""
    batch, M, K = _check_line_1(X)
    if not isinstance(B, torch.Tensor) or tuple(B.shape) != (batch, M, M):
        raise ValueError(f"expected B of shape {(batch, M, M)} for X {tuple(X.shape)}, got {getattr(B, 'shape', type(B))}")
    if B.dtype != X.dtype or B.device != X.device:
        raise ValueError(f"B ({B.dtype}, {B.device}) and X ({X.dtype}, {X.device}) must match")
    _check_scale(scale, batch, M, X.device)
    return batch, M, K


def _rowsum_dtype(dtype):
    """Row sums and norms accumulate in fp32 (fp64 for fp64 math)."""
    return torch.promote_types(dtype, torch.float32)


def ns_line_1_torch(X, rowsum_abs=False):
    """Reference for `ns_line_1`: C = X X^T, X [B, M, K] -> C [B, M, M] in X's dtype.

    With rowsum_abs=True also returns r [B, M], r[b, i] = sum_j |C[b, i, j]| in fp32 (fp64 for
    fp64 input), summed from the stored C.
    """
    _check_line_1(X)
    C = torch.bmm(X, X.mT)
    if not rowsum_abs:
        return C
    return C, C.abs().sum(dim=-1, dtype=_rowsum_dtype(C.dtype))


def ns_line_2_torch(A, alpha, beta, scale=None):
    """Reference for `ns_line_2`: C = alpha A1 A1^T + beta A1 for symmetric A [B, M, M], with
    A1 = diag(scale) A diag(scale) (scale [B, M]) or A1 = A; C in A's dtype."""
    _check_line_2(A, scale)
    if scale is not None:
        A = (A * scale.unsqueeze(-1) * scale.unsqueeze(-2)).to(A.dtype)
    return torch.baddbmm(A, A, A.mT, beta=beta, alpha=alpha)


def ns_line_3_torch(B, X, a, scale=None):
    """Reference for `ns_line_3`: C = a X1 + B X1, B [Bt, M, M], X [Bt, M, K] -> C [Bt, M, K], with
    X1 = diag(scale) X (scale [Bt, M]) or X1 = X; C in X's dtype."""
    _check_line_3(B, X, scale)
    if scale is not None:
        X = (X * scale.unsqueeze(-1)).to(X.dtype)
    return torch.baddbmm(X, B, X, beta=a, alpha=1.0)


# H100 launch configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), measured with
# `benchmarks/bench_orthogonalize.py --sweep` (torch 2.11, triton 3.6, bf16, 10 candidates) on the
# 124M model's stacks [48, 768, 768] and [24, 768, 3072] and their per-rank chunks for 2 and 8 GPUs:
# - 128x128x64, 4 warps, 3 stages was fastest or within 5% of the fastest for every line and shape
#   (8 warps cost 10-25% once the fused row sums, the beta term or a row scale add epilogue or
#   in-loop work; 64-wide tiles cost 20-60% on the full stacks);
# - except for the symmetric kernels (lines 1, 2) when their lower-triangle tiles over all matrices
#   number at most half the 132 SMs (e.g. [3, 768, 3072]: 63 programs): 64x64x128 tiles, with 4x
#   the programs, were 25-30% faster there.
# min(M, K) < 256 does not occur in the 124M model; 64-wide tiles there are a guess.
_H100_SMS = 132
_NS_CONFIG = (128, 128, 64, 4, 3)
_NS_CONFIG_SYM_FEW_TILES = (64, 64, 128, 4, 3)
_NS_CONFIG_SMALL = (64, 64, 64, 4, 4)
# Under TRITON_INTERPRET=1 every program runs in numpy; 32-wide tiles keep CPU tests fast while
# still exercising multi-tile grids and the edge masks (tl.dot needs tiles of at least 16).
_NS_CONFIG_INTERPRET = (32, 32, 32, 4, 1)


def _kernels_interpreted():
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU)."""
    return HAS_TRITON and isinstance(_ns_sym_kernel, _TritonInterpretedFunction)


def _ns_config(M, K, batch=1, symmetric=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a line kernel with M output rows and
    other extent K (line 1: X [M, K]; line 2: A [M, M]; line 3: output [M, K]) on `batch` matrices;
    `symmetric` selects the lines 1/2 kernel."""
    if _kernels_interpreted():
        return _NS_CONFIG_INTERPRET
    if min(M, K) < 256:
        return _NS_CONFIG_SMALL
    tiles = -(-M // _NS_CONFIG[0])
    if symmetric and batch * tiles * (tiles + 1) // 2 <= _H100_SMS // 2:
        return _NS_CONFIG_SYM_FEW_TILES
    return _NS_CONFIG


def _dot_precision(dtype):
    """fp32 operands multiply in full fp32 ("ieee"; tl.dot would default to tf32, torch does not);
    for bf16/fp16 operands the setting is moot and the default is kept."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_triton_launch(*tensors):
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use the torch backend (ns_line_*_torch)")
    for t in tensors:
        if t.dtype not in _LINE_DTYPES:
            raise ValueError(f"Triton line kernels take {_LINE_DTYPES}, got {t.dtype}")
        if not (t.is_cuda or _kernels_interpreted()):
            raise ValueError("Triton line kernels need CUDA tensors (or kernels built under TRITON_INTERPRET=1)")


if HAS_TRITON:

    @triton.jit
    def _lower_tile(pid):
        """Map a linear index to the tile (row, col), col <= row, of a lower triangle walked row by row."""
        row = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
        # fp32 sqrt may land one off near perfect squares; fix with exact integer tests
        row = tl.where(row * (row + 1) // 2 > pid, row - 1, row)
        row = tl.where((row + 1) * (row + 2) // 2 <= pid, row + 1, row)
        return row, pid - row * (row + 1) // 2

    @triton.jit
    def _ns_sym_kernel(
        X, C, P, S, M, K, alpha, beta,
        stride_xb, stride_xm, stride_xk,
        stride_cb, stride_cm, stride_cn,
        stride_pb, stride_pt, stride_pm,
        stride_sb, stride_sm,
        ADD_X: tl.constexpr, ROWSUM: tl.constexpr, SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Symmetric product C = alpha X1 X1^T (+ beta X1 if ADD_X): lines 1 and 2 of an iteration.

        X1 = diag(s) X diag(s) if SCALE (S [B, M], needs K == M), else X1 = X. Computed as
        C_ij = s_i s_j (alpha sum_k X_ik s_k^2 X_jk + beta X_ij): s_k^2 scales one dot operand in
        registers, s_i s_j the fp32 tile.
        Shapes: X [B, M, K] (any strides), C [B, M, M], P [B, cdiv(M, BLOCK_M), M] fp32.
        Dtypes: X and C fp32/bf16/fp16, accumulation in fp32, C stored in its own dtype.
        Grid: (T (T + 1) / 2, B) with T = cdiv(M, BLOCK_M); program (t, b) computes the lower tile
        (i, j), j <= i, of matrix b and stores it at (i, j) and, transposed, at (j, i): half the
        FLOPs of a dense product. Diagonal tiles are stored once (their two triangles come from
        the same dot, so C is symmetric up to the rounding of that dot).
        Preconditions: ADD_X requires K == M and X symmetric (then X[j, i] tile == X[i, j]^T).
        ROWSUM: P[b, j, rows of block i] = row sums of |tile (i, j)| and P[b, i, rows of block j] =
        its column sums; every slot is written exactly once, so r = P.sum(1) is deterministic.
        """
        pid_m, pid_n = _lower_tile(tl.program_id(0))
        pid_b = tl.program_id(1).to(tl.int64)  # int64: B * M * K may exceed 2^31
        X += pid_b * stride_xb
        C += pid_b * stride_cb
        S += pid_b * stride_sb

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < M
        a_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK] rows i
        b_ptrs = X + offs_k[:, None] * stride_xk + offs_n[None, :] * stride_xm  # [BK, BM] rows j, transposed
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if SCALE:
                s_k = tl.load(S + (k0 + offs_k) * stride_sm, mask=mask_k, other=0.0)
                a = (a.to(tl.float32) * (s_k * s_k)[None, :]).to(a.dtype)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_xk
            b_ptrs += BLOCK_K * stride_xk
        acc = acc * alpha
        mask_mn = mask_m[:, None] & mask_n[None, :]
        if ADD_X:
            x_ptrs = X + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xk
            acc += beta * tl.load(x_ptrs, mask=mask_mn, other=0.0).to(tl.float32)
        if SCALE:
            s_m = tl.load(S + offs_m * stride_sm, mask=mask_m, other=0.0)
            s_n = tl.load(S + offs_n * stride_sm, mask=mask_n, other=0.0)
            acc = acc * s_m[:, None] * s_n[None, :]

        out = acc.to(C.dtype.element_ty)
        tl.store(C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, out, mask=mask_mn)
        if pid_m != pid_n:  # mirror: same values, row/col strides swapped
            tl.store(C + offs_m[:, None] * stride_cn + offs_n[None, :] * stride_cm, out, mask=mask_mn)
        if ROWSUM:
            P += pid_b * stride_pb
            acc_abs = tl.abs(acc)
            tl.store(P + pid_n * stride_pt + offs_m * stride_pm, tl.sum(acc_abs, axis=1), mask=mask_m)
            if pid_m != pid_n:
                tl.store(P + pid_m * stride_pt + offs_n * stride_pm, tl.sum(acc_abs, axis=0), mask=mask_n)

    @triton.jit
    def _ns_line_3_kernel(
        Bm, X, C, S, M, K, a,
        stride_bb, stride_bm, stride_bk,
        stride_xb, stride_xm, stride_xk,
        stride_cb, stride_cm, stride_ck,
        stride_sb, stride_sm,
        SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """C = a X1 + B X1 in one pass, line 3 of an iteration; X1 = diag(s) X if SCALE, else X.

        Shapes: B [Bt, M, M], X [Bt, M, K] (any strides), S [Bt, M], C [Bt, M, K].
        Dtypes: fp32/bf16/fp16 in, fp32 accumulation, C in X's dtype.
        Grid: (cdiv(M, BLOCK_M) * cdiv(K, BLOCK_N), Bt); the accumulator of output tile (i, j)
        starts at a * s_i * X[i, j] and adds (B[i, :] * s) X[:, j] over the inner dimension M
        (s scales the B operand in registers). Tiles of one matrix are consecutive program ids,
        so its B and X stay in L2 together.
        """
        pid = tl.program_id(0)
        pid_b = tl.program_id(1).to(tl.int64)
        tiles_n = tl.cdiv(K, BLOCK_N)
        pid_m = pid // tiles_n
        pid_n = pid % tiles_n
        Bm += pid_b * stride_bb
        X += pid_b * stride_xb
        C += pid_b * stride_cb
        S += pid_b * stride_sb

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < K
        mask_mn = mask_m[:, None] & mask_n[None, :]
        x_tile = tl.load(X + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xk, mask=mask_mn, other=0.0)
        acc = a * x_tile.to(tl.float32)
        if SCALE:
            acc = acc * tl.load(S + offs_m * stride_sm, mask=mask_m, other=0.0)[:, None]
        b_ptrs = Bm + offs_m[:, None] * stride_bm + offs_k[None, :] * stride_bk  # [BM, BK]
        x_ptrs = X + offs_k[:, None] * stride_xm + offs_n[None, :] * stride_xk   # [BK, BN]
        for k0 in range(0, M, BLOCK_K):
            mask_k = offs_k < M - k0
            b = tl.load(b_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if SCALE:
                s_k = tl.load(S + (k0 + offs_k) * stride_sm, mask=mask_k, other=0.0)
                b = (b.to(tl.float32) * s_k[None, :]).to(b.dtype)
            acc = tl.dot(b, x, acc, input_precision=DOT_PRECISION)
            b_ptrs += BLOCK_K * stride_bk
            x_ptrs += BLOCK_K * stride_xm
        tl.store(C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_ck, acc.to(C.dtype.element_ty), mask=mask_mn)


def _scale_args(scale, fallback):
    """(pointer, stride_b, stride_m) for an optional row scale; a broadcast (stride-0) view is fine."""
    return (fallback, 0, 0) if scale is None else (scale, scale.stride(0), scale.stride(1))


def _launch_sym(X, alpha, beta, add_x, rowsum_abs, scale):
    """Launch `_ns_sym_kernel` on X [B, M, K]; returns C or (C, r)."""
    batch, M, K = X.shape
    block_m, _, block_k, num_warps, num_stages = _ns_config(M, K, batch, symmetric=True)
    tiles = triton.cdiv(M, block_m)
    C = torch.empty((batch, M, M), device=X.device, dtype=X.dtype)
    # Row sums are fused (the kernel holds the fp32 tile anyway) but written as per-tile partials
    # instead of fp32 atomics: deterministic, and the follow-up sum reads B * T * M floats, a
    # fraction 1/BLOCK_M of what an unfused |C|.sum(-1) pass over the M x M output would read
    # (measured on an H100: +8 us on [48, 768, 768], where torch's unfused version adds 70 us).
    P = torch.empty((batch, tiles, M), device=X.device, dtype=torch.float32) if rowsum_abs else C
    s_ptr, stride_sb, stride_sm = _scale_args(scale, C)
    _ns_sym_kernel[(tiles * (tiles + 1) // 2, batch)](
        X, C, P, s_ptr, M, K, float(alpha), float(beta),
        X.stride(0), X.stride(1), X.stride(2),
        C.stride(0), C.stride(1), C.stride(2),
        P.stride(0), P.stride(1), P.stride(2),
        stride_sb, stride_sm,
        ADD_X=add_x, ROWSUM=rowsum_abs, SCALE=scale is not None, DOT_PRECISION=_dot_precision(X.dtype),
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return (C, P.sum(dim=1)) if rowsum_abs else C


def ns_line_1(X, rowsum_abs=False):
    """C = X X^T for X [B, M, K] (any strides, fp32/bf16/fp16) -> C [B, M, M] contiguous, X's dtype.

    Only the lower-triangle tiles are computed (fp32 accumulation) and each is also stored
    mirrored. With rowsum_abs=True also returns r [B, M] fp32, r[b, i] = sum_j |C[b, i, j]|, summed
    from the fp32 accumulator (the AOL row sums of Turbo-Muon). Raises ValueError on bad input.
    """
    _check_line_1(X)
    _check_triton_launch(X)
    return _launch_sym(X, 1.0, 0.0, add_x=False, rowsum_abs=rowsum_abs, scale=None)


def ns_line_2(A, alpha, beta, scale=None):
    """C = alpha A1 A1^T + beta A1 for symmetric A [B, M, M] (fp32/bf16/fp16) -> C [B, M, M], A's
    dtype, with A1 = diag(scale) A diag(scale) for a row scale [B, M] (any float dtype), else A.

    Same symmetric tiling as `ns_line_1`; the beta term reads tile (i, j) of A, which relies on A
    being symmetric (not checked: it is A = X X^T by construction in `orthogonalize`).
    """
    _check_line_2(A, scale)
    _check_triton_launch(A)
    return _launch_sym(A, alpha, beta, add_x=True, rowsum_abs=False, scale=scale)


def ns_line_3(B, X, a, scale=None):
    """C = a X1 + B X1 for B [Bt, M, M], X [Bt, M, K] (any strides, fp32/bf16/fp16) -> C [Bt, M, K],
    with X1 = diag(scale) X for a row scale [Bt, M], else X.

    One pass: each output tile's fp32 accumulator starts at a * X1 and adds B X1. C is contiguous,
    in X's dtype. Raises ValueError on mismatched shapes, dtypes or devices.
    """
    batch, M, K = _check_line_3(B, X, scale)
    _check_triton_launch(B, X)
    block_m, block_n, block_k, num_warps, num_stages = _ns_config(M, K, batch)
    C = torch.empty((batch, M, K), device=X.device, dtype=X.dtype)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(K, block_n), batch)
    s_ptr, stride_sb, stride_sm = _scale_args(scale, C)
    _ns_line_3_kernel[grid](
        B, X, C, s_ptr, M, K, float(a),
        B.stride(0), B.stride(1), B.stride(2),
        X.stride(0), X.stride(1), X.stride(2),
        C.stride(0), C.stride(1), C.stride(2),
        stride_sb, stride_sm,
        SCALE=scale is not None, DOT_PRECISION=_dot_precision(X.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return C


# -----------------------------------------------------------------------------
# Orthogonalization
# -----------------------------------------------------------------------------
# Each method replaces G = U S V^T by approximately U V^T (its polar factor) with odd matrix
# polynomials X <- a X + (b A + c A^2) X, A = X X^T, which act on the singular values only.

# Keller Jordan's quintic (github KellerJordan/Muon, muon.py), 5 steps after X / (||X||_F + 1e-7);
# maps singular values in [0.01, 1] into [0.6818, 1.1344].
NS5_COEFFS = (3.4445, -4.7750, 2.0315)
NS5_STEPS = 5
NS5_EPS = 1e-7

# Polar Express (arXiv 2505.16932, github NoahAmsel/PolarExpress):
# optimal_composition(l=1e-3, num_iters=5, safety_factor_eps=0.02, cushion=0.02); all but the last
# polynomial are divided by (1.02, 1.02^3, 1.02^5). Maps [1e-3, 1] into [0.8589, 1.1411].
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
PE_SAFETY = 1.02  # X / (||X||_F * 1.02 + 1e-6): ||X||_F bounds ||X||_2; 2% cushion (paper's safety factor)
PE_EPS = 1e-6

# Turbo-Muon (arXiv 2512.04632; seed 003, modded-nanogpt PR by thib-s): AOL preconditioning
# (arXiv 2208.03160) s_i = (sum_j |A_ij|)^(-1/2) with A = X X^T gives ||diag(s) X||_2 <= 1; the
# safety factor and eps enter as s = rsqrt(rowsum * 1.02 + 1e-6) (optimizers.md section 3; the
# 1e-6 is taken relative to the mean squared row norm, see `aol_row_scale`). AOL
# lifts small singular values, so the first Polar Express polynomial is dropped: PE5[1:] maps
# [0.0082, 1] into [0.8589, 1.1411] with 4 iterations, the first reusing A.
AOL_SAFETY = 1.02
AOL_EPS = 1e-6
TURBO_COEFFS = POLAR_EXPRESS_COEFFS[1:]

ORTHO_METHODS = ("newton_schulz5", "polar_express", "turbo_muon")
ORTHO_BACKENDS = ("auto", "torch", "triton")
_TORCH_LINES = (ns_line_1_torch, ns_line_2_torch, ns_line_3_torch)
_TRITON_LINES = (ns_line_1, ns_line_2, ns_line_3)


def polar_factor_fp64(G):
    """Float64 polar factor of G [..., m, n] by SVD: U V^T over the numerically nonzero singular values.

    Directions with s <= max(m, n) * eps_fp64 * s_max are dropped (a partial isometry), which is
    the limit Newton-Schulz iterations reach on rank-deficient input since every polynomial is odd.
    Returned in float64 on G's device.
    """
    U, S, Vh = torch.linalg.svd(G.to(torch.float64), full_matrices=False)
    tol = max(G.shape[-2:]) * torch.finfo(torch.float64).eps * S[..., :1]
    return (U * (S > tol).to(U.dtype).unsqueeze(-2)) @ Vh


def frobenius_row_scale(A, safety, eps):
    """Row scale [B, M] that divides each X by (||X||_F * safety + eps), from A = X X^T [B, M, M].

    ||X||_F^2 = trace(A), so the norm costs no pass over X. Uniform per matrix: returned as a
    broadcast (stride-0) view of B values.
    """
    norm = A.diagonal(dim1=-2, dim2=-1).sum(dim=-1, dtype=_rowsum_dtype(A.dtype)).sqrt()
    return (1.0 / (norm * safety + eps)).unsqueeze(-1).expand(A.shape[:-1])


def aol_row_scale(A, rowsum):
    """Turbo-Muon's AOL scale s [B, M] from A = X X^T and rowsum = sum_j |A_ij|: ||diag(s) X||_2 < 1.

    s = rsqrt(1.02 * rowsum + 1e-6 * mean_i A_ii + tiny). The 1e-6 is scaled by the mean squared
    row norm, which equals applying the reference formula rsqrt(1.02 * rowsum + 1e-6) to X
    normalized to unit mean row norm: AOL is scale invariant, and this keeps the eps negligible at
    any gradient magnitude (an absolute 1e-6 dominates the row sums once entries fall below about
    1e-4). The floor `tiny` keeps s finite for an all-zero X, whose output is then 0.
    """
    mean_diag = A.diagonal(dim1=-2, dim2=-1).to(rowsum.dtype).mean(dim=-1, keepdim=True)
    return torch.rsqrt(AOL_SAFETY * rowsum + AOL_EPS * mean_diag + torch.finfo(rowsum.dtype).tiny)


def _math_dtype(G):
    """bf16 on CUDA (fp32 accumulation inside the matmuls), fp32 on CPU; float64 input stays float64."""
    if G.dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if G.is_cuda else torch.float32


def _resolve_backend(backend, G):
    if backend not in ORTHO_BACKENDS:
        raise ValueError(f"backend must be one of {ORTHO_BACKENDS}, got {backend!r}")
    if backend == "auto":  # TRITON_INTERPRET alone never selects Triton: tests ask for it by name
        return "triton" if HAS_TRITON and G.is_cuda else "torch"
    return backend


def _polar_iterations(X, coeffs, lines, A, scale):
    """X <- a X1 + (b A1 + c A1 A1^T) X1 for each (a, b, c), A1 = X1 X1^T.

    The first iteration takes A = X X^T precomputed and X1 = diag(scale) X (folded into lines 2
    and 3); later ones have X1 = X and compute A1 with line 1.
    """
    line_1, line_2, line_3 = lines
    for a, b, c in coeffs:
        if A is None:
            A = line_1(X)
        X = line_3(line_2(A, c, b, scale), X, a, scale)
        A = scale = None
    return X


def orthogonalize(G, method="turbo_muon", backend="auto"):
    """Approximate polar factor U V^T of G [B, m, n] or [m, n] (G = U S V^T).

    methods: "newton_schulz5" (Keller: X / (||X||_F + 1e-7), 5 quintic steps), "polar_express"
    (X / (||X||_F * 1.02 + 1e-6), the 5 Polar Express polynomials), "turbo_muon" (AOL row scaling
    from A = X X^T, which the first iteration reuses, then Polar Express polynomials 2..5: 4
    iterations). Each normalization is a row scale applied inside the first iteration's lines 2
    and 3. Singular values land near 1, not on it (the constants above give each band).
    backend: "torch" (ns_line_*_torch), "triton" (ns_line_* kernels), "auto" (Triton iff it is
    installed and G is on CUDA); both run `_polar_iterations`.
    Math dtype: bf16 on CUDA, fp32 on CPU, fp64 for fp64 input (torch backend only); the output
    is in the math dtype with G's shape. Tall matrices (m > n) iterate on the transposed view
    ([B, n, m], so A is the smaller Gram matrix) without a copy and return a transposed view.
    """
    if not isinstance(G, torch.Tensor) or G.ndim not in (2, 3) or not G.is_floating_point():
        raise ValueError(f"expected a floating tensor [B, m, n] or [m, n], got {getattr(G, 'shape', type(G))}")
    if method not in ORTHO_METHODS:
        raise ValueError(f"method must be one of {ORTHO_METHODS}, got {method!r}")
    lines = _TRITON_LINES if _resolve_backend(backend, G) == "triton" else _TORCH_LINES

    X = (G if G.ndim == 3 else G.unsqueeze(0)).to(_math_dtype(G))  # no copy if already that dtype
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    if method == "turbo_muon":
        A, rowsum = lines[0](X, rowsum_abs=True)
        scale, coeffs = aol_row_scale(A, rowsum), TURBO_COEFFS
    elif method == "polar_express":
        A = lines[0](X)
        scale, coeffs = frobenius_row_scale(A, PE_SAFETY, PE_EPS), POLAR_EXPRESS_COEFFS
    else:
        A = lines[0](X)
        scale, coeffs = frobenius_row_scale(A, 1.0, NS5_EPS), (NS5_COEFFS,) * NS5_STEPS
    X = _polar_iterations(X, coeffs, lines, A, scale)
    if transposed:
        X = X.mT
    return X if G.ndim == 3 else X.squeeze(0)
