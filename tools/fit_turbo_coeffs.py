"""Fit Turbo-Muon's polynomial coefficients to the singular values that AOL scaling leaves.

Turbo-Muon scales X by AOL (arXiv 2208.03160), s_i = rsqrt(1.02 sum_j |(X X^T)_ij|), which bounds
||diag(s) X||_2 by 1, then iterates odd quintics. This script
  1. measures the singular-value interval of diag(s) X on captured momentum matrices
     (tools/capture_momentum.py) and on Gaussian stacks, and
  2. fits a sequence of odd quintics to an interval [l, u] with the Polar Express construction
     (arXiv 2505.16932, Algorithm 1 and its appendix code): each step is the minimax (equioscillating)
     quintic for sign(x) on [max(l, cushion * u), u], rescaled so p(l) + p(u) = 2 when the cushion
     is active; the next interval is [p(l), 2 - p(l)]; every polynomial but the last is divided by
     (safety, safety^3, safety^5), i.e. evaluated at x / safety.

    python tools/fit_turbo_coeffs.py                     # print the constants for TURBO_FIT
    python tools/fit_turbo_coeffs.py --check             # exit 1 unless train_gpt.py holds them
    python tools/fit_turbo_coeffs.py --measure .capture/momentum_small.pt [.capture/momentum_medium.pt]
    python tools/fit_turbo_coeffs.py --sweep_lo 0.0005,0.001,0.002,0.003,0.005,0.01   # fits against Polar Express

--sweep_lo fits 4 steps for each lower end and prints, with Polar Express (5 steps) for comparison, the slope
of the composition at 0 (how far it lifts the smallest singular values) and the polar error of the iteration in
float64 (polar_error) on the committed momentum fixture (tests/data/momentum_124m.npz) and on Gaussian stacks,
and last the error of the polar factor of the AOL-scaled matrix itself (aol_limit_error).

The constants and the parameters that made them sit once in train_gpt.py (TURBO_FIT, TURBO_COEFFS).
"""
import argparse
import math
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def optimal_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """Odd p(x) = a x + b x^3 + c x^5 minimizing max |1 - p(x)| over [lo, hi] (0 < lo <= hi).

    Remez exchange on the four alternation points lo < q < r < hi: solve p = 1 -/+ E there with
    alternating signs, move q and r to the roots of p', repeat until E settles (float64).
    """
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < lo <= hi, got {lo}, {hi}")
    if lo / hi >= 1 - 5e-6:  # the interval has collapsed: the limit polynomial, scaled to hi
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    err, prev = math.inf, None
    for _ in range(1000):
        if prev is not None and abs(prev - err) <= 1e-15:
            break
        prev = err
        pts = np.array([lo, q, r, hi])
        lhs = np.stack([pts, pts**3, pts**5, np.array([1.0, -1.0, 1.0, -1.0])], axis=1)
        a, b, c, err = np.linalg.solve(lhs, np.ones(4))
        disc = math.sqrt(9 * b * b - 20 * a * c)  # p'(x) = a + 3 b x^2 + 5 c x^4 = 0
        q, r = math.sqrt((-3 * b - disc) / (10 * c)), math.sqrt((-3 * b + disc) / (10 * c))
    else:
        raise RuntimeError(f"Remez did not converge on [{lo}, {hi}]")
    return float(a), float(b), float(c)


def fit_sequence(lo: float, hi: float, steps: int, cushion: float, safety: float):
    """The Polar Express composition for inputs in [lo, hi]: `steps` tuples (a, b, c), float64."""
    coeffs = []
    for i in range(steps):
        a, b, c = optimal_quintic(max(lo, cushion * hi), hi)
        if cushion * hi > lo:  # fitted above lo: recentre the image of [lo, hi] on 1
            k = 2 / (a * lo + b * lo**3 + c * lo**5 + a * hi + b * hi**3 + c * hi**5)
            a, b, c = a * k, b * k, c * k
        if i < steps - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        coeffs.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return tuple(coeffs)


def scalar_map(coeffs, x):
    """The composition of odd quintics applied to singular values x (array or tensor)."""
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    return x


def aol_scaled(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, diag(s) X): G in float64 as a stack oriented wide, and scaled by the trainer's AOL row scale s."""
    import train_gpt

    X = G.to(torch.float64)
    X = X if X.ndim == 3 else X.unsqueeze(0)
    X = X.mT if X.size(-2) > X.size(-1) else X
    A, rowsum = train_gpt.ns_line_1_torch(X, rowsum_abs=True)
    return X, train_gpt.aol_row_scale(A, rowsum).unsqueeze(-1) * X


def aol_singular_values(G: torch.Tensor) -> torch.Tensor:
    """Singular values of diag(s) X, X = G oriented wide, s the trainer's AOL scale; float64, [B, min(m, n)]."""
    return torch.linalg.svdvals(aol_scaled(G)[1])


def interval_stats(sv: torch.Tensor) -> dict:
    """Per-stack summary of AOL-scaled singular values: the largest, and low quantiles of all of them."""
    flat = sv.flatten()
    q = torch.quantile(flat, torch.tensor([0.01, 0.05, 0.5], dtype=flat.dtype))
    return {"max": flat.max().item(), "min": flat.min().item(), "q01": q[0].item(), "q05": q[1].item(),
            "median": q[2].item(), "min_of_max": sv.max(dim=-1).values.min().item()}


def gaussian_stacks(seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    return {f"gaussian {m}x{n}": torch.randn(batch, m, n, dtype=torch.float64, generator=g)
            for m, n in ((768, 768), (256, 768), (3072, 768))}


def polar_error(G: torch.Tensor, method: str, coeffs) -> float:
    """||O - U V^T||_F / ||U V^T||_F over a stack G [B, m, n], O = orthogonalize(G, method) with these coefficients,
    computed in float64 against the SVD's polar factor. (For Turbo-Muon this is not a function of the spectrum
    alone: AOL scales rows unequally, so the iteration tends to the polar factor of diag(s) X, not of X.)"""
    import train_gpt

    G = G.to(torch.float64)
    O = train_gpt.orthogonalize(G, method, backend="torch", coeffs=coeffs)
    P = train_gpt.polar_factor_fp64(G)
    return (torch.linalg.matrix_norm(O - P).square().sum() / torch.linalg.matrix_norm(P).square().sum()).sqrt().item()


def aol_limit_error(G: torch.Tensor) -> float:
    """How far the polar factor of diag(s) X (AOL-scaled; what Turbo-Muon's iteration tends to with enough
    steps) is from that of X, relative, over a stack: where a converged Turbo-Muon would land."""
    import train_gpt

    X, scaled = aol_scaled(G)
    P, P_aol = train_gpt.polar_factor_fp64(X), train_gpt.polar_factor_fp64(scaled)
    return ((P_aol - P).norm() / P.norm()).item()


def sweep_lower_ends(los, fixture=os.path.join(ROOT, "tests/data/momentum_124m.npz"), gaussian=True):
    """Rows (label, slope at 0, {stack: polar error}) of Polar Express, of 4-step fits to [lo, 1] (TURBO_FIT's
    other parameters) and of AOL's limit, on the momentum fixture's blocks and (`gaussian`) Gaussian stacks."""
    import train_gpt

    data = np.load(fixture)
    stacks = {f"captured {k}": torch.from_numpy(data[k].astype(np.float64)) for k in ("q_pair", "k_pair", "v", "o")}
    if gaussian:
        stacks.update(gaussian_stacks())
    rows = [("polar_express (5 steps)", math.prod(c[0] for c in train_gpt.POLAR_EXPRESS_COEFFS),
             {name: polar_error(G, "polar_express", None) for name, G in stacks.items()})]
    params = {k: v for k, v in train_gpt.TURBO_FIT.items() if k != "lo"}
    for lo in los:
        coeffs = fit_sequence(lo=lo, **params)
        rows.append((f"turbo_muon, lo={lo:g}", math.prod(c[0] for c in coeffs),
                     {name: polar_error(G, "turbo_muon", coeffs) for name, G in stacks.items()}))
    rows.append(("turbo_muon's limit: polar factor of diag(s) X", math.inf,
                 {name: aol_limit_error(G) for name, G in stacks.items()}))
    names = list(stacks)
    print("| coefficients | slope at 0 | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for label, slope, errors in rows:
        print(f"| {label} | {slope:.0f} | " + " | ".join(f"{errors[n]:.4f}" for n in names) + " |")  # inf prints "inf"
    return rows


def measure(paths):
    rows = []
    for path in paths:
        blocks = torch.load(path)["blocks"]
        for name, stack in blocks.items():
            rows.append((f"{os.path.basename(path)} {name} {tuple(stack.shape)}", interval_stats(aol_singular_values(stack))))
    for name, stack in gaussian_stacks().items():
        rows.append((f"{name} x4", interval_stats(aol_singular_values(stack))))
    print("| stack | max | min over matrices of max | median | 5% | 1% | min |")
    print("|---|---|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['max']:.4f} | {s['min_of_max']:.4f} | {s['median']:.4f} | {s['q05']:.2e} | {s['q01']:.2e} | {s['min']:.2e} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 unless train_gpt.TURBO_COEFFS equals the fit")
    parser.add_argument("--measure", nargs="*", metavar="CAPTURE", help="AOL-scaled singular values of captures")
    parser.add_argument("--sweep_lo", metavar="LO,LO,...", help="polar errors of 4-step fits to [lo, 1] against Polar Express")
    args = parser.parse_args()
    import train_gpt

    if args.sweep_lo:
        sweep_lower_ends([float(v) for v in args.sweep_lo.split(",")])
        return 0
    if args.measure is not None:
        measure(args.measure)
        return 0
    fit = fit_sequence(**train_gpt.TURBO_FIT)
    print(f"fit_sequence(**{train_gpt.TURBO_FIT}):")
    for t in fit:
        print(f"    ({t[0]!r}, {t[1]!r}, {t[2]!r}),")
    x = np.linspace(train_gpt.TURBO_FIT["lo"], train_gpt.TURBO_FIT["hi"], 200_001)
    y = scalar_map(fit, x)
    print(f"maps [{x[0]}, {x[-1]}] into [{y.min():.4f}, {y.max():.4f}]")
    if args.check:
        same = np.allclose(np.array(fit), np.array(train_gpt.TURBO_COEFFS), rtol=1e-12, atol=0)
        print("train_gpt.TURBO_COEFFS " + ("match" if same else "DIFFER"))
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
