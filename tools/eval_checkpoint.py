"""Validate a checkpoint at several attention windows: one trained model, so the windows are compared exactly.

    python tools/eval_checkpoint.py logs/RUN/step_205 --windows 6:20 6:13 5:11
    python tools/eval_checkpoint.py logs/RUN/step_205 --windows 6:13 --val_files "other/val_*.bin"
    python tools/eval_checkpoint.py logs/RUN/step_205 --windows 6:20 --val_seq_len 262144   # longer val chunks

Prints one line per window pair (short:long, in 128-token blocks) with the validation chunk length: the mean
next-token loss over the run's --val_tokens first validation tokens, as the trainer's validation computes it
(tests/test_checkpoint.py checks the match at the run's own final windows). The rotary tables and softmax
scale are those of the checkpoint's step (after the last step: the final validation's, no YaRN change), so
only the windows differ (and the chunk length, with --val_seq_len: each chunk starts without context).
One process (GPU when there is one); exit status 2 with one `error:` line for an unusable checkpoint or a
malformed window.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402 (after the path insert)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="eval_checkpoint.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder, <log_dir>/<run_id>/step_<k>")
    p.add_argument("--windows", nargs="+", required=True, help="short:long window pairs in 128-token blocks")
    p.add_argument("--val_files", help="validation shards (default: the run's)")
    p.add_argument("--val_seq_len", type=int, help="tokens per validation forward (default: the run's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--trainer", default="train_gpt", choices=["train_gpt", "train_gpt_medium"],
                   help="the trainer module whose model the checkpoint holds")
    return p.parse_args(argv)


def evaluate_windows(tg, checkpoint: str, windows: list[str], device: torch.device, **overrides
                     ) -> tuple[int, list[tuple[tuple[int, int], float]]]:
    """(validation chunk length, [((short, long), val loss)]) of the checkpoint's model at each window pair, with
    `overrides` of the run's validation settings (val_files, val_seq_len); raises tg.ConfigError."""
    pairs = [tg._window_pair("windows", w) for w in windows]
    model, hp, meta = sample.load_model(tg, checkpoint, device, **overrides)
    derived = tg.derive(hp, 1)  # also checks that val_seq_len divides val_tokens
    _, scale = sample.attention_inputs(tg, model, hp, meta["step"])
    weights = torch.tensor(tg.next_token_weights(tg.plan_step(0, hp, derived)), device=device)
    scale = torch.tensor(scale, dtype=torch.float32, device=device)
    tokens = tg.load_validation_tokens(hp)
    return hp.val_seq_len, [(pair, tg.validation_loss(model, tokens, hp, pair, scale, weights, 0, 1, device)[0])
                            for pair in pairs]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tg, device = sample.trainer_and_device(args)
    try:
        overrides = {name: getattr(args, name) for name in ("val_files", "val_seq_len") if getattr(args, name)}
        val_seq_len, results = evaluate_windows(tg, args.checkpoint, args.windows, device, **overrides)
    except (tg.ConfigError, tg.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for (short, long), loss in results:
        print(f"{args.checkpoint} windows:{short}:{long} val_seq_len:{val_seq_len} val_loss:{loss:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
