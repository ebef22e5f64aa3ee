"""Generate text from a checkpoint of train_gpt.py (or train_gpt_medium.py), on CPU or GPU.

    python sample.py logs/RUN/step_1285 --prompt "The meaning of life is" --tokens 100 --temperature 0.8 --top_k 50
    python sample.py logs/RUN/step_1285 --prompt "Hello" --vocab-bpe data/gpt2/vocab.bpe \\
        --encoder-json data/gpt2/encoder.json          # offline: GPT-2's files instead of tiktoken's download

The checkpoint's own hyperparameters build the model (the trainer's GPT, imported from the file named by
--trainer), with the attention windows and rotary tables of the checkpoint's step (the final validation's
windows after the last step). Text is GPT-2 BPE through tiktoken, built as data/tokenize_text.py builds it;
the prompt follows a BOS token, as every training document does. Each new token is drawn from the
softcapped logits over the tokenizer's ids, divided by --temperature (0: the most likely token) and cut to
the --top_k most likely (0: all). No KV cache: every token runs the whole context again, up to the model's
longest sequence (the longest --stage_seq_len or --val_seq_len), which is plenty for a look at a run.

Exit status 0, or 2 with one `error:` line (an unusable checkpoint, a prompt outside the model's vocabulary).
"""
import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT / "data")]
import tokenize_text  # noqa: E402 (after the path insert: data/ is a folder of scripts)


def load_model(tg, checkpoint: str, device: torch.device, **overrides):
    """(model in eval mode, its Hyperparameters, the checkpoint's meta.json) from a checkpoint folder, with
    `overrides` of hyperparameters that do not change the parameters (e.g. val_seq_len); raises tg.ConfigError
    for an unusable checkpoint."""
    meta = tg.read_checkpoint(checkpoint, None)
    hp = tg.Hyperparameters(**{**meta["hyperparameters"], **overrides})
    state = torch.load(Path(checkpoint) / "state.pt", map_location="cpu", mmap=True, weights_only=True)
    with device:
        model = tg.GPT(hp)
    model.load_state_dict(state["model"])
    return model.eval(), hp, meta


def attention_inputs(tg, model, hp, step: int):
    """(windows, softmax scale) of the forward at `step`, as Trainer.evaluate uses them, after setting the
    rotary tables to the step's long-window history (YaRN)."""
    derived = tg.derive(hp, 1)
    N = tg.total_steps(hp)
    plan = tg.plan_step(min(step, N - 1), hp, derived)
    model.rotary.set_frequencies(tg.yarn_frequencies(model.rotary.base, plan.long_windows))
    windows = derived.recipe.final_val_windows if step >= N else plan.windows
    return windows, tg.yarn_attention_scale(hp.attn_scale, plan.long_windows)


@torch.no_grad()
def logits(tg, model, hp, tokens: torch.Tensor, windows, scale) -> torch.Tensor:
    """Softcapped logits [T, vocab_size] (fp32) of every position of tokens [T]. The trainer's forward returns
    its loss, so the head's input is taken where it enters head_loss; the input is padded with BOS to whole
    attention blocks (causal attention: the padding changes no earlier position)."""
    T = tokens.numel()
    padded = F.pad(tokens, (0, -T % tg.ATTN_BLOCK), value=hp.bos_id)
    hidden = {}

    def keep_hidden(x, targets, loss_weights, rows):  # GPT.head_loss's signature
        hidden["x"] = x
        return x.sum()
    model.head_loss = keep_hidden  # on the instance: this model only
    try:
        cu, docs, max_len = tg.document_bounds(padded.cpu().numpy(), hp.bos_id)
        model(padded, torch.full_like(padded, -100), torch.from_numpy(cu).to(tokens.device),
              tg.attention_meta(docs, max_len, windows), scale, torch.ones(1, device=tokens.device))
    finally:
        del model.head_loss
    z = F.linear(tg.rms_norm(hidden["x"][:T]).float(), model.lm_head_w.float())
    return tg.softcap_logits(z, hp.logit_softcap, hp.logit_offset, hp.logit_temp)


def next_token(scores: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """One id drawn from softmax(scores / temperature) over the top_k highest scores (all if 0); the highest
    score's id if temperature is 0."""
    if temperature == 0:
        return int(scores.argmax())
    if top_k:
        cutoff = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < cutoff, float("-inf"))
    probs = torch.softmax(scores / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(tg, model, hp, step: int, prompt_ids: list[int], n_tokens: int, temperature: float, top_k: int,
             seed: int) -> list[int]:
    """The n_tokens ids that follow BOS + prompt_ids."""
    device = model.lm_head_w.device
    windows, scale = attention_inputs(tg, model, hp, step)
    longest = max(tg.longest_train_row(tg.parse_recipe(hp)), hp.val_seq_len)
    generator = torch.Generator().manual_seed(seed)
    ids, new = [hp.bos_id, *prompt_ids], []
    for _ in range(n_tokens):
        context = torch.tensor(ids[-longest:], device=device)
        scores = logits(tg, model, hp, context, windows, scale)[-1, :hp.tokenizer_vocab]
        new.append(next_token(scores, temperature, top_k, generator))
        ids.append(new[-1])
    return new


def parse_args(argv):
    p = argparse.ArgumentParser(prog="sample.py", description="Generate text from a train_gpt.py checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint folder, <log_dir>/<run_id>/step_<k>")
    p.add_argument("--prompt", default="", help="text to continue (default: none, the model starts a document)")
    p.add_argument("--tokens", type=int, default=100, help="how many tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0: always the likeliest")
    p.add_argument("--top_k", type=int, default=50, help="draw among the k likeliest tokens (0: all)")
    p.add_argument("--samples", type=int, default=1, help="how many continuations (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--trainer", default="train_gpt", choices=["train_gpt", "train_gpt_medium"],
                   help="the trainer module whose model the checkpoint holds")
    p.add_argument("--vocab-bpe", help="GPT-2's vocab.bpe, for offline use (with --encoder-json)")
    p.add_argument("--encoder-json", help="GPT-2's encoder.json, for offline use (with --vocab-bpe)")
    args = p.parse_args(argv)
    if args.tokens < 0 or args.temperature < 0 or args.top_k < 0 or args.samples < 1:
        p.error("--tokens, --temperature and --top_k must be >= 0, --samples >= 1")
    return args


def trainer_and_device(args):
    """(the trainer module named by args.trainer, the torch.device args.device asks for: auto = GPU if any)."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return importlib.import_module(args.trainer), torch.device("cuda" if use_cuda else "cpu")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tg, device = trainer_and_device(args)
    try:
        model, hp, meta = load_model(tg, args.checkpoint, device)
        encoding = tokenize_text.load_gpt2_encoding(args.vocab_bpe, args.encoder_json)
        prompt_ids = encoding.encode_ordinary(args.prompt)
        outside = sorted({t for t in prompt_ids if t >= hp.tokenizer_vocab})
        if outside:
            raise tg.ConfigError(f"the prompt's token ids {outside[:5]} are not below the model's --tokenizer_vocab="
                                 f"{hp.tokenizer_vocab}; this model was trained on another vocabulary")
    except (tokenize_text.InputError, tg.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# {args.checkpoint}: step {meta['step']}/{meta['total_steps']}, {device.type}, temperature "
          f"{args.temperature}, top_k {args.top_k}", file=sys.stderr)
    for i in range(args.samples):
        new = generate(tg, model, hp, meta["step"], prompt_ids, args.tokens, args.temperature, args.top_k,
                       args.seed + i)
        print(args.prompt + encoding.decode(new))
        if i + 1 < args.samples:
            print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
