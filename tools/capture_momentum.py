"""Capture the matrices Muon orthogonalizes, from real training steps of a trainer on CPU.

Trains the trainer's default model (124M for train_gpt.py, the medium model for train_gpt_medium.py)
for a few steps on the offline proxy corpus with a short row and a small batch, and records the input
of `orthogonalize` at the last step: the Nesterov blend (1 - b) G + b M of gradient G and momentum
buffer M, one stack per shape group, exactly what the orthogonalizer sees. No GPU needed.

    sh /work/shared/corpus/unpack.sh .capture/data          # once; .capture/ is git-ignored locally
    python tools/capture_momentum.py --steps=12 --out=.capture/momentum_small.pt \\
        --fixture=tests/data/momentum_124m.npz              # about 16 minutes on 2 shared cores
    python tools/capture_momentum.py --trainer=train_gpt_medium --steps=2 --bigram_buckets=0 \\
        --out=.capture/momentum_medium.pt                   # the bigram table does not fit in 23 GB

Shapes are re-cut to the blocks Muon is planned to orthogonalize (Q and K per head pair, [2 * head_dim,
dim]; V and O [dim, dim]; both MLP matrices stored [hidden, dim]): rows of a head pair of the stored
[4, H * head_dim, dim] attention momentum are that block's momentum at these steps (row blocks of a
gradient are the gradient of the row block), the MLP out-projection is transposed.

The fixture (--fixture) keeps the Q and K head-pair blocks and the V and O matrices of one layer in
float16 (npz, compressed): 2.8 MiB. The MLP matrices ([3072, 768] is 4.7 MB in float16) stay out;
tools/fit_turbo_coeffs.py measures them from the full capture. Bit-for-bit reproduction needs the same
torch build and thread count (CPU matmul summation order); the spectra do not depend on it.
"""
import argparse
import importlib
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Short rows and a small batch make a step of the full-size model take seconds on CPU; every other
# setting is the trainer's default recipe (schedule, lr, momentum warm-up, Polar Express + NorMuon).
# The batch: 2048 tokens in the first stage, 4096 after (the small track has 3 stages, the medium 1).
CPU_FLAGS = ["--val_seq_len=1024", "--val_tokens=1024", "--compile=false", "--warmup_steps=0",
             "--device=cpu"]


def cpu_flags(trainer) -> list[str]:
    stages = len(trainer.Hyperparameters.__dataclass_fields__["stage_batch_tokens"].default.split(","))
    batch, clip = ["2048"] + ["4096"] * (stages - 1), ["896"] + ["1024"] * (stages - 1)
    return CPU_FLAGS + [f"--stage_batch_tokens={','.join(batch)}", f"--stage_doc_clip={','.join(clip)}",
                        f"--stage_seq_len={','.join(['1024'] * stages)}"]
FIXTURE_LAYER = 4  # an attention layer in the middle of both models (short window in both)


def planned_blocks(stacks: list, groups: list, hp, proj_lr_mul: float) -> dict:
    """name -> [count, m, n] float32 stacks, from the captured inputs of DistMuon's shape groups (in order):
    the Q/K pair blocks [2 D, dim] (per layer: H/2 of Q, then H/2 of K), V and O, the MLP's two matrices."""
    by_group = {(tuple(g["shape"]), g["lr_mul"]): G for g, G in zip(groups, stacks)}
    dim, hd, pairs = hp.model_dim, hp.head_dim, hp.num_heads // 2
    hidden = hp.mlp_ratio * dim
    qk = by_group[((2 * hd, dim), 1.0)].reshape(-1, 2, pairs, 2 * hd, dim)  # [attn layers, q/k, pair, ...]
    vo = by_group[((hp.num_heads * hd, dim), 1.0)].reshape(-1, 2, hp.num_heads * hd, dim)
    return {"q_pair": qk[:, 0].flatten(0, 1), "k_pair": qk[:, 1].flatten(0, 1), "v": vo[:, 0], "o": vo[:, 1],
            "mlp_fc": by_group[((hidden, dim), 1.0)], "mlp_proj": by_group[((hidden, dim), proj_lr_mul)]}


def capture(trainer_name: str, steps: int, corpus: str, extra: list[str]):
    trainer = importlib.import_module(trainer_name)
    train_glob, val_glob = os.path.join(corpus, "proxy_train_*.bin"), os.path.join(corpus, "proxy_val_*.bin")
    hp = trainer.parse_args([f"--train_files={train_glob}", f"--val_files={val_glob}", *cpu_flags(trainer), *extra])
    run = trainer.Trainer(hp, 0, 1, torch.device("cpu"))
    loader = trainer.DistributedTrainLoader(hp, 0, 1, torch.device("cpu"), trainer.row_specs(range(steps), hp, run.derived))
    recorded, original = [], trainer.orthogonalize

    def recording(G, *args, **kwargs):  # called once per shape group, in the groups' order
        recorded.append(G.detach().float().clone())
        return original(G, *args, **kwargs)

    trainer.orthogonalize = recording  # muon_update looks the name up in the module at each call
    try:
        for step in range(steps):
            start = time.perf_counter()
            recorded.clear()
            loss = run.train_step(step, loader).item()
            print(f"step:{step + 1}/{steps} train_loss:{loss:.4f} {time.perf_counter() - start:.1f}s", flush=True)
    finally:
        trainer.orthogonalize = original
    return planned_blocks(recorded, run.muon.groups, hp, trainer.MLP_PROJ_LR_MUL), hp


def write_fixture(blocks: dict, hp, path: str, meta: dict):
    attn_layer = FIXTURE_LAYER - sum(c == "-" for c in hp.layer_attention[:FIXTURE_LAYER])  # index among attn layers
    pairs = hp.num_heads // 2
    arrays = {"q_pair": blocks["q_pair"][attn_layer * pairs], "k_pair": blocks["k_pair"][attn_layer * pairs],
              "v": blocks["v"][attn_layer], "o": blocks["o"][attn_layer]}
    # Each matrix is scaled to unit Frobenius norm before the float16 cast: every orthogonalizer is scale
    # invariant, and raw momentum entries (~1e-6) would fall into float16's subnormal range.
    arrays = {k: (v / v.norm()).numpy().astype(np.float16) for k, v in arrays.items()}
    np.savez_compressed(path, **arrays, meta=np.array(repr(meta)))
    print(f"fixture {path}: {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}, {os.path.getsize(path) / 2**20:.2f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", default="train_gpt", choices=["train_gpt", "train_gpt_medium"])
    parser.add_argument("--steps", type=int, default=12, help="training steps; the last one is recorded")
    parser.add_argument("--corpus", default=os.path.join(ROOT, ".capture", "data"), help="folder of the unpacked proxy shards")
    parser.add_argument("--out", required=True, help="torch.save of {name: [count, m, n] float32} and the settings")
    parser.add_argument("--fixture", help="also write the small float16 test fixture (npz) here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the summation order depends on it)")
    args, extra = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    blocks, hp = capture(args.trainer, args.steps, args.corpus, extra)
    meta = dict(trainer=args.trainer, steps=args.steps, threads=args.threads, torch=str(torch.__version__),
                flags=cpu_flags(importlib.import_module(args.trainer)) + extra, recorded="Nesterov input of orthogonalize at the last step")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"blocks": blocks, "meta": meta}, args.out)
    print(f"saved {args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in blocks.items()))
    if args.fixture:
        write_fixture(blocks, hp, args.fixture, meta)


if __name__ == "__main__":
    main()
