"""train_gpt.py: the 124M GPT speedrun trainer, in one file.

Trains a GPT-2-small-class model (11 layers, dim 768, with the public speedrun's 2026 components) on
FineWeb GPT-2 token shards to a validation loss of 3.28, in a staged schedule of growing batches and
attention windows, with Adam on embeddings/head/gates/scalars and distributed Muon (Polar Express /
Turbo-Muon orthogonalization) on the hidden matrices.

    torchrun --standalone --nproc_per_node=8 train_gpt.py          # 8xH100, the record setting
    torchrun --standalone --nproc_per_node=1 train_gpt.py          # same math, gradient accumulation
    python train_gpt.py --preset=tiny --train_files=... --val_files=...   # CPU smoke run
    python train_gpt.py --help                                      # every hyperparameter

Every run writes <log_dir>/<run_id>.txt, which begins with this file's source.
Importing this file has no side effects; tests import its pieces.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import glob
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Hyperparameters
# -----------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad flag or an inconsistent configuration; the message says what to change."""


@dataclass(frozen=True)
class Hyperparameters:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of training shards
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of validation shards
    val_tokens: int = 10_485_760  # validation loss is measured over exactly these first tokens
    cycle_train_data: bool = False  # restart the training shards when exhausted (default: error)
    tokenizer_vocab: int = 50257  # token ids in the shards must be below this (GPT-2's vocabulary)
    bos_id: int = 50256  # the token that begins every document (GPT-2's <|endoftext|>)
    # track
    track: str = "small"  # record track: the target records/verify.py tests and the log's val_loss decimals
    target_val_loss: float = 3.28  # the track's target on FineWeb; declare your own for other data
    # schedule: num_iterations steps in stages, then extension_steps at the last stage's settings and the lr
    # floor. Per-stage lists have one entry per stage, comma-separated (README: "The staged schedule").
    num_iterations: int = 1270  # scheduled optimizer steps; every stage boundary scales with it
    extension_steps: int = 15  # steps after the schedule, at its final windows and the lr floor
    stage_starts: str = "1/3,2/3"  # where stages 2, 3, ... begin, as fractions of num_iterations
    stage_batch_tokens: str = "131072,262144,393216"  # tokens per optimizer step in each stage, all ranks
    stage_seq_len: str = "16384,32768,49152"  # tokens per packed row per GPU in each stage
    micro_batch_tokens: int = 65536  # join a GPU's rows of a step into passes of up to this many tokens (0: a row each)
    # fewer forward/backward passes per step, the same math (GPT.forward keeps the rows' boundaries)
    stage_doc_clip: str = "896,2048,2048"  # each document cut to this many tokens in a row (0: used whole)
    doc_tails: str = "split"  # what the clip cuts off: "split" it into further clipped pieces, or "drop" it (records #29)
    stage_windows: str = "1:3,3:7,5:11"  # short:long attention window of each stage, in 128-token blocks
    extension_windows: str = "6:13"  # short:long window of the extension steps
    final_val_windows: str = "6:20"  # short:long window of the final validation only (no YaRN change)
    stage_lr_mul: str = "1,1.52,1.73"  # lr multiplier of each stage: about (batch / first batch)^0.6, ^0.5
    cooldown_frac: float = 0.6  # fraction of the scheduled steps in the final linear lr cooldown
    final_lr_frac: float = 0.15  # lr multiplier (floor) at the end of the cooldown and in the extension
    mtp_weights: str = "1,0.5,0.25>0;1,0.5>0;1"  # per stage (;): loss weights of the next 1, 2, .. tokens; a>b ramps
    prefix_weights: str = "0.25;0.25>0;0"  # per stage (;): weight of the next token's byte-prefix token as a target (records #88)
    prefix_vocab: str = "data/gpt2/encoder.json"  # the tokenizer whose tokens' byte prefixes make those targets
    val_seq_len: int = 64 * 1024  # tokens per validation forward per GPU
    # model
    vocab_size: int = 50304  # rows of the embedding and head: tokenizer_vocab padded to a multiple of 128
    num_layers: int = 11
    model_dim: int = 768
    num_heads: int = 6  # even: Q and K are orthogonalized per pair of heads
    head_dim: int = 128
    mlp_ratio: int = 4  # hidden width of the MLP, in units of model_dim
    layer_attention: str = "SSSLSS-SSSL"  # per layer: L long window, S short window, - no attention (MLP only)
    attn_scale: float = 0.1  # softmax scale of the QK-normed heads at the first windows (YaRN raises it)
    value_embed_layers: str = "1,2,8,9,10"  # layers whose values add a gated value embedding, one table each
    xsa_layers: str = "1,3,4,7"  # layers whose heads remove a learned share of their own value (XSA)
    attn_gate_layers: str = "3,10"  # layers with a gate per head on the attention output
    key_offset_layers: str = "3,10"  # layers whose keys' unrotated half comes from the previous token
    paired_head_layers: str = "0,2,5,9"  # layers whose head pairs attend as one sequence of twice the tokens
    skip_connection: str = "3>6"  # a>b: layer b's input adds a gated copy of layer a's output ("" for none)
    cache_layer: int = 7  # later layers' attention reads this layer's output, subtracted at the end; -1: off
    gate_split_layer: int = 4  # per-token gates (#85) from x0 before this layer, from its input after; <= 0: static
    mudd: bool = True  # the last layer and the output mix earlier layers per token (MUDD, records #81); off: backout
    dc_layers: str = "10"  # layers whose heads add a per-token mix of all heads' local attention (DC, records #85)
    dc_kernel: bool = True  # DC (--dc_layers) by its Triton kernels on GPU; off, and on CPU: plain tensor ops
    bigram_buckets: int = 377_280  # rows of the hashed bigram embedding added to the residual (0: off)
    smear: bool = True  # each token's embedding adds a gated share of the previous token's
    untie_stage: int = 3  # embedding tied to the head until this stage begins (1-based; 0: never tied)
    logit_softcap: float = 23.0  # logits = softcap * sigmoid((z + logit_offset) / logit_temp)
    logit_offset: float = 5.0
    logit_temp: float = 7.5
    fp8_head: bool = True  # LM head matmuls in float8 on GPU (README: "Model and optimizer"); fp32 on CPU
    fp8_head_fused_grad: bool = True  # with --fp8_head: the loss kernel writes the head's e5m2 logit gradient in its forward (records #67)
    fused_mlp: bool = True  # the MLP's relu^2 and its gradient in the epilogues of Triton matmuls on GPU (records #59)
    fp8_mlp_up: bool = True  # with --fused_mlp: the up-projection's forward from float8 e4m3 operands, Hopper GPU training only (records #84)
    fp8_qkv: bool = False  # the attention's q, k, v projection's forward from float8 e4m3 operands, GPU training only
    fp8_mlp_down: bool = False  # with --fused_mlp: the down-projection's forward from float8 e4m3 operands, Hopper GPU training only (records #89)
    # Adam (embeddings, head, gates, scalars); betas as "beta1,beta2"
    adam_lr_embed: float = 0.008  # the untied token embedding
    adam_lr_head: float = 0.008
    adam_lr_value_embed: float = 0.6  # value embeddings and the bigram table
    adam_lr_scalar: float = 0.04  # the scalars but the residual and sublayer weights (the next two)
    adam_lr_resid: float = 0.04  # the residual weights r of x <- r x + p f(x) (the public's resid_lambdas: 0.04)
    adam_lr_post: float = 0.04  # the sublayer weights p (the public's post_lambdas: 0.008)
    adam_lr_gate: float = 0.008
    adam_lr_mudd: float = 0.002  # MUDD's coefficient generators: 0.25 x 0.008 (records #81)
    adam_lr_dynamic_gate: float = 0.0008  # the per-token gate generators: 0.1 x 0.008 (records #85)
    adam_betas_embed: str = "0.5,0.95"  # embedding and head: a rare token's large step is forgotten fast
    adam_betas_value_embed: str = "0.75,0.95"
    adam_betas_scalar: str = "0.9,0.99"  # scalars, gates and the coefficient generators
    adam_betas_lambdas: str = "0.9,0.99"  # the residual and sublayer weights (the public's: 0.9,0.95)
    adam_eps: float = 1e-10
    adam_every: int = 1  # Adam steps every N steps on the gradients summed over them (Muon: every step; public: 2)
    # decay W -= lr_t^2 * wd * W (DistAdam; cautious: only where the step and W agree in sign); per group wd =
    # adam_weight_decay * its multiplier (the speedrun's values, records #50 and #53); scalars: none
    adam_weight_decay: float = 0.005
    adam_cautious_wd: bool = False  # true: Adam's decay only where the step and the weight agree in sign (records #50)
    adam_wd_mul_embed: float = 150.0  # the embedding and the head
    adam_wd_mul_value_embed: float = 5.0  # value embeddings and the bigram table
    adam_wd_mul_gate: float = 1.0  # gate matrices, the generators' matrices included (biases and scales: none)
    # Muon (hidden matrices)
    muon_lr: float = 0.023  # in units of spectral norm per step, times max(1, m/n)^0.5 and the MLP multipliers
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85  # momentum warms up linearly from this value ...
    muon_momentum_warmup_frac: float = 0.236  # ... over this fraction of the scheduled steps
    muon_momentum_cooldown_frac: float = 0.039  # and falls back to the start value over the last fraction
    muon_ortho: str = "turbo_muon"  # orthogonalization (README: "Muon options")
    muon_variant: str = "muon"  # update rule around the orthogonalized momentum (README: "Muon options")
    muon_weight_decay: float = 1.2  # W -= lr_eff * (wd * lr_t) * W: the decay goes as lr^2 (orscale: its own form)
    cautious_wd: bool = False  # true: decay only where update and weight agree in sign (arXiv 2510.12402)
    normuon: bool = True  # neuron-wise second-moment normalization (arXiv 2510.05491)
    normuon_beta2: float = 0.9
    normuon_eps: float = 1e-10
    normuon_out_rows: bool = True  # attention output matrix stored (out, in): NorMuon per output channel, the public's
    muon_bf16_weights: bool = False  # Muon's matrices held in bf16, their fp32 low halves in Muon (records #57)
    muon_qk_blocks: str = "pair"  # Muon orthogonalizes Q and K per pair of heads (records #80), or each "whole"
    orscale_r_min: float = 0.1  # trust-ratio clip, OrScale-LM defaults (arXiv 2605.07815)
    orscale_r_max: float = 5.0
    scion_radius: float = 1.0  # spectral radius of the Scion step (arXiv 2502.07529)
    # loop
    warmup_steps: int = 10  # untimed kernel warm-up steps; model and optimizer are restored after
    val_loss_every: int = 125  # validate every N steps (0: only at the end)
    seed: int = 0
    log_dir: str = "logs"  # the log is <log_dir>/<run_id>.txt; an existing log is never overwritten
    run_id: str = ""  # log file name: letters, digits, . _ - + = (not starting with .); default a fresh uuid
    compile: bool = True  # torch.compile the model (GPU only)
    compile_per_block: bool = False  # train through per-block graphs: faster cold start, slower steps (README: "Compile time")
    gc_freeze: bool = True  # after the warm-up, keep what exists from the garbage collector's later full passes
    device: str = "auto"
    # checkpoints, saved under <log_dir>/<run_id>/step_<k> outside the timed region (README: "Checkpoints, resuming
    # and sampling")
    checkpoint_every: int = 0  # save every N steps (0: off); steps 0 < k < the last
    save_checkpoint: bool = False  # save after the final validation
    resume_from: str = ""  # a checkpoint folder: continue that run from its step (the configuration must match)

    def __post_init__(self):
        positive = ["val_tokens", "val_seq_len", "num_iterations", "vocab_size",
                    "tokenizer_vocab", "num_layers", "model_dim", "num_heads", "head_dim", "mlp_ratio", "adam_every"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ["val_loss_every", "warmup_steps", "extension_steps", "bigram_buckets", "untie_stage",
                     "muon_weight_decay", "adam_weight_decay", "adam_wd_mul_embed", "adam_wd_mul_value_embed",
                     "adam_wd_mul_gate", "checkpoint_every", "micro_batch_tokens"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.fp8_mlp_down and self.micro_batch_tokens:
            raise ConfigError("--fp8_mlp_down scales each pass's post by its largest entry, so with rows joined "
                              "(--micro_batch_tokens) a row would round by its neighbours' values: pass "
                              "--micro_batch_tokens=0 or --fp8_mlp_down=false")
        if self.checkpoint_every % self.adam_every:
            raise ConfigError(f"--checkpoint_every={self.checkpoint_every} must be a multiple of --adam_every="
                              f"{self.adam_every}: a checkpoint is taken where no Adam gradients are pending")
        if self.tokenizer_vocab > self.vocab_size:
            raise ConfigError(f"--vocab_size={self.vocab_size} must hold --tokenizer_vocab={self.tokenizer_vocab} "
                              f"ids; use --vocab_size={-(-self.tokenizer_vocab // 128) * 128}")
        if not 0 <= self.bos_id < self.tokenizer_vocab:
            raise ConfigError(f"--bos_id={self.bos_id} must be a token id below --tokenizer_vocab={self.tokenizer_vocab}")
        for name in ["cooldown_frac", "muon_momentum_warmup_frac", "muon_momentum_cooldown_frac"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if self.num_heads % 2:
            raise ConfigError(f"--num_heads={self.num_heads} must be even: heads work in pairs (paired attention, "
                              "per-pair Q/K orthogonalization)")
        if len(self.layer_attention) != self.num_layers or set(self.layer_attention) - set("LS-"):
            raise ConfigError(f"--layer_attention needs one letter per layer ({self.num_layers}) from L (long window), "
                              f"S (short window), - (no attention); got {self.layer_attention!r}")
        if self.fp8_mlp_up and not self.fused_mlp:
            raise ConfigError("--fp8_mlp_up (the small track's default) runs in the fused MLP kernel: add "
                              "--fused_mlp=true, or --fp8_mlp_up=false for the unfused bf16 MLP")
        if self.fp8_mlp_down and not self.fused_mlp:
            raise ConfigError("--fp8_mlp_down takes post's scale from the fused MLP kernel: add --fused_mlp=true")
        if self.muon_variant == "scion" and (self.normuon or self.cautious_wd or self.muon_weight_decay):
            needed = [flag for flag, on in (("--normuon=false", self.normuon), ("--cautious_wd=false", self.cautious_wd),
                                            ("--muon_weight_decay=0", self.muon_weight_decay)) if on]
            raise ConfigError("--muon_variant=scion has its own Frank-Wolfe decay; it takes no NorMuon or weight "
                              f"decay (NorMuon and Muon's decay are on by default): add {' '.join(needed)}")
        if self.muon_variant.startswith("orscale") and self.cautious_wd:
            raise ConfigError("--muon_variant=orscale* couples --muon_weight_decay into the trust ratio; "
                              "--cautious_wd does not apply: drop --cautious_wd=true (or pass --cautious_wd=false) and "
                              "set --muon_weight_decay for its trust ratio (e.g. 0.01)")
        for name, allowed in FIELD_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not self.log_dir:
            raise ConfigError("--log_dir must not be empty (default: logs)")
        if self.run_id and not RUN_ID_CHARS.fullmatch(self.run_id):
            raise ConfigError(f"--run_id={self.run_id!r} must be a plain file name: letters, digits and . _ - + =, "
                              "not starting with '.' (it names <log_dir>/<run_id>.txt)")
        parse_recipe(self)  # the per-stage lists, layer sets and betas: a ConfigError names the flag


FIELD_CHOICES = {  # fields that take one of a few words
    "muon_ortho": ("newton_schulz5", "polar_express", "turbo_muon"),
    "muon_variant": ("muon", "orscale", "orscale_lm", "scion"),
    "muon_qk_blocks": ("pair", "whole"),
    "device": ("auto", "cuda", "cpu"),
    "track": ("small", "medium"),
}
RUN_ID_CHARS = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]*")
VAL_LOSS_DECIMALS = {"small": 4, "medium": 6}  # val_loss digits in the log: each track's public log convention
ATTN_BLOCK = 128  # attention windows are counted in blocks of this many tokens (the speedrun's unit)


@dataclass(frozen=True)
class Stage:
    """One stage of the schedule: from step `start` on, these settings (lr_mul before the cooldown)."""
    start: int
    batch_tokens: int
    seq_len: int  # tokens per row per rank
    doc_clip: int
    windows: tuple[int, int]  # (short, long) in ATTN_BLOCK blocks
    lr_mul: float
    mtp: tuple[tuple[float, float], ...]  # per predicted offset 1, 2, ...: weight at the stage's start and end
    prefix: tuple[float, float]  # the prefix target's weight at the stage's start and end


@dataclass(frozen=True)
class Recipe:
    """The structured content of the Hyperparameters' text fields, parsed and checked (parse_recipe)."""
    stages: tuple[Stage, ...]
    extension_windows: tuple[int, int]
    final_val_windows: tuple[int, int]
    value_embed_layers: tuple[int, ...]
    xsa_layers: frozenset[int]
    attn_gate_layers: frozenset[int]
    key_offset_layers: frozenset[int]
    paired_head_layers: frozenset[int]
    dc_layers: frozenset[int]
    gate_split: int  # first layer whose gates come from the residual (0: static gates)
    skip: tuple[int, int] | None  # (from layer, to layer)
    betas: dict  # group name -> (beta1, beta2)
    prefix_loss: bool  # some stage weighs the prefix target: the loss takes one more target per token


def _numbers(name: str, text: str, kind=float, sep=",") -> list:
    try:
        return [kind(Fraction(part.strip())) if kind is float else kind(part.strip()) for part in text.split(sep)]
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"--{name}={text!r}: expected {kind.__name__}s separated by {sep!r}") from None


def _window_pair(name: str, text: str) -> tuple[int, int]:
    pair = _numbers(name, text, int, ":")
    if len(pair) != 2 or min(pair) <= 0:
        raise ConfigError(f"--{name}: {text!r} is not short:long, two positive block counts (blocks of {ATTN_BLOCK})")
    return pair[0], pair[1]


def _layer_set(hp, name: str, attention_only: bool = True) -> tuple[int, ...]:
    text = getattr(hp, name).strip()
    layers = _numbers(name, text, int) if text else []
    for i in layers:
        if not 0 <= i < hp.num_layers:
            raise ConfigError(f"--{name}: layer {i} does not exist (--num_layers={hp.num_layers})")
        if attention_only and hp.layer_attention[i] == "-":
            raise ConfigError(f"--{name}: layer {i} has no attention (--layer_attention={hp.layer_attention!r})")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"--{name}={text!r} lists a layer twice")
    return tuple(layers)


def _weight_ramps(name: str, text: str, stages: int, per_stage_max: int | None = None) -> list:
    """Per stage (';'-separated), a tuple of (start, end) weights from items 'w' or 'a>b' (','-separated)."""
    parts = [part.strip() for part in text.split(";")]
    if len(parts) != stages:
        raise ConfigError(f"--{name} has {len(parts)} stage(s) (separated by ';'); the schedule has {stages}")
    ramps = []
    for part in parts:
        weights = []
        for item in part.split(","):
            ends = _numbers(name, item, float, ">")
            if len(ends) > 2 or min(ends) < 0:
                raise ConfigError(f"--{name}: {item!r} is not a weight w >= 0 or a ramp a>b")
            weights.append((ends[0], ends[-1]))
        if per_stage_max is not None and len(weights) > per_stage_max:
            raise ConfigError(f"--{name}: {part!r} has {len(weights)} weights; a stage has one")
        ramps.append(tuple(weights))
    return ramps


def parse_recipe(hp) -> Recipe:
    """The stages, windows, layer sets and betas that the text fields spell, checked against each other."""
    starts = _numbers("stage_starts", hp.stage_starts) if hp.stage_starts.strip() else []
    if any(not 0 < b < 1 for b in starts) or starts != sorted(set(starts)):
        raise ConfigError(f"--stage_starts={hp.stage_starts!r} must be increasing fractions strictly between 0 and 1")
    n = len(starts) + 1
    lists = {name: getattr(hp, name) for name in ("stage_batch_tokens", "stage_seq_len", "stage_doc_clip", "stage_windows",
                                                  "stage_lr_mul")}
    for name, text in lists.items():
        if len(text.split(",")) != n:
            raise ConfigError(f"--{name}={text!r} needs {n} entries, one per stage (--stage_starts gives {n} stages)")
    batches = _numbers("stage_batch_tokens", hp.stage_batch_tokens, int)
    seq_lens = _numbers("stage_seq_len", hp.stage_seq_len, int)
    for b, t in zip(batches, seq_lens):
        if t <= 0 or b <= 0 or b % t:
            raise ConfigError(f"--stage_batch_tokens: {b} is not a positive multiple of its stage's --stage_seq_len "
                              f"{t} (a step is whole micro-batches)")
    clips = _numbers("stage_doc_clip", hp.stage_doc_clip, int)
    if min(clips) < 0:
        raise ConfigError(f"--stage_doc_clip={hp.stage_doc_clip!r}: clips are >= 0 (0: documents used whole)")
    if hp.doc_tails not in ("drop", "split"):
        raise ConfigError(f"--doc_tails={hp.doc_tails!r}: 'drop' (the clip discards the rest of a document) or "
                          "'split' (the rest goes on in further pieces)")
    if hp.doc_tails == "split" and 1 in clips:
        raise ConfigError(f"--doc_tails=split needs clips of 2 or more tokens (a piece is a BOS and clip - 1 "
                          f"tokens); --stage_doc_clip={hp.stage_doc_clip!r}")
    first_steps = [0] + [round(f * hp.num_iterations) for f in starts]
    if len(set(first_steps)) != n:
        raise ConfigError(f"--num_iterations={hp.num_iterations} is too few steps for {n} stages")
    ramps = _weight_ramps("mtp_weights", hp.mtp_weights, n)
    prefix = [w[0] for w in _weight_ramps("prefix_weights", hp.prefix_weights, n, per_stage_max=1)]
    stages = tuple(Stage(start, batch, seq_len, clip, _window_pair("stage_windows", w), lr, mtp, pre)
                   for start, batch, seq_len, clip, w, lr, mtp, pre
                   in zip(first_steps, batches, seq_lens, clips, hp.stage_windows.split(","),
                          _numbers("stage_lr_mul", hp.stage_lr_mul), ramps, prefix))
    if hp.untie_stage > n:
        raise ConfigError(f"--untie_stage={hp.untie_stage}: the schedule has {n} stages")
    skip = None
    if hp.skip_connection.strip():
        pair = _numbers("skip_connection", hp.skip_connection, int, ">")
        if len(pair) != 2 or not 0 <= pair[0] < pair[1] < hp.num_layers:
            raise ConfigError(f"--skip_connection={hp.skip_connection!r} must be a>b with layers 0 <= a < b < "
                              f"{hp.num_layers}, or empty")
        skip = (pair[0], pair[1])
    if not -1 <= hp.cache_layer < hp.num_layers - 1:
        raise ConfigError(f"--cache_layer={hp.cache_layer} must be -1 (off) or a layer before the last")
    paired, xsa = frozenset(_layer_set(hp, "paired_head_layers")), frozenset(_layer_set(hp, "xsa_layers"))
    if paired & xsa:
        raise ConfigError(f"--paired_head_layers and --xsa_layers share layer(s) {sorted(paired & xsa)}: "
                          "XSA needs each head's own value vector, which paired heads mix")
    gate_split = max(hp.gate_split_layer, 0)
    if gate_split >= hp.num_layers:
        raise ConfigError(f"--gate_split_layer={hp.gate_split_layer} must be a layer after the first (1 .. "
                          f"{hp.num_layers - 1}), or <= 0 for static gates")
    dc = frozenset(_layer_set(hp, "dc_layers"))
    if dc and not gate_split:
        raise ConfigError("--dc_layers takes its per-token weights from the dynamic gates: set --gate_split_layer "
                          "> 0, or --dc_layers= (none)")
    if dc & paired:
        raise ConfigError(f"--paired_head_layers and --dc_layers share layer(s) {sorted(dc & paired)}: DC mixes "
                          "the heads of one token, which paired heads interleave")
    last = hp.num_layers - 1
    if hp.mudd and (hp.layer_attention[last] == "-" or last not in _layer_set(hp, "value_embed_layers")
                    or hp.cache_layer < 0 or skip is None):
        raise ConfigError("--mudd mixes the last layer's values and the output from the first layer's input, the "
                          "cached layer (--cache_layer), the skip's source (--skip_connection) and the first value "
                          f"embedding: it needs all of them, and the last layer ({last}) with attention and a value "
                          "embedding (--value_embed_layers); or --mudd=false")
    betas = {}
    for group in ("embed", "value_embed", "scalar", "lambdas"):
        name = f"adam_betas_{group}"
        pair = _numbers(name, getattr(hp, name))
        if len(pair) != 2 or not all(0 <= b < 1 for b in pair):
            raise ConfigError(f"--{name}={getattr(hp, name)!r} must be two betas in [0, 1), e.g. 0.9,0.95")
        betas[group] = tuple(pair)
    return Recipe(stages=stages, extension_windows=_window_pair("extension_windows", hp.extension_windows),
                  final_val_windows=_window_pair("final_val_windows", hp.final_val_windows),
                  value_embed_layers=_layer_set(hp, "value_embed_layers"),
                  xsa_layers=xsa,
                  attn_gate_layers=frozenset(_layer_set(hp, "attn_gate_layers")),
                  key_offset_layers=frozenset(_layer_set(hp, "key_offset_layers")),
                  paired_head_layers=paired, dc_layers=dc, gate_split=gate_split, skip=skip, betas=betas,
                  prefix_loss=any(max(p) > 0 for p in prefix))


# Presets: named sets of flags, applied before the other flags (which win). A preset names the tracks it
# is a recipe for; `--help` lists what each sets.
PRESETS = {
    # CPU smoke runs and the tests: a few layers, a small width, short sequences, every recipe feature on; the
    # data cycles, so a little of one's own text is enough; no warm-up (nothing compiles on CPU).
    "tiny": dict(tracks=("small", "medium"), flags=dict(
        num_layers=4, model_dim=64, num_heads=2, head_dim=32, layer_attention="SS-L", value_embed_layers="1,3",
        xsa_layers="1", attn_gate_layers="3", key_offset_layers="3", paired_head_layers="0", skip_connection="1>2",
        cache_layer=1, gate_split_layer=2, mudd=True, dc_layers="3",
        bigram_buckets=1024, stage_seq_len="256,256,512", stage_starts="1/3,2/3", stage_batch_tokens="512,1024,1024",
        stage_doc_clip="128,256,256", stage_lr_mul="1,1.52,1.73", untie_stage=3,
        stage_windows="1:1,1:2,2:2", extension_windows="2:2", final_val_windows="2:4",
        mtp_weights="1,0.5>0;1,0.25>0;1", prefix_weights="0.25;0.25>0;0", num_iterations=20, extension_steps=2,
        val_seq_len=1024, val_tokens=4096,
        val_loss_every=10, warmup_steps=0, compile=False, cycle_train_data=True)),
}


def _parse_value(name: str, kind, text: str):
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name} expects true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{name} expects {kind.__name__}, got {text!r}") from None


def _field_type(f):
    return {"str": str, "int": int, "float": float, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]


def field_comments() -> dict[str, str]:
    """Each Hyperparameters field's trailing comment, read from this file's source: the text --help shows."""
    import inspect
    import io
    import tokenize

    comments, pending = {}, None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(Hyperparameters)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and pending is None:
            pending = tok.string  # a field's name at the class body's indent
        elif tok.type == tokenize.COMMENT and pending is not None:
            comments[pending] = tok.string.lstrip("# ")
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            pending = None
    return comments


def usage_line() -> str:
    return f"usage: {os.path.basename(__file__)} [--preset=NAME] [--FIELD=VALUE ...]; --help lists every flag"


def help_text() -> str:
    lines = [usage_line(), "",
             "presets (one at most, applied first; later flags override):"]
    for preset, spec in PRESETS.items():
        flags = " ".join(f"--{k}={v}" for k, v in spec["flags"].items())
        lines.append(f"  {preset} (tracks: {', '.join(spec['tracks'])}): {flags}")
    lines += ["", "flags (default, type): meaning"]
    comments = field_comments()
    for f in dataclasses.fields(Hyperparameters):
        kind = _field_type(f)
        allowed = FIELD_CHOICES.get(f.name)
        values = " | ".join(allowed) if allowed else "true | false" if kind is bool else kind.__name__
        lines.append(f"  --{f.name}={f.default!r}  ({values})" + (f": {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def parse_args(argv: list[str]) -> Hyperparameters:
    """`--name=value` or `--name value` for every Hyperparameters field, after an optional `--preset`."""
    fields = {f.name: _field_type(f) for f in dataclasses.fields(Hyperparameters)}
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --num_iterations=300")
        name, has_eq, value = arg[2:].partition("=")
        if not has_eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            value, i = argv[i + 1], i + 1
        pairs.append((name, value))
        i += 1
    presets = [value for name, value in pairs if name == "preset"]
    if len(presets) > 1:
        raise ConfigError(f"one --preset at most, got {', '.join(presets)}; pass the other's flags explicitly")
    overrides = {}
    for name, value in pairs:
        if name in fields:
            overrides[name] = _parse_value(name, fields[name], value)
        elif name != "preset":
            raise ConfigError(f"unknown flag --{name}; valid flags: --preset, "
                              + ", ".join(f"--{n}" for n in fields))
    if presets:
        spec = PRESETS.get(presets[0])
        if spec is None:
            raise ConfigError(f"unknown preset {presets[0]!r}; presets: {', '.join(PRESETS)}")
        track = Hyperparameters.track  # this file's default track
        if track not in spec["tracks"]:
            raise ConfigError(f"preset {presets[0]!r} is a recipe for the {', '.join(spec['tracks'])} track, "
                              f"not for this file's {track} track")
        overrides = {**spec["flags"], **overrides}
    return Hyperparameters(**overrides)


@dataclass(frozen=True)
class Derived:
    """Quantities that follow from the hyperparameters and the world size, checked once."""
    recipe: Recipe
    grad_accum: tuple[int, ...]  # rows per rank per optimizer step, in each stage
    joined_rows: tuple[int, ...]  # rows per micro-batch (one forward and backward), in each stage


def rows_per_micro_batch(rows: int, seq_len: int, micro_batch_tokens: int) -> int:
    """The largest divisor d of a rank's rows per step (so a step's micro-batches are alike) with d * seq_len
    <= micro_batch_tokens; 1 when no row fits."""
    fits = [d for d in range(1, rows + 1) if rows % d == 0 and d * seq_len <= micro_batch_tokens]
    return max(fits, default=1)


def rows_per_step_and_pass(stages, world_size: int, micro_batch_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(rows per rank per step, rows joined per pass) of each stage."""
    per_step = tuple(s.batch_tokens // (world_size * s.seq_len) for s in stages)
    return per_step, tuple(rows_per_micro_batch(n, s.seq_len, micro_batch_tokens) for n, s in zip(per_step, stages))


def derive(hp: Hyperparameters, world_size: int) -> Derived:
    recipe = parse_recipe(hp)
    for stage in recipe.stages:
        per_round = world_size * stage.seq_len
        if stage.batch_tokens % per_round:
            raise ConfigError(f"--stage_batch_tokens: {stage.batch_tokens} must be a multiple of world_size * "
                              f"its stage's --stage_seq_len = {world_size} * {stage.seq_len} = {per_round}: e.g. "
                              f"{max(stage.batch_tokens // per_round, 1) * per_round}, or change --stage_seq_len")
    if hp.val_tokens % hp.val_seq_len:
        raise ConfigError(f"--val_tokens={hp.val_tokens} must be a multiple of --val_seq_len={hp.val_seq_len}: "
                          f"e.g. --val_tokens={max(hp.val_tokens // hp.val_seq_len, 1) * hp.val_seq_len}, "
                          f"or --val_seq_len={hp.val_tokens} if it divides {hp.val_tokens} evenly")
    grad_accum, joined = rows_per_step_and_pass(recipe.stages, world_size, hp.micro_batch_tokens)
    return Derived(recipe=recipe, grad_accum=grad_accum, joined_rows=joined)


# -----------------------------------------------------------------------------
# Distributed setup
# -----------------------------------------------------------------------------


def setup_distributed(hp: Hyperparameters) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun: NCCL on GPU, gloo on CPU; otherwise one process."""
    use_cuda = hp.device == "cuda" or (hp.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible")
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    assert dist.get_rank() == rank and dist.get_world_size() == world_size
    return rank, world_size, device


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
# X or A. Names follow the Turbo-Muon pull request to modded-nanogpt (by thib-s) and microsoft/dion
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


# Launch configs (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), chosen once on an H100 with
# `benchmarks/bench_orthogonalize.py --sweep` over the 124M model's stacks and their per-rank chunks
# (README: "Orthogonalization kernels"), so nothing autotunes at start-up: 128x128x64, 4 warps, 3
# stages was at or near the fastest everywhere, except for the symmetric kernels (lines 1, 2) when
# their lower-triangle tiles number at most half the SMs: smaller tiles give 4x the programs there.
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


def _triton_runs_on(t: torch.Tensor) -> bool:
    """Whether this file's Triton kernels can take tensor t: on CUDA, or anywhere under the interpreter."""
    return HAS_TRITON and (t.is_cuda or _kernels_interpreted())


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
        if not _triton_runs_on(t):
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
    # fraction 1/BLOCK_M of what an unfused |C|.sum(-1) pass over the M x M output would read.
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


# Custom ops are registered under this file's name, so both trainer files can be imported in one process.
OP_NAMESPACE = os.path.splitext(os.path.basename(__file__))[0]

# Transposed copy of a float8 matrix for the FP8 head's weight gradient: cuBLAS float8 matmuls on
# Hopper take both operands K-major, so g^T x needs g [tokens, vocab] laid out as [vocab, tokens].
# A copy through torch's strided elementwise kernel moves one byte per 32-byte memory sector on one side;
# this one moves tiles (Triton stages the transpose through shared memory, both sides coalesced).
TRANSPOSE_LAUNCH = (128, 256, 8)  # (rows, columns of a tile, warps) on GPU: the fastest of bench_fused.py's sweep
if HAS_TRITON:

    @triton.jit
    def _transpose_kernel(X, Y, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit: M * N may pass 2^31
        cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tile = tl.load(X + rows[:, None] * N + cols[None, :], mask=mask)
        tl.store(Y + cols[None, :] * M + rows[:, None], tile, mask=mask)


@torch.library.custom_op(f"{OP_NAMESPACE}::transpose_bytes", mutates_args=())
def transpose_bytes(x: torch.Tensor) -> torch.Tensor:
    """x.T.contiguous() for a contiguous 2-d tensor of 1-byte elements (float8); Triton on GPU or when
    interpreted, torch otherwise. An opaque op, so the compiler cannot fuse the transposed store into
    the kernel that produced x (where it is uncoalesced)."""
    if x.dim() != 2 or x.element_size() != 1 or not x.is_contiguous():
        raise ValueError(f"transpose_bytes takes a contiguous 2-d tensor of 1-byte elements, got "
                         f"{tuple(x.shape)} {x.dtype}")
    if not _triton_runs_on(x):
        return x.T.contiguous()
    M, N = x.shape
    y = torch.empty((N, M), dtype=x.dtype, device=x.device)
    bm, bn, warps = (16, 32, 1) if _kernels_interpreted() else TRANSPOSE_LAUNCH
    _transpose_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](x.view(torch.uint8), y.view(torch.uint8), M, N,
                                                               BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return y


@transpose_bytes.register_fake
def _(x):
    return x.new_empty(x.size(1), x.size(0))


# Softcapped multi-target cross-entropy, forward and backward each one pass over the logits (the speedrun's
# fused loss, records #60, #79 and #88, in our own form). For raw logits z [T, V] (the head's output), the
# softcapped logits are u = cap * sigmoid((z + offset) / temp), bounded in (0, cap), so sum_j exp(u_j)
# needs no running maximum. Row t has targets y_tk in a [T, K] matrix (-100: none) with weights w_k: the
# tokens t+1, t+2, ... (multi-token prediction) and the next token's byte prefix (target_matrix). Row t's
# loss is sum_k w_k (lse_t - u_t[y_tk]) over its targets, and the gradient is
#   dL/dz_tj = g_t (S_t p_tj - sum_k w_k [y_tk = j]) cap s_tj (1 - s_tj) / temp,
# with p = softmax(u), s = sigmoid((z + offset) / temp), S_t the weights of row t's targets and g_t the
# incoming gradient. Unfused, autograd makes several passes over [T, V] fp32 arrays per offset.
CE_LAUNCH = (4096, 16)  # (vocabulary columns per loop iteration of a row's program, warps) on GPU
CE_LAUNCH_INTERPRET = (64, 4)
# The transcendental forms of softcap_mtp_ce_with_grad's two passes (the FP8 head's loss and e5m2 gradient), which
# special-function (MUFU) instructions bound. (loss pass, gradient pass):
# - "exact": the sigmoid as 1 / (1 + 2^a) (ex2 and rcp) and the softmax's 2^b: 3 MUFU per column.
# - "tanh": s = (1 + tanh(x / 2)) / 2 by tanh.approx.f32 (relative error 2^-11), so 2^(cap2 s) = 2^(c t + c):
#   2 MUFU per column. In the loss pass the logged training loss carries the rounding: at most 23 * 2^-12 per
#   softcapped logit, so a row's loss at most (sum of its weights) * 23 * 2^-12 (the targets' own u stay exact);
#   validation's loss kernel is always exact. In the gradient, s (1 - s) = (1 - t^2) / 4 has relative error
#   about 2^-10 t^2 / (1 - t^2): below e5m2's 2^-3 for |x| < 6, i.e. raw logits within about -50 .. 40.
# (The float16-pair forms, tanh.approx.f16x2 and ex2.approx.f16x2, compile for sm_90 to two MUFU instructions
# each, one per half: no fewer than float32's.)
CE_PASS_MATH = ("tanh", "tanh")  # bench_fused.py --ce_pass_math times the forms
CE_PASS_MATH_CHOICES = ("exact", "tanh")


def ce_pass_math_indices(forms) -> tuple[int, int]:
    """(LOSS_MATH, GRAD_MATH) of the loss kernel for CE_PASS_MATH-style forms (loss pass, gradient pass)."""
    if len(forms) != 2 or not set(forms) <= set(CE_PASS_MATH_CHOICES):
        raise ValueError(f"the loss kernel's pass forms are two of {', '.join(CE_PASS_MATH_CHOICES)} "
                         f"(loss pass, gradient pass); got {tuple(forms)}")
    return CE_PASS_MATH_CHOICES.index(forms[0]), CE_PASS_MATH_CHOICES.index(forms[1])


def softcap_logits(z: torch.Tensor, cap: float, offset: float, temp: float) -> torch.Tensor:
    """The softcapped logits u = cap * sigmoid((z + offset) / temp) of raw logits z (fp32): what the loss
    scores and what sampling draws from."""
    return cap * torch.sigmoid((z.float() + offset) / temp)


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's encoder.json spells each byte as one printable character: printable Latin-1 bytes as
    themselves, the other 68 bytes as chr(256 + i) in byte order (GPT-2's bytes_to_unicode). Character ->
    byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def prefix_token_table(encoder: dict[str, int], vocab_size: int) -> np.ndarray:
    """[vocab_size] int64: for each token id, the id of the token whose bytes are the longest proper prefix of
    its bytes, or -1 where no proper prefix is a token (single bytes, special tokens, padding ids). `encoder`
    is GPT-2's encoder.json (token spelled as in _gpt2_byte_decoder -> id); special tokens such as
    <|endoftext|> are left out: their text is no byte string of the data."""
    decode = _gpt2_byte_decoder()
    by_bytes = {}
    for text, token in encoder.items():
        if all(c in decode for c in text) and not (text.startswith("<|") and text.endswith("|>")):
            by_bytes[bytes(decode[c] for c in text)] = token
    table = np.full(vocab_size, -1, dtype=np.int64)
    for spelled, token in by_bytes.items():
        for cut in range(len(spelled) - 1, 0, -1):
            prefix = by_bytes.get(spelled[:cut])
            if prefix is not None:
                table[token] = prefix
                break
    return table


def load_prefix_table(hp) -> np.ndarray:
    """prefix_token_table of --prefix_vocab (a relative path is looked up from here, then beside this file);
    a ConfigError says what to do when the file is missing or is another vocabulary."""
    path = Path(hp.prefix_vocab)
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parent / hp.prefix_vocab
    try:
        encoder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--prefix_vocab={hp.prefix_vocab!r}: cannot read it ({type(e).__name__}); it is GPT-2's "
                          "encoder.json (this repository ships it in data/gpt2/), or train without the prefix "
                          "loss: --prefix_weights with zeros (e.g. 0;0;0)") from None
    if not isinstance(encoder, dict) or len(encoder) != hp.tokenizer_vocab:
        raise ConfigError(f"--prefix_vocab={hp.prefix_vocab!r} holds {len(encoder)} tokens, not --tokenizer_vocab="
                          f"{hp.tokenizer_vocab}: the prefix targets need the data's own tokenizer")
    return prefix_token_table(encoder, hp.vocab_size)


def target_matrix(targets: torch.Tensor, offsets: int, prefix_table: torch.Tensor | None = None,
                  row_pos: torch.Tensor | None = None) -> torch.Tensor:
    """[T, K] int64 targets of each position: the tokens 1 .. `offsets` ahead (the next-token targets shifted;
    -100 past the end of the position's row, rows joined at row_pos, row_positions; None: one row), then, given
    prefix_table [V], the next token's byte-prefix token (-100 where it has none)."""
    columns = [F.pad(targets[k:], (0, k), value=-100) for k in range(offsets)]
    if row_pos is not None:  # position t + k is in t's row iff its place there is t's plus k
        columns = [torch.where(F.pad(row_pos[k:], (0, k), value=-1) == row_pos + k, c, -100)
                   for k, c in enumerate(columns)]
    if prefix_table is not None:
        prefix = prefix_table[targets.clamp_min(0)]
        columns.append(torch.where((targets >= 0) & (prefix >= 0), prefix, -100))
    return torch.stack(columns, dim=1)


def softcap_mtp_ce_reference(z, targets, weights, cap: float, offset: float, temp: float):
    """(row losses [T], row log-sum-exp [T]) in fp32 for targets [T, K] (target_matrix), in plain torch: the
    kernel's specification, and the CPU path (autograd differentiates it)."""
    u = softcap_logits(z, cap, offset, temp)
    logp = torch.log_softmax(u, dim=-1)
    picked = logp.gather(1, targets.clamp_min(0))
    rows = -(torch.where(targets >= 0, picked, 0.0) * weights).sum(dim=1)
    return rows, (u[:, 0] - logp[:, 0]).detach()


def softcap_mtp_ce_backward_reference(z, targets, weights, lse, grad, cap: float, offset: float, temp: float):
    """dL/dz [T, V] in z's dtype for row gradients grad [T] (the formula above), in plain torch."""
    s = torch.sigmoid((z.float() + offset) / temp)
    p = torch.exp(cap * s - lse[:, None])
    dl = torch.zeros_like(p)
    valid = targets >= 0
    rows = torch.arange(z.size(0), device=z.device)[:, None].expand_as(targets)
    hit = -weights.float().expand_as(targets)
    dl.index_put_((rows[valid], targets[valid]), hit[valid], accumulate=True)
    dl += (weights * valid).sum(dim=1)[:, None] * p
    return (grad[:, None] * dl * cap * s * (1 - s) / temp).to(z.dtype)


if HAS_TRITON:

    # Transcendentals of the loss kernels: on GPU one MUFU instruction each (PTX ex2 / rcp .approx.ftz, relative
    # error below 2^-22, no range fix-ups around them); in the interpreter, which runs no PTX, tl.exp2 and a division.
    _CE_FAST_MATH = tl.constexpr(not _kernels_interpreted())
    LOG2_E = tl.constexpr(1.4426950408889634)  # exp(x) = 2^(x log2(e))

    @triton.jit
    def _exp2(x):
        if _CE_FAST_MATH:
            y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                          pack=1)
        else:
            y = tl.exp2(x)
        return y

    @triton.jit
    def _softcap_sigmoid(z, neg_a, neg_b):
        """s = sigmoid((z + offset) / temp) = 1 / (1 + 2^(neg_a z + neg_b)), neg_a = -log2(e) / temp and
        neg_b = offset neg_a (per program)."""
        d = 1.0 + _exp2(z * neg_a + neg_b)
        if _CE_FAST_MATH:
            s = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [d], dtype=tl.float32, is_pure=True,
                                          pack=1)
        else:
            s = 1.0 / d
        return s

    @triton.jit
    def _softcap_tanh(z, neg_a, neg_b):
        """t = tanh(((z + offset) / temp) / 2), so the sigmoid s = (1 + t) / 2 with one MUFU instruction instead of
        _softcap_sigmoid's two; neg_a, neg_b as there (they carry -log2(e), which the tanh's argument drops)."""
        return _tanh(z * (neg_a * (-0.5 / LOG2_E)) + neg_b * (-0.5 / LOG2_E))  # one FFMA per column

    @triton.jit
    def _tanh(x):
        """tanh(x), float32: one MUFU instruction on GPU (tanh.approx.f32, relative error 2^-11)."""
        if _CE_FAST_MATH:
            y = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                          pack=1)
        else:
            y = 2.0 / (1.0 + tl.exp2(x * (-2.0 * LOG2_E))) - 1.0
        return y


    @triton.jit
    def _load_block(z_row, cols, V, MASKED: tl.constexpr):
        """A row's columns `cols` in fp32: masked to those below V (0 past it) in the partial last block only."""
        if MASKED:
            z = tl.load(z_row + cols, mask=cols < V, other=0.0)
        else:
            z = tl.load(z_row + cols)
        return z.to(tl.float32)

    @triton.jit
    def _ce_block_exp(z_row, start, V, neg_a, neg_b, cap2, BLOCK: tl.constexpr, MASKED: tl.constexpr,
                      MATH: tl.constexpr = 0):
        """exp(u) = 2^(cap2 s) (cap2 = cap log2(e)) of the columns start .. start + BLOCK of a row (0 past V when
        MASKED; unmasked blocks lie inside). MATH 1 (CE_PASS_MATH's "tanh"): s = (1 + t) / 2 with t from
        _softcap_tanh, so 2^(cap2 s) = 2^(c t + c), c = cap2 / 2."""
        cols = start + tl.arange(0, BLOCK)
        z = _load_block(z_row, cols, V, MASKED)
        if MATH == 1:
            half = cap2 * 0.5
            e = _exp2(half * _softcap_tanh(z, neg_a, neg_b) + half)
        else:
            e = _exp2(cap2 * _softcap_sigmoid(z, neg_a, neg_b))
        if MASKED:
            e = tl.where(cols < V, e, 0.0)
        return e

    @triton.jit
    def _ce_row_loss(z_row, TGT, W, row, V, cap, offset, inv_temp, K: tl.constexpr, BLOCK: tl.constexpr,
                     MATH: tl.constexpr = 0):
        """(sum_k W[k] (lse - u[TGT[row, k]]) over the row's targets, lse) of one row z_row of Z. Whole blocks of
        columns unmasked, then the partial one; MATH as _ce_block_exp's (the targets' u stay exact)."""
        neg_a = -inv_temp * LOG2_E
        neg_b = offset * neg_a
        cap2 = cap * LOG2_E
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        whole = V - V % BLOCK
        for start in range(0, whole, BLOCK):
            acc += _ce_block_exp(z_row, start, V, neg_a, neg_b, cap2, BLOCK, False, MATH)
        if whole < V:
            acc += _ce_block_exp(z_row, whole, V, neg_a, neg_b, cap2, BLOCK, True, MATH)
        lse = tl.log(tl.sum(acc, axis=0))
        loss = 0.0
        for k in tl.static_range(K):
            y = tl.load(TGT + row * K + k)
            hit = y >= 0
            zy = tl.load(z_row + tl.maximum(y, 0), mask=hit, other=0.0).to(tl.float32)
            u_y = cap * _softcap_sigmoid(zy, neg_a, neg_b)
            loss += tl.where(hit, tl.load(W + k) * (lse - u_y), 0.0)
        return loss, lse

    @triton.jit
    def _ce_block_grad(z_row, out_row, TGT, W, row, start, V, neg_a, neg_b, cap2, lse2, scale, total, K: tl.constexpr,
                       BLOCK: tl.constexpr, CLAMP: tl.constexpr, MASKED: tl.constexpr, MATH: tl.constexpr = 0):
        """out_row's columns start .. start + BLOCK (those below V when MASKED) = scale (total p - targets' weights)
        s (1 - s), p = 2^(cap2 s - lse2) the softmax, clamped, in out_row's dtype. MATH 1 (CE_PASS_MATH's "tanh"):
        t from _softcap_tanh, so p = 2^(c t + c - lse2) with c = cap2 / 2 and s (1 - s) = (1 - t^2) / 4."""
        cols = start + tl.arange(0, BLOCK)
        z = _load_block(z_row, cols, V, MASKED)
        if MATH == 1:
            half = cap2 * 0.5
            t = _softcap_tanh(z, neg_a, neg_b)
            dl = total * _exp2(half * t + (half - lse2))
        else:
            s = _softcap_sigmoid(z, neg_a, neg_b)
            dl = total * _exp2(cap2 * s - lse2)
        # The row's K targets fall in at most K of the ~13 blocks of columns: the per-column comparisons run only
        # there (a branch per block, the same for the whole program).
        in_block = 0
        for k in tl.static_range(K):
            y = tl.load(TGT + row * K + k)
            in_block += ((y >= start) & (y < start + BLOCK)).to(tl.int32)
        if in_block > 0:
            for k in tl.static_range(K):
                y = tl.load(TGT + row * K + k)
                dl -= tl.where(cols == y, tl.load(W + k), 0.0)
        if MATH == 1:
            dz = (scale * 0.25) * (dl * (1.0 - t * t))
        else:
            dz = scale * (dl * (s - s * s))
        if CLAMP > 0:
            dz = tl.minimum(tl.maximum(dz, -CLAMP), CLAMP)
        if MASKED:
            tl.store(out_row + cols, dz.to(out_row.dtype.element_ty), mask=cols < V)
        else:
            tl.store(out_row + cols, dz.to(out_row.dtype.element_ty))

    @triton.jit
    def _ce_row_grad(z_row, out_row, TGT, W, row, V, lse, g, cap, offset, inv_temp, K: tl.constexpr,
                     BLOCK: tl.constexpr, CLAMP: tl.constexpr, MATH: tl.constexpr = 0):
        """out_row = g dL/dz of one row (the formula above), clamped to +-CLAMP when CLAMP > 0, in out_row's dtype:
        whole blocks of columns unmasked, then the partial one; MATH as _ce_block_grad's."""
        total = 0.0
        for k in tl.static_range(K):
            y = tl.load(TGT + row * K + k)
            total += tl.where(y >= 0, tl.load(W + k), 0.0)
        neg_a = -inv_temp * LOG2_E
        neg_b = offset * neg_a
        cap2 = cap * LOG2_E
        lse2 = lse * LOG2_E
        scale = g * cap * inv_temp
        whole = V - V % BLOCK
        for start in range(0, whole, BLOCK):
            _ce_block_grad(z_row, out_row, TGT, W, row, start, V, neg_a, neg_b, cap2, lse2, scale, total, K, BLOCK,
                           CLAMP, False, MATH)
        if whole < V:
            _ce_block_grad(z_row, out_row, TGT, W, row, whole, V, neg_a, neg_b, cap2, lse2, scale, total, K, BLOCK,
                           CLAMP, True, MATH)

    @triton.jit
    def _softcap_mtp_ce_fwd_kernel(Z, TGT, W, ROWS, LSE, V, stride_z, cap, offset, inv_temp,
                                   K: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row t of Z [T, V] (fp32/bf16): ROWS[t] = sum_k W[k] (lse - u[TGT[t, k]]), LSE[t]."""
        row = tl.program_id(0)
        loss, lse = _ce_row_loss(Z + row.to(tl.int64) * stride_z, TGT, W, row, V, cap, offset, inv_temp, K, BLOCK)
        tl.store(ROWS + row, loss)
        tl.store(LSE + row, lse)

    @triton.jit
    def _softcap_mtp_ce_bwd_kernel(Z, TGT, W, LSE, G, DZ, V, stride_z, stride_dz, cap, offset, inv_temp,
                                   K: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row t: DZ[t] = G[t] dL/dZ[t], in DZ's dtype."""
        row = tl.program_id(0)
        _ce_row_grad(Z + row.to(tl.int64) * stride_z, DZ + row.to(tl.int64) * stride_dz, TGT, W, row, V,
                     tl.load(LSE + row), tl.load(G + row), cap, offset, inv_temp, K, BLOCK, 0.0)

    @triton.jit
    def _softcap_mtp_ce_grad_kernel(Z, TGT, W, ROWS, DZ, V, stride_z, stride_dz, cap, offset, inv_temp, grad_mul,
                                    K: tl.constexpr, BLOCK: tl.constexpr, CLAMP: tl.constexpr,
                                    LOSS_MATH: tl.constexpr = 0, GRAD_MATH: tl.constexpr = 0):
        """One program per row t: ROWS[t] as the forward kernel, then, in a second pass over the row (mostly from
        L2), DZ[t] = grad_mul dL/dZ[t] at a unit row gradient, clamped to +-CLAMP, in DZ's dtype. LOSS_MATH and
        GRAD_MATH: the passes' forms, CE_PASS_MATH's indices."""
        row = tl.program_id(0)
        z_row = Z + row.to(tl.int64) * stride_z
        loss, lse = _ce_row_loss(z_row, TGT, W, row, V, cap, offset, inv_temp, K, BLOCK, LOSS_MATH)
        tl.store(ROWS + row, loss)
        _ce_row_grad(z_row, DZ + row.to(tl.int64) * stride_dz, TGT, W, row, V, lse, grad_mul, cap, offset, inv_temp,
                     K, BLOCK, CLAMP, GRAD_MATH)


def _ce_launch():
    """(columns per iteration, warps) of the loss kernels."""
    return CE_LAUNCH_INTERPRET if _kernels_interpreted() else CE_LAUNCH


@torch.library.custom_op(f"{OP_NAMESPACE}::softcap_mtp_ce", mutates_args=())
def softcap_mtp_ce(z: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, cap: float, offset: float,
                   temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(row losses [T], row log-sum-exp [T]), fp32, of raw logits z [T, V] (contiguous rows), targets [T, K]
    (target_matrix: int64, contiguous, -100: none) and their weights [K] (fp32): the fused kernel on GPU, the
    reference otherwise."""
    if not _triton_runs_on(z):
        return softcap_mtp_ce_reference(z, targets, weights, cap, offset, temp)
    T, V = z.shape
    rows = torch.empty(T, dtype=torch.float32, device=z.device)
    lse = torch.empty(T, dtype=torch.float32, device=z.device)
    block, warps = _ce_launch()
    _softcap_mtp_ce_fwd_kernel[(T,)](z, targets.contiguous(), weights, rows, lse, V, z.stride(0), cap, offset,
                                     1 / temp, K=weights.numel(), BLOCK=block, num_warps=warps)
    return rows, lse


@softcap_mtp_ce.register_fake
def _(z, targets, weights, cap, offset, temp):
    return z.new_empty(z.size(0), dtype=torch.float32), z.new_empty(z.size(0), dtype=torch.float32)


@torch.library.custom_op(f"{OP_NAMESPACE}::softcap_mtp_ce_backward", mutates_args=())
def softcap_mtp_ce_backward(z: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, lse: torch.Tensor,
                            grad: torch.Tensor, cap: float, offset: float, temp: float) -> torch.Tensor:
    """dL/dz [T, V] in z's dtype for row gradients grad [T] (fp32)."""
    if not _triton_runs_on(z):
        return softcap_mtp_ce_backward_reference(z, targets, weights, lse, grad, cap, offset, temp)
    T, V = z.shape
    dz = torch.empty_like(z)
    block, warps = _ce_launch()
    _softcap_mtp_ce_bwd_kernel[(T,)](z, targets.contiguous(), weights, lse, grad.contiguous(), dz, V, z.stride(0),
                                     dz.stride(0), cap, offset, 1 / temp, K=weights.numel(), BLOCK=block,
                                     num_warps=warps)
    return dz


@softcap_mtp_ce_backward.register_fake
def _(z, targets, weights, lse, grad, cap, offset, temp):
    return torch.empty_like(z)


def _softcap_mtp_ce_setup(ctx, inputs, output):
    z, targets, weights, cap, offset, temp = inputs
    ctx.save_for_backward(z, targets, weights, output[1])
    ctx.softcap = (cap, offset, temp)


def _softcap_mtp_ce_grad(ctx, grad_rows, grad_lse):
    z, targets, weights, lse = ctx.saved_tensors
    dz = softcap_mtp_ce_backward(z, targets, weights, lse, grad_rows.float(), *ctx.softcap)
    return dz, None, None, None, None, None


softcap_mtp_ce.register_autograd(_softcap_mtp_ce_grad, setup_context=_softcap_mtp_ce_setup)


@torch.library.custom_op(f"{OP_NAMESPACE}::softcap_mtp_ce_with_grad", mutates_args=())
def softcap_mtp_ce_with_grad(z: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, cap: float, offset: float,
                             temp: float, grad_mul: float, clamp: float, out_dtype: torch.dtype
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row losses [T] fp32, grad_mul dL/dz [T, V] at unit row gradients, clamped to +-clamp, in out_dtype): the
    loss and its logit gradient in one kernel (a second pass over each row in the same program), for callers
    that know the row gradient's form in advance (FP8HeadLoss: a sum)."""
    if not _triton_runs_on(z):
        rows, lse = softcap_mtp_ce_reference(z, targets, weights, cap, offset, temp)
        dz = softcap_mtp_ce_backward_reference(z.float(), targets, weights, lse, torch.ones_like(rows), cap, offset, temp)
        return rows, (dz * grad_mul).clamp(-clamp, clamp).to(out_dtype)
    T, V = z.shape
    rows = torch.empty(T, dtype=torch.float32, device=z.device)
    dz = torch.empty(T, V, dtype=out_dtype, device=z.device)
    block, warps = _ce_launch()
    loss_math, grad_math = ce_pass_math_indices(CE_PASS_MATH)
    _softcap_mtp_ce_grad_kernel[(T,)](z, targets.contiguous(), weights, rows, dz, V, z.stride(0), dz.stride(0),
                                      cap, offset, 1 / temp, grad_mul, K=weights.numel(), BLOCK=block, CLAMP=clamp,
                                      LOSS_MATH=loss_math, GRAD_MATH=grad_math, num_warps=warps)
    return rows, dz


@softcap_mtp_ce_with_grad.register_fake
def _(z, targets, weights, cap, offset, temp, grad_mul, clamp, out_dtype):
    return z.new_empty(z.size(0), dtype=torch.float32), z.new_empty(z.shape, dtype=out_dtype)


# The MLP's matmuls with the activation fused (the speedrun's records #59, in our own kernel): the
# up-projection's epilogue applies relu(.)^2 to the accumulator, so pre = x w1^T is never written; the
# backward's product grad w2^T is multiplied in its epilogue by the activation's derivative 2 relu(pre) = 2 sqrt(post).
# Two elementwise passes over the [tokens, 4 dim] activations go, and only post is kept for the backward.
# Persistent (one program per SM walks the output tiles) with TMA tensor descriptors, as the public kernel
# (frontier #59): the tiles' loads and the store are bulk copies that the hardware bounds-checks, so ragged
# edges need no masks (README: "fused MLP" for the measured history).
if HAS_TRITON:
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def _mlp_matmul_kernel(a_desc, b_desc, aux_desc, c_desc, scale, amax, a_scale, M, N, K, programs,
                           EPILOGUE: tl.constexpr, SCALED: tl.constexpr, AMAX: tl.constexpr, A_CAST: tl.constexpr,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C = epilogue(A B^T) for A [M, K], B [N, K] (descriptors of BLOCK_M x BLOCK_K and BLOCK_N x BLOCK_K
        tiles), fp32 accumulation (float8 operands: wgmma's reduced-precision accumulation, Triton's default, like
        the FP8 head's fast accumulation), times the 0-d fp32 *scale if SCALED (their scales). EPILOGUE 0:
        relu(.)^2 (the MLP's activation); 1: (.) * 2 sqrt(AUX) with AUX [M, N] = relu(pre)^2 (its gradient).
        Program p computes tiles p, p + programs, ...; tiles go in groups of GROUP_M rows so programs working at
        the same time share B's tiles in L2. Reads past an edge are zeros and writes past it are dropped by the
        TMA unit. EPILOGUE 2: the product alone. AMAX: *amax becomes the largest output entry (epilogue 0's are
        >= 0) over all tiles, by atomic max. A_CAST: A is bf16, cast in registers to float8 e4m3 at A / *a_scale
        (saturating) before each product, B float8 e4m3 (the FP8 down-projection from bf16 post)."""
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        if A_CAST:
            a_inv = 1.0 / tl.load(a_scale)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, programs):
            group = tile // (GROUP_M * tiles_n)
            first_m = group * GROUP_M
            rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
            row0 = (first_m + (tile % (GROUP_M * tiles_n)) % rows_in_group) * BLOCK_M
            col0 = (tile % (GROUP_M * tiles_n)) // rows_in_group * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                a = a_desc.load([row0, k])
                if A_CAST:
                    a = tl.minimum(tl.maximum(a.to(tl.float32) * a_inv, -448.0), 448.0).to(tl.float8e4nv)
                acc = tl.dot(a, b_desc.load([col0, k]).T, acc, input_precision=PRECISION)
            if SCALED:
                acc = acc * tl.load(scale)
            if EPILOGUE == 0:
                r = tl.maximum(acc, 0.0)
                out = r * r
            elif EPILOGUE == 1:
                out = acc * 2 * tl.sqrt(aux_desc.load([row0, col0]).to(tl.float32))
            else:
                out = acc
            if AMAX:
                tl.atomic_max(amax, tl.max(tl.max(out, axis=1), axis=0))
            c_desc.store([row0, col0], out.to(c_desc.dtype))


MLP_MATMUL_CONFIG = (128, 256, 64, 8, 3)  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages on GPU (the public's tile)
MLP_MATMUL_CONFIG_FP8 = (128, 256, 128, 8, 3)  # float8 operands: the same bytes per K step (the public's K tile)
MLP_MATMUL_CONFIG_INTERPRET = (32, 32, 32, 4, 1)
MLP_MATMUL_PROGRAMS_INTERPRET = 3  # fewer programs than tiles, so the interpreter walks the persistent loop
MLP_MATMUL_SHARED_SLACK = 1024  # bytes beyond the tiles: Triton adds the pipeline's barriers (32 at 4 stages)


def mlp_matmul_shared_bytes(config: tuple, element_size: int, out_size: int | None = None) -> int:
    """Shared memory the kernel needs at tile `config`: `stages` buffers of an A and a B tile for the pipeline
    (element_size bytes each) and the output tile staged for its TMA store (out_size bytes, default the same),
    plus slack for the barriers."""
    bm, bn, bk, _, stages = config
    return (stages * (bm + bn) * bk * element_size + bm * bn * (out_size or element_size)
            + MLP_MATMUL_SHARED_SLACK)


@functools.cache
def gpu_properties(index: int) -> dict:
    """Triton's view of GPU `index` (keys max_shared_mem: bytes a program may use, multiprocessor_count)."""
    return triton.runtime.driver.active.utils.get_device_properties(index)


_MLP_TILE_WARNED: set[tuple] = set()


def mlp_tile_fits(config: tuple, element_size: int, device: torch.device, out_size: int | None = None) -> bool:
    """Whether the kernel at `config` fits the shared memory of GPU `device`. The default tile wants ~209 KiB,
    which Hopper has and an A100 (163 KiB) or a consumer GPU does not: there the MLP takes the torch formula,
    with one warning."""
    need = mlp_matmul_shared_bytes(config, element_size, out_size)
    have = gpu_properties(device.index)["max_shared_mem"]
    if need > have and (device.index, config) not in _MLP_TILE_WARNED:
        _MLP_TILE_WARNED.add((device.index, config))
        warnings.warn(f"--fused_mlp: the MLP kernel's tile {config} needs {need} bytes of shared memory, GPU "
                      f"{device.index} has {have}: the MLP runs as cuBLAS matmuls and elementwise kernels instead "
                      "(as with --fused_mlp=false)", stacklevel=2)
    return need <= have


def _tma_compatible(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned base addresses and row strides (unit stride along a row)."""
    return all(t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in tensors)


def _mlp_matmul_out_dtype(a: torch.Tensor, scale, a_scale) -> torch.dtype:
    """a's dtype, but bf16 when a is float8 (a scale without an a_scale: the FP8 up-projection)."""
    return a.dtype if scale is None or a_scale is not None else torch.bfloat16


def _mlp_matmul_run(a, b, aux, epilogue: int, scale, a_scale, amax) -> torch.Tensor:
    """mlp_matmul's body; `amax` (fp32 [1], zeros) receives the largest output entry (epilogue 0)."""
    a, b = a.contiguous(), b.contiguous()
    aux = None if aux is None else aux.contiguous()
    M, K = a.shape
    N = b.size(0)
    out_dtype = _mlp_matmul_out_dtype(a, scale, a_scale)
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    interpreted = _triton_runs_on(a) and _kernels_interpreted()
    config = (MLP_MATMUL_CONFIG_INTERPRET if interpreted else MLP_MATMUL_CONFIG_FP8 if a.element_size() == 1
              else MLP_MATMUL_CONFIG)
    if not (_triton_runs_on(a) and _tma_compatible(a, b, c, *([] if aux is None else [aux]))
            and (interpreted or mlp_tile_fits(config, a.element_size(), a.device, c.element_size()))):
        if a_scale is not None:
            prod = (_e4m3(a.float(), a_scale).float() @ b.float().T) * scale
        else:
            prod = (a @ b.T).float() if scale is None else (a.float() @ b.float().T) * scale
        out = (torch.relu(prod).square() if epilogue == 0 else prod * 2 * aux.float().sqrt() if epilogue == 1
               else prod)
        if amax is not None:
            amax.copy_(out.amax().reshape(1))
        return out.to(out_dtype)
    bm, bn, bk, warps, stages = config
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    sms = MLP_MATMUL_PROGRAMS_INTERPRET if interpreted else gpu_properties(a.device.index)["multiprocessor_count"]
    programs = min(tiles, sms)
    if a.is_cuda:
        # The driver builds host TMA descriptors in the calling thread, which needs a current CUDA context;
        # autograd's device thread has none until its first kernel launch, so a backward that starts here would
        # fail ("invalid device context", pytorch#124565). set_device binds it, as Inductor's generated code does.
        torch.cuda.set_device(a.device)
    a_desc, b_desc = TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk])
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn])
    aux_desc = c_desc if aux is None else TensorDescriptor.from_tensor(aux, [bm, bn])
    unused = c  # a pointer for the arguments a launch does not read
    _mlp_matmul_kernel[(programs,)](a_desc, b_desc, aux_desc, c_desc, unused if scale is None else scale,
                                    unused if amax is None else amax, unused if a_scale is None else a_scale,
                                    M, N, K, programs, EPILOGUE=epilogue, SCALED=scale is not None,
                                    AMAX=amax is not None, A_CAST=a_scale is not None,
                                    PRECISION=_dot_precision(a.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                    GROUP_M=8, num_warps=warps, num_stages=stages)
    return c


@torch.library.custom_op(f"{OP_NAMESPACE}::mlp_matmul", mutates_args=())
def mlp_matmul(a: torch.Tensor, b: torch.Tensor, aux: torch.Tensor | None, epilogue: int,
               scale: torch.Tensor | None = None, a_scale: torch.Tensor | None = None) -> torch.Tensor:
    """epilogue(a b^T) for a [M, K], b [N, K] in a's dtype: 0 gives relu(a b^T)^2, 1 gives (a b^T) 2 sqrt(aux),
    2 the product alone: one persistent Triton GEMM with the activation (or its gradient) applied to the
    accumulator before the store; the torch formula where Triton does not run or a row is not 16-byte aligned
    (never at the model's widths, multiples of 64). With `scale` (0-d fp32, on a's device) a and b are float8 e4m3
    and the product is scale a b^T, in bf16 (the FP8 up-projection); with `a_scale` too, a is bf16 and cast to
    e4m3 at a / a_scale inside the kernel, b e4m3, and the product scale a8 b^T in a's dtype (the FP8
    down-projection)."""
    return _mlp_matmul_run(a, b, aux, epilogue, scale, a_scale, None)


@mlp_matmul.register_fake
def _(a, b, aux, epilogue, scale=None, a_scale=None):
    return a.new_empty(a.size(0), b.size(0), dtype=_mlp_matmul_out_dtype(a, scale, a_scale))


@torch.library.custom_op(f"{OP_NAMESPACE}::mlp_matmul_amax", mutates_args=())
def mlp_matmul_amax(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(post, amax): mlp_matmul's epilogue 0 (relu(a b^T)^2, scaled as there) and the largest entry of post before
    its rounding to the output dtype (fp32 [1]), gathered by the same kernel (one atomic max per tile): the FP8
    down-projection's scale of post, from this call's values, with no pass over post."""
    amax = torch.zeros(1, dtype=torch.float32, device=a.device)
    return _mlp_matmul_run(a, b, None, 0, scale, None, amax), amax


@mlp_matmul_amax.register_fake
def _(a, b, scale=None):
    return (a.new_empty(a.size(0), b.size(0), dtype=_mlp_matmul_out_dtype(a, scale, None)),
            a.new_empty(1, dtype=torch.float32))


def e4m3_scale(amax: torch.Tensor) -> torch.Tensor:
    """The per-tensor e4m3 scale amax / 448 (1 where amax is 0), on amax's device, with no host sync."""
    return torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))


def e4m3_per_tensor(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / s as float8 e4m3, s) with s = e4m3_scale(amax|t|) (0-d fp32 on t's device): the per-tensor scaling of
    records #84, from the current values; divided in fp32, so a bf16 t is rounded once."""
    scale = e4m3_scale(t.detach().abs().amax().float())
    return _e4m3(t.float(), scale), scale


class ReluSquaredMLP(torch.autograd.Function):
    """relu(x w1^T)^2 w2 for x [T, D], w1 and w2 [H, D] (one dtype), with the activation in the up-projection's
    epilogue and its gradient in the epilogue of the product that makes it (records #59's fusion, our own
    kernel): only post = relu(pre)^2 is written and kept, and relu(pre) = sqrt(post) in the backward. With
    x_scale (a float) the up-projection multiplies x / x_scale and w1 at its per-tensor scale, both cast to e4m3
    (records #84): a fixed x_scale that bounds |x| / 448 keeps each token's rounding its own (an amax over the
    row would let later tokens set it) and needs no pass over x. The backward stays in x's dtype, from x, w1
    and the post that the fp8 product gave. With fp8_down (records #89's FP8 down-projection, in our form) the
    up-projection's kernel also gathers post's amax, and post w2 runs from e4m3 operands: post cast in the
    down-projection's kernel at amax / 448 (this call's, so no state carries between steps and any world size
    rounds alike), w2 at its own amax / 448; the backward still reads the bf16 post."""

    @staticmethod
    def forward(ctx, x, w1, w2, x_scale: float | None = None, fp8_down: bool = False):
        if x_scale is not None:
            (w8, w_s), x8 = e4m3_per_tensor(w1), _e4m3(x.float(), x_scale)
            a, b, scale = x8, w8, w_s * x_scale
        else:
            a, b, scale = x, w1, None
        if fp8_down:
            post, amax = mlp_matmul_amax(a, b, scale)
            post = post.to(x.dtype)
            post_s = e4m3_scale(amax).reshape(())
            w2t8, w2_s = e4m3_per_tensor(w2.T.contiguous())
            out = mlp_matmul(post, w2t8, None, 2, post_s * w2_s, post_s)
        else:
            post = mlp_matmul(a, b, None, 0, scale).to(x.dtype)
            out = post @ w2
        ctx.save_for_backward(x, w1, w2, post)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, post = ctx.saved_tensors
        grad_pre = mlp_matmul(grad, w2, post, 1)  # (grad w2^T) 2 relu(pre)
        return grad_pre @ w1, grad_pre.T @ x, post.T @ grad, None, None


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

# Turbo-Muon (arXiv 2512.04632; a modded-nanogpt pull request by thib-s): AOL preconditioning
# (arXiv 2208.03160) s_i = (sum_j |A_ij|)^(-1/2) with A = X X^T gives ||diag(s) X||_2 <= 1; the
# safety factor and eps enter as s = rsqrt(rowsum * 1.02 + 1e-6) (the Turbo-Muon reference; the
# 1e-6 is taken relative to the mean squared row norm, see `aol_row_scale`). 4 iterations, the
# first reusing A.
AOL_SAFETY = 1.02
AOL_EPS = 1e-6
# Coefficients fitted to the interval AOL leaves (README: "Turbo-Muon coefficients"): the Polar
# Express construction on [lo, hi], made by `python tools/fit_turbo_coeffs.py` (--check compares).
# hi = 1 is AOL's bound (captured momentum reaches 0.98 after AOL; a fit to a lower top diverges on
# inputs above it). Momentum captured from 124M training steps (tools/capture_momentum.py) spreads
# far below any 4-step interval after AOL (median 4e-4 to 6e-3, 1st percentile 4e-6 to 7e-4), so lo
# is a choice: the smallest of 0.001, 0.002, 0.003, 0.005, 0.01 whose fit is no worse than Polar
# Express on Gaussian stacks [256|768|3072, 768]. Maps [0.005, 1] into [0.9016, 1.0984].
TURBO_FIT = dict(lo=0.005, hi=1.0, steps=4, cushion=0.02, safety=1.02)
TURBO_COEFFS = (
    (8.02306759300388, -22.115340283019194, 15.61890427318506),
    (3.8487515153892, -2.7596461748079038, 0.5072723527010023),
    (3.1514279989166267, -2.2715190178549767, 0.4539796039901126),
    (2.232827939884652, -1.6073565034285657, 0.4121802893226327),
)

ORTHO_METHODS = FIELD_CHOICES["muon_ortho"]
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


def orthogonalize(G, method="polar_express", backend="auto", coeffs=None):
    """Approximate polar factor U V^T of G [B, m, n] or [m, n] (G = U S V^T).

    methods: "newton_schulz5" (Keller: X / (||X||_F + 1e-7), 5 quintic steps), "polar_express"
    (X / (||X||_F * 1.02 + 1e-6), the 5 Polar Express polynomials), "turbo_muon" (AOL row scaling
    from A = X X^T, which the first iteration reuses, then the 4 polynomials TURBO_COEFFS fitted
    to the interval AOL leaves). Each normalization is a row scale applied inside the first
    iteration's lines 2 and 3. Singular values land near 1, not on it (the constants above give
    each band).
    backend: "torch" (ns_line_*_torch), "triton" (ns_line_* kernels), "auto" (Triton iff it is
    installed and G is on CUDA); both run `_polar_iterations`.
    coeffs: (a, b, c) tuples that replace the method's constants after its normalization (to
    compare coefficient sets, e.g. in benchmarks/bench_orthogonalize.py); None in training.
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
        scale, default = aol_row_scale(A, rowsum), TURBO_COEFFS
    elif method == "polar_express":
        A = lines[0](X)
        scale, default = frobenius_row_scale(A, PE_SAFETY, PE_EPS), POLAR_EXPRESS_COEFFS
    else:
        A = lines[0](X)
        scale, default = frobenius_row_scale(A, 1.0, NS5_EPS), (NS5_COEFFS,) * NS5_STEPS
    X = _polar_iterations(X, default if coeffs is None else coeffs, lines, A, scale)
    if transposed:
        X = X.mT
    return X if G.ndim == 3 else X.squeeze(0)


# -----------------------------------------------------------------------------
# Optimizers
# -----------------------------------------------------------------------------

MUON_VARIANTS = FIELD_CHOICES["muon_variant"]


class _Pending:
    """An async collective and the tensor it fills; `wait()` returns that tensor."""

    def __init__(self, tensor: torch.Tensor, handle=None):
        self.tensor, self.handle = tensor, handle

    def wait(self) -> torch.Tensor:
        if self.handle is not None:
            self.handle.wait()
        return self.tensor


def reduce_scatter_sum(full: torch.Tensor, world_size: int) -> _Pending:
    """Sum `full` [world_size * k, ...] over ranks; rank r receives rows r*k..(r+1)*k-1.

    A sum, not an average: each rank's gradient is already divided by the step's row count over all
    ranks (Trainer.train_step)."""
    if world_size == 1:
        return _Pending(full)
    out = torch.empty((full.size(0) // world_size, *full.shape[1:]), dtype=full.dtype, device=full.device)
    return _Pending(out, dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.SUM, async_op=True))


def all_gather(shard: torch.Tensor, world_size: int) -> _Pending:
    """Every rank's `shard` [k, ...] concatenated in rank order into [world_size * k, ...]."""
    if world_size == 1:
        return _Pending(shard)
    out = torch.empty((world_size * shard.size(0), *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
    return _Pending(out, dist.all_gather_into_tensor(out, shard.contiguous(), async_op=True))


def gather_rows(shard: torch.Tensor, total: int, world_size: int) -> torch.Tensor:
    """The first `total` rows of every rank's `shard` [k, ...] concatenated in rank order (the padding rows
    past `total` dropped), on the CPU: a sharded state tensor at its world-size-independent full size.
    A collective: every rank calls it."""
    return all_gather(shard, world_size).wait()[:total].cpu()


def shard_rows(full: torch.Tensor, k: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s k rows of `full` [total, ...] padded with zero rows to world_size * k: gather_rows undone
    for any world size. Padding rows hold zero state (zero gradients keep them zero)."""
    pad = k * world_size - full.size(0)
    if pad:
        full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])])
    return full[rank * k:(rank + 1) * k]


# Adam's update of one flat shard in one pass over its weights, gradient and moments (the elementwise
# formula of DistAdam below): eager torch makes a dozen passes over the 560M Adam-trained values per step.
ADAM_BLOCK = 4096

if HAS_TRITON:

    @triton.jit
    def _adam_kernel(W, G, M, V, OUT, n, beta1, beta2, step_size, inv_bc2, eps, decay, CAUTIOUS: tl.constexpr,
                     BLOCK: tl.constexpr):
        """OUT = W - u with u = step_size m / (sqrt(v inv_bc2) + eps) + decay W [u W > 0] (CAUTIOUS; else without
        the mask), after the moment updates m <- m + (1 - beta1)(g - m), v <- v + (1 - beta2)(g^2 - v), all fp32;
        M and V in place."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(W + offs, mask=mask, other=0.0)
        g = tl.load(G + offs, mask=mask, other=0.0)
        m = tl.load(M + offs, mask=mask, other=0.0)
        v = tl.load(V + offs, mask=mask, other=0.0)
        m = m + (1 - beta1) * (g - m)
        v = v + (1 - beta2) * (g * g - v)
        u = step_size * m / (tl.sqrt(v * inv_bc2) + eps)
        if CAUTIOUS:
            u = u + tl.where(u * w > 0, decay * w, 0.0)
        else:
            u = u + decay * w
        tl.store(M + offs, m, mask=mask)
        tl.store(V + offs, v, mask=mask)
        tl.store(OUT + offs, w - u, mask=mask)


def adam_update(w, g, m, v, betas, step_size: float, bc2: float, eps: float, decay: float, cautious: bool = True,
                out=None):
    """Adam's new weights for flat fp32 w, g, moments m and v (updated in place): w - u, u = step_size m_hat /
    (sqrt(v / bc2) + eps) + decay w where u and w agree in sign (cautious decay; everywhere if not `cautious`).
    Into `out` (may be w itself) or a new tensor. The fused kernel on GPU (and under the Triton interpreter), the
    torch formula otherwise."""
    beta1, beta2 = betas
    out = torch.empty_like(w) if out is None else out
    if _triton_runs_on(w):
        n = w.numel()
        _adam_kernel[(triton.cdiv(n, ADAM_BLOCK),)](w, g, m, v, out, n, beta1, beta2, step_size, 1 / bc2, eps, decay,
                                                    CAUTIOUS=cautious, BLOCK=ADAM_BLOCK)
        return out
    m.lerp_(g, 1 - beta1)
    v.lerp_(g * g, 1 - beta2)
    u = step_size * m / (v.div(bc2).sqrt_() + eps)
    if decay:
        u = u + (decay * w * ((u * w) > 0) if cautious else decay * w)
    return torch.sub(w, u, out=out)


class DistAdam:
    """Adam (Kingma & Ba, arXiv 1412.6980, Algorithm 1) with bias correction, with each parameter's own lr,
    betas and weight decay: with u the Adam step, W -= u + lr_t^2 wd W, lr_t the parameter's scheduled lr (the
    speedrun's Adam decay, records #50 and #53); with `cautious` (the speedrun's; the trainer passes
    --adam_cautious_wd, off by default) only where u and W agree in sign (strictly; arXiv 2510.12402).

    Each parameter is flattened and padded to a multiple of world_size; rank r owns the r-th
    contiguous shard, holds the Adam state of that shard only (ZeRO-1), updates it, and all ranks
    all-gather the updated shards. Gradients are summed by a reduce-scatter (each rank's are already
    divided by the step's row count over all ranks, so the sum is the mean gradient). A parameter
    can be paused (`set_active`): it is then neither reduced nor updated, and its state stays as it was.
    """

    def __init__(self, params, eps, rank, world_size, cautious: bool = True):
        """params: (parameter, lr, (beta1, beta2), weight decay) tuples."""
        self.eps, self.rank, self.world_size, self.cautious = eps, rank, world_size, cautious
        self.entries = []
        for p, lr, betas, wd in params:
            shard = math.ceil(p.numel() / world_size)
            self.entries.append(dict(param=p, lr=lr, betas=betas, wd=wd, shard=shard, active=True,
                                     m=torch.zeros(shard, device=p.device, dtype=torch.float32),
                                     v=torch.zeros(shard, device=p.device, dtype=torch.float32)))
        self.t = 0
        self._reduced, self._gathers = [], []

    def _entry(self, param):
        return next(e for e in self.entries if e["param"] is param)

    def set_active(self, param, active: bool):
        self._entry(param)["active"] = active

    def copy_state(self, source, target):
        """target's moments become source's (same shape): the target continues source's optimization."""
        src, dst = self._entry(source), self._entry(target)
        dst["m"].copy_(src["m"])
        dst["v"].copy_(src["v"])

    def _padded(self, flat, shard):
        pad = shard * self.world_size - flat.numel()
        return F.pad(flat, (0, pad)) if pad else flat

    def _active(self):
        return [e for e in self.entries if e["active"]]

    def reduce_grads(self):
        """Launch the gradient reduce-scatters (async): the sum over ranks is the step's mean gradient."""
        self._reduced = [reduce_scatter_sum(self._padded(e["param"].grad.reshape(-1).float(), e["shard"]),
                                            self.world_size) for e in self._active()]

    def step(self, lr_factor: float):
        """Update this rank's shards and launch their all-gathers (async)."""
        self.t += 1
        self._gathers = []
        for e, pending in zip(self._active(), self._reduced, strict=True):
            beta1, beta2 = e["betas"]
            bc1, bc2 = 1 - beta1 ** self.t, 1 - beta2 ** self.t
            g = pending.wait()
            p, shard = e["param"], e["shard"]
            w = p.detach().reshape(-1)[self.rank * shard:(self.rank + 1) * shard]
            if w.numel() < shard:  # the last ranks' shards run past the end: pad them, not the whole parameter
                w = F.pad(w, (0, shard - w.numel()))
            lr = e["lr"] * lr_factor
            new_w = adam_update(w, g, e["m"], e["v"], (beta1, beta2), lr / bc1, bc2, self.eps, lr * lr * e["wd"],
                                self.cautious)
            self._gathers.append((p, all_gather(new_w, self.world_size)))
        self._reduced = []

    def finish(self):
        """Wait for the all-gathers and write the full updated parameters."""
        for p, pending in self._gathers:
            p.detach().view(-1).copy_(pending.wait()[:p.numel()])
        self._gathers = []

    def state_tensors(self):
        return [t for e in self.entries for t in (e["m"], e["v"])]

    def state_dict(self) -> dict:
        """The step count and, per entry in order, every state tensor it holds (each a [shard, ...] slice of the
        flattened parameter) gathered to the parameter's size: the same for every world size. A collective."""
        return dict(t=self.t, entries=[{key: gather_rows(value, e["param"].numel(), self.world_size)
                                        for key, value in e.items() if key != "param" and torch.is_tensor(value)}
                                       for e in self.entries])

    def load_state_dict(self, state: dict):
        """Inverse of state_dict, at this optimizer's world size; ValueError if the entries do not match."""
        if len(state["entries"]) != len(self.entries):
            raise ValueError(f"Adam holds {len(self.entries)} parameters, the saved state {len(state['entries'])}")
        for i, (e, saved) in enumerate(zip(self.entries, state["entries"])):
            mine = {key for key, value in e.items() if key != "param" and torch.is_tensor(value)}
            if set(saved) != mine or any(v.size(0) != e["param"].numel() for v in saved.values()):
                raise ValueError(f"Adam parameter {i} ({tuple(e['param'].shape)}): the saved state does not fit")
            for key, full in saved.items():
                e[key].copy_(shard_rows(full, e["shard"], self.rank, self.world_size))
        self.t = state["t"]


def muon_shape_scale(m: int, n: int) -> float:
    """Keller Jordan's max(1, m/n)^0.5 for a stored [m, n] matrix (github KellerJordan/Muon)."""
    return max(1.0, m / n) ** 0.5


def normuon_normalize(O: torch.Tensor, v: torch.Tensor, beta2: float, eps: float) -> torch.Tensor:
    """NorMuon (arXiv 2510.05491): a second moment per row (per column of a wide matrix, the speedrun's
    orientation since records #42 and #48), v <- b2 v + (1-b2) mean(O^2), O / (sqrt(v)+eps), then rescaled so
    each matrix keeps its Frobenius norm (the official code's and the speedrun's variant, not the paper's
    Algorithm 1 line 10). v [B, max(m, n)] is updated in place."""
    axis = -1 if O.size(-2) >= O.size(-1) else -2  # the statistic runs along the longer side
    v.lerp_(O.square().mean(dim=axis), 1 - beta2)
    O_hat = O / (v.sqrt().unsqueeze(axis) + eps)
    norm_O = O.norm(dim=(-2, -1), keepdim=True)
    return O_hat * (norm_O / (O_hat.norm(dim=(-2, -1), keepdim=True) + eps))


def muon_update(W: torch.Tensor, G: torch.Tensor, state: dict, hp: Hyperparameters, lr: float,
                momentum: float, lr_mul: float = 1.0) -> torch.Tensor:
    """One Muon-family step for a stack of matrices W, G [B, m, n] (fp32); returns the new weights. lr is the
    scheduled lr (muon_lr times the schedule's multiplier); lr_mul the parameter's own multiplier.

    state holds this stack's buffers: "momentum" [B, m, n], "v" [B, max(m, n)] (NorMuon), "c" [B] (OrScale-LM).
    Every statistic is per matrix or per row, so a rank that owns whole matrices computes them exactly.
    """
    m, n = W.shape[-2:]
    M = state["momentum"]
    M.lerp_(G, 1 - momentum)  # EMA momentum, M <- b M + (1 - b) G (the speedrun's form)
    if hp.muon_variant == "scion":
        # Scion (arXiv 2502.07529, Emerging-Optimizers): no Nesterov, unit-RMS shape scale times the radius,
        # Frank-Wolfe step W <- (1 - lr) W - lr * update.
        O = orthogonalize(M, hp.muon_ortho).float()
        return (1 - lr) * W - lr * (hp.scion_radius * math.sqrt(m / n)) * O
    O = orthogonalize(G.lerp(M, momentum), hp.muon_ortho).float()  # Nesterov: (1-b) G + b M
    if hp.normuon:
        O = normuon_normalize(O, state["v"], hp.normuon_beta2, hp.normuon_eps)
    if hp.muon_variant in ("orscale", "orscale_lm"):
        # OrScale (arXiv 2605.07815): D = wd W + s Q, r = ||W|| / (c ||D|| + eps), W <- W - lr clip(r) D.
        s = 0.2 * math.sqrt(max(m, n)) if hp.muon_variant == "orscale_lm" else 1.0
        D = hp.muon_weight_decay * W + s * O
        w_norm, d_norm = W.norm(dim=(-2, -1)), D.norm(dim=(-2, -1))
        if hp.muon_variant == "orscale_lm":
            c = state["c"]
            # Calibrate once, at the first step where W is non-zero, so that r = 1 there (a zero-initialized
            # matrix first moves with r = r_min, then calibrates at its next step).
            uncalibrated = c == 0
            c.copy_(torch.where(uncalibrated, w_norm / d_norm.clamp_min(1e-30), c))
        else:
            c = torch.ones_like(w_norm)
        r = (w_norm / (c * d_norm + 1e-6)).clamp(hp.orscale_r_min, hp.orscale_r_max)
        return W - lr * r[:, None, None] * D
    if hp.muon_weight_decay:
        # Decay at rate wd * lr within the step's lr: W -= lr_eff (O + wd lr W), so the decay per step goes as
        # lr^2 (the speedrun's form, records #43); cautious: only where O and W agree in sign (arXiv 2510.12402).
        decay = W * ((O * W) >= 0) if hp.cautious_wd else W
        O = O + (hp.muon_weight_decay * lr) * decay
    return W - (lr * lr_mul * muon_shape_scale(m, n)) * O


def split_fp32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) of float32 x: high the bf16 nearest x (ties away from zero; elsewhere x.bfloat16()), low
    [int16] the signed difference of the bit patterns, bits(x) - bits(high) << 16, which is within half of
    bf16's last place, [-2^15, 2^15); join_fp32(high, low) is x, bit for bit (NaNs excepted). The speedrun's bf16
    weights with an fp32 mantissa (records #57) truncate instead; rounded, the forward reads the weights a
    float32 run casts to bf16."""
    bits = x.contiguous().view(torch.int32)
    # bits + 2^15 then an arithmetic shift: sign-magnitude patterns round in magnitude for either sign
    high = torch.div(bits + 32768, 65536, rounding_mode="floor")
    return high.to(torch.int16).view(torch.bfloat16), (bits - high * 65536).to(torch.int16)


def join_fp32(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The float32 whose bits are bf16 high's shifted up 16, plus low's signed 16 (any 16-bit dtype): split_fp32
    undone."""
    bits = high.contiguous().view(torch.int16).to(torch.int32) * 65536 + low.view(torch.int16).to(torch.int32)
    return bits.view(torch.float32)


class DistMuon:
    """Muon for hidden matrices, distributed the speedrun way.

    Parameters [..., m, n] are grouped by matrix shape and their matrices stacked ([P, m, n], padded to
    a multiple of world_size with zero matrices). Gradients are reduce-scattered (summed), so rank r
    owns stacked matrices r*k..(r+1)*k-1 (k = P_padded / world_size): it keeps their momentum,
    orthogonalizes only them, and the updated matrices are all-gathered. All reduce-scatters are
    launched before any compute, so one group's communication overlaps another's orthogonalization.

    With --muon_bf16_weights the parameters become bf16 (the forward reads them without a cast, and the
    all-gather moves half the bytes) and Muon keeps, per owned matrix, what each float32 weight has beyond its
    nearest bf16 (state "low", 16 bits): the update is computed on the exact float32 weight and written back as
    its two halves, so the float32 weights follow the same path as without the flag, given the gradients.
    """

    def __init__(self, params, hp: Hyperparameters, rank, world_size):
        """params: (parameter, lr multiplier) pairs; parameters of one matrix shape and multiplier are stacked."""
        self.hp, self.rank, self.world_size = hp, rank, world_size
        by_shape = {}
        for p, lr_mul in params:
            by_shape.setdefault((tuple(p.shape[-2:]), lr_mul), []).append(p)
        self.groups = []
        for ((m, n), lr_mul), ps in by_shape.items():
            count = sum(p.numel() // (m * n) for p in ps)
            k = math.ceil(count / world_size)
            dev = ps[0].device
            state = dict(momentum=torch.zeros(k, m, n, device=dev), v=torch.zeros(k, max(m, n), device=dev),
                         c=torch.zeros(k, device=dev))
            self.groups.append(dict(params=ps, shape=(m, n), lr_mul=lr_mul, count=count, k=k, state=state,
                                    owned=self._owned_ranges(ps, m * n, rank * k, min((rank + 1) * k, count))))
        if hp.muon_bf16_weights:
            for g in self.groups:  # the low halves of the float32 weights, before the parameters become bf16;
                # kept as bf16-typed bits (never computed with): NCCL has no int16 for the checkpoint's gather
                g["state"]["low"] = split_fp32(self._owned_weights(g))[1].view(torch.bfloat16)
                for p in g["params"]:
                    p.data = split_fp32(p.data.float())[0]
        self._reduced, self._gathers = [], []

    @staticmethod
    def _owned_ranges(params, mat_size, lo, hi):
        """[(param, first, end)]: the matrices lo..hi-1 of the group's stack, as ranges within each param."""
        ranges, offset = [], 0
        for p in params:
            count = p.numel() // mat_size
            first, end = max(lo - offset, 0), min(hi - offset, count)
            if first < end:
                ranges.append((p, first, end))
            offset += count
        return ranges

    def _owned_weights(self, group):
        """This rank's k stacked matrices [k, m, n] (fp32), zero matrices where it owns padding; with bf16
        weights, joined with their low halves."""
        m, n = group["shape"]
        mats = [p.detach().reshape(-1, m, n)[first:end] for p, first, end in group["owned"]]
        pad = group["k"] - sum(end - first for _, first, end in group["owned"])
        if pad:
            mats.append(torch.zeros(pad, m, n, device=group["state"]["momentum"].device,
                                    dtype=group["params"][0].dtype))
        stacked = torch.cat(mats) if len(mats) > 1 else mats[0]
        if "low" in group["state"]:
            return join_fp32(stacked, group["state"]["low"])
        return stacked.float()

    def _stack(self, tensors, group):
        m, n = group["shape"]
        mats = [t.reshape(-1, m, n) for t in tensors]
        pad = group["k"] * self.world_size - group["count"]
        if pad:
            mats.append(torch.zeros(pad, m, n, device=mats[0].device, dtype=mats[0].dtype))
        return torch.cat(mats) if len(mats) > 1 else mats[0]

    def reduce_grads(self):
        """Launch the stacked-gradient reduce-scatters of all shape groups (async)."""
        self._reduced = [reduce_scatter_sum(self._stack([p.grad.float() for p in g["params"]], g), self.world_size)
                         for g in self.groups]

    def step(self, lr_factor: float, momentum: float):
        """Update this rank's matrices of each group and launch their all-gathers (async)."""
        self._gathers = []
        for g, pending in zip(self.groups, self._reduced):
            grad = pending.wait()
            new_w = muon_update(self._owned_weights(g), grad, g["state"], self.hp, self.hp.muon_lr * lr_factor,
                                momentum, g["lr_mul"])
            if "low" in g["state"]:  # bf16 weights
                new_w, low = split_fp32(new_w)
                g["state"]["low"].copy_(low.view(torch.bfloat16))
            self._gathers.append((g, all_gather(new_w, self.world_size)))
        self._reduced = []

    def finish(self):
        """Wait for the all-gathers and write the updated matrices back into their parameters."""
        for g, pending in self._gathers:
            stacked, offset = pending.wait(), 0
            for p in g["params"]:
                count = p.numel() // (g["shape"][0] * g["shape"][1])
                p.detach().copy_(stacked[offset:offset + count].view_as(p))
                offset += count
        self._gathers = []

    def state_tensors(self):
        return [t for g in self.groups for t in g["state"].values()]

    def state_dict(self) -> dict:
        """Per shape group in order, its matrix shape and every state tensor (a [k, ...] slice of the group's
        stack) gathered to the group's matrix count: the same for every world size. A collective."""
        return dict(groups=[dict(shape=g["shape"], count=g["count"],
                                 state={key: gather_rows(value, g["count"], self.world_size)
                                        for key, value in g["state"].items()}) for g in self.groups])

    def load_state_dict(self, state: dict):
        """Inverse of state_dict, at this optimizer's world size; ValueError if the groups do not match."""
        saved_groups = state["groups"]
        if [(tuple(s["shape"]), s["count"], set(s["state"])) for s in saved_groups] != \
                [(g["shape"], g["count"], set(g["state"])) for g in self.groups]:
            raise ValueError("Muon's shape groups differ from the saved state's: "
                             f"{[(g['shape'], g['count']) for g in self.groups]} vs "
                             f"{[(tuple(s['shape']), s['count']) for s in saved_groups]}")
        for g, saved in zip(self.groups, saved_groups):
            for key, full in saved["state"].items():
                g["state"][key].copy_(shard_rows(full, g["k"], self.rank, self.world_size))


# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------



def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def document_bounds(tokens: np.ndarray, bos_id: int, rows: int = 1) -> tuple[np.ndarray, int, int]:
    """(cu_seqlens [T + 1] int32, documents, longest document) of T input tokens, `rows` equal rows joined: a
    document starts at each row's first position and at every later BOS; cu_seqlens holds the starts and then
    T, padded with T (empty documents), so every micro-batch of T tokens has one shape whatever its documents."""
    T = len(tokens)
    if T % rows:
        raise ValueError(f"{T} tokens do not split into {rows} equal rows")
    starts = np.flatnonzero((tokens == bos_id) | (np.arange(T) % (T // rows) == 0))
    cu = np.full(T + 1, T, dtype=np.int32)
    cu[:len(starts)] = starts
    return cu, len(starts), int(np.diff(cu[:len(starts) + 1]).max())


# Attention runs through one custom op whose ints (document count, longest document, window) come in a
# small CPU tensor: opaque to the compiler, so a new batch or window reuses the compiled graph, and reading
# them costs no device sync. On GPU it calls PyTorch's FlashAttention varlen kernels (the ops behind
# torch.nn.attention.varlen.varlen_attn) with a causal sliding window; on CPU a dense reference.


def _attention_ints(meta: torch.Tensor) -> tuple[int, int, int]:
    docs, max_len, window = meta.tolist()
    return docs, max_len, window


def window_attention_mask(T: int, cu: torch.Tensor, docs: int, window: int) -> torch.Tensor:
    """[T, T] bool: key s is visible to query t iff t - window <= s <= t in the same document (cu: the
    document starts of document_bounds)."""
    pos = torch.arange(T, device=cu.device)
    doc = torch.searchsorted(cu[1:docs + 1].to(torch.int64), pos, right=True)
    q, kv = pos[:, None], pos[None, :]
    return (kv <= q) & (q - kv <= window) & (doc[:, None] == doc[None, :])


def _attention_probs(q, k, cu, docs: int, window: int):
    """Softmax probabilities [H, T, T] (fp32) of the reference attention (scale 1: it is folded into q)."""
    mask = window_attention_mask(q.size(0), cu, docs, window)
    scores = torch.einsum("thd,shd->hts", q.float(), k.float()).masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


@torch.library.custom_op(f"{OP_NAMESPACE}::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, meta: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [T, H, D], log-sum-exp [H, T] fp32) of causal attention of q, k, v [T, H, D] within documents
    (cu: [T + 1] int32 starts, document_bounds) and a window: query t sees keys t - window .. t. meta: CPU
    int64 (documents, longest document, window). Softmax scale 1 (fold yours into q)."""
    docs, max_len, window = _attention_ints(meta)
    if not q.is_cuda:
        probs = _attention_probs(q, k, cu, docs, window)
        out = torch.einsum("hts,shd->thd", probs, v.float()).to(q.dtype).contiguous()
        return out, torch.zeros(q.size(1), q.size(0), dtype=torch.float32)  # lse: only the GPU backward reads it
    bounds = cu[:docs + 1]
    out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, bounds, bounds, max_len, max_len, 0.0, True, False, scale=1.0, window_size_left=window,
        window_size_right=0)
    return out, lse


@window_attention.register_fake
def _(q, k, v, cu, meta):
    return torch.empty_like(q), q.new_empty(q.size(1), q.size(0), dtype=torch.float32)


@torch.library.custom_op(f"{OP_NAMESPACE}::window_attention_backward", mutates_args=())
def window_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu: torch.Tensor, meta: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of window_attention for the output gradient grad."""
    docs, max_len, window = _attention_ints(meta)
    if not q.is_cuda:
        # Softmax attention's gradient (e.g. FlashAttention, arXiv 2205.14135, Algorithm 4): dV = P^T dO,
        # dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q.
        probs = _attention_probs(q, k, cu, docs, window)
        g, vf, o = grad.float(), v.float(), out.float()
        dv = torch.einsum("hts,thd->shd", probs, g)
        dp = torch.einsum("thd,shd->hts", g, vf)
        ds = probs * (dp - (g * o).sum(-1).T[:, :, None])
        dq = torch.einsum("hts,shd->thd", ds, k.float())
        dk = torch.einsum("hts,thd->shd", ds, q.float())
        return tuple(d.to(q.dtype).contiguous() for d in (dq, dk, dv))
    bounds = cu[:docs + 1]
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # unused: no dropout
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        grad.contiguous(), q, k, v, out, lse, bounds, bounds, max_len, max_len, 0.0, True, rng_state,
        torch.empty(0, device=q.device), scale=1.0, window_size_left=window, window_size_right=0)
    return dq, dk, dv


@window_attention_backward.register_fake
def _(grad, q, k, v, out, lse, cu, meta):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _window_attention_setup(ctx, inputs, output):
    q, k, v, cu, meta = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu, meta)


def _window_attention_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu, meta = ctx.saved_tensors
    dq, dk, dv = window_attention_backward(grad_out, q, k, v, out, lse, cu, meta)
    return dq, dk, dv, None, None


window_attention.register_autograd(_window_attention_grad, setup_context=_window_attention_setup)


def pair_heads(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> [2T, H/2, D]: heads j and j + H/2 become one sequence of 2T positions, token t's two heads
    at 2t and 2t + 1, so each query of the pair scores the keys of both heads of every earlier token in one
    softmax (the speedrun's paired-head attention, records #58). A view: [T, 2, H/2, D] is already that order."""
    T, H, D = x.shape
    return x.view(2 * T, H // 2, D)


def attention_meta(docs: int, max_len: int, windows: tuple[int, int]) -> dict[str, torch.Tensor]:
    """window_attention's CPU ints for a row of `docs` documents, the longest max_len tokens, per layer kind:
    S and L (the short and long window, windows in ATTN_BLOCK blocks) and their paired forms PS and PL
    (twice the positions per document, the same window: half the tokens of reach)."""
    short, long = (ATTN_BLOCK * w for w in windows)
    return {"S": torch.tensor([docs, max_len, short]), "L": torch.tensor([docs, max_len, long]),
            "PS": torch.tensor([docs, 2 * max_len, short]), "PL": torch.tensor([docs, 2 * max_len, long])}


# FP8 LM head (as in the public speedrun's records): operands are divided by a scale and cast to
# float8 (e4m3 forward, e5m2 for gradients), multiplied with fp32 accumulation, and the product
# rescaled. Scales map the expected range onto e4m3's largest finite value: x is RMS-normed, so
# |x_i| <= sqrt(dim); |w| <= 1.6 covers the head's weights (initialized at std 0.005, trained at a small
# lr). The logit gradient arrives divided by the step's row count m over all ranks (the trainer's loss scaling), so its
# cast divides by grad_s = (1/m) 0.75/448 (GPT.head_grad_scale holds 1/m): e5m2 then sees the same values at
# every m, instead of values m times smaller whose small entries fall below e5m2's smallest (1.5e-5) and
# vanish (the speedrun's grad_scale, records #67; HEAD's 0.75). Casts saturate
# (clamp) rather than overflow, so an outlier cannot turn into NaN. The casts stay in the traced graph; the
# matmuls (`fp8_mm`) and the K-major copies they need (`transpose_bytes`) are opaque ops. The loss backward is
# an opaque kernel too, so FP8Linear's gradient cast is one more pass over the [tokens, vocab] gradient;
# FP8HeadLoss (--fp8_head_fused_grad) has the loss kernel write the cast gradient instead.
FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0
FP8_HEAD_W_MAX = 1.6  # |w| bound of the head's e4m3 cast (the speedrun's scale, records #55); larger clamps
FP8_HEAD_GRAD_SCALE = 0.75 / FP8_E4M3_MAX  # the logit gradient's cast scale at one row per step


def normed_e4m3_scale(dim: int) -> float:
    """The e4m3 scale of an RMS-normed (weightless) row of width dim: no entry exceeds sqrt(dim), which 448 then
    spans; fixed, so it needs no pass over the values and no token's rounding depends on another token."""
    return dim ** 0.5 / FP8_E4M3_MAX


@torch.library.custom_op(f"{OP_NAMESPACE}::fp8_mm", mutates_args=())
def fp8_mm(a: torch.Tensor, b: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor, out_f32: bool, fast_accum: bool
           ) -> torch.Tensor:
    """(a_s a) (b_s b)^T for float8 a [M, K] and b [N, K], both row-major, and 0-d fp32 scales on their device;
    bf16 output, or fp32 if out_f32."""
    return torch._scaled_mm(a, b.T, scale_a=a_s, scale_b=b_s, use_fast_accum=fast_accum,
                            out_dtype=torch.float32 if out_f32 else torch.bfloat16)


@fp8_mm.register_fake
def _(a, b, a_s, b_s, out_f32, fast_accum):
    return a.new_empty(a.size(0), b.size(0), dtype=torch.float32 if out_f32 else torch.bfloat16)


FP8_FLAGS = ("fp8_head", "fp8_mlp_up", "fp8_qkv", "fp8_mlp_down")  # the FP8 matmuls' switches


def fp8_on_this_gpu(hp: Hyperparameters, device: torch.device) -> Hyperparameters:
    """hp with the FP8 matmuls that `device` cannot run turned off, with a warning: float8 needs compute capability
    8.9 or above (on an A100 --fp8_head's and --fp8_qkv's matmuls would fail), and the fused MLP's FP8 tiles
    (--fp8_mlp_up, --fp8_mlp_down) need Hopper's shared memory (elsewhere mlp_matmul would compute them as fp32
    products of the e4m3 values, far slower than the bf16 MLP). Unchanged off CUDA, where none runs."""
    if device.type != "cuda":
        return hp
    capability = torch.cuda.get_device_capability(device)
    off = [name for name in FP8_FLAGS if getattr(hp, name) and capability < (8, 9)]
    index = device.index if device.index is not None else torch.cuda.current_device()
    tiles = {"fp8_mlp_up": (MLP_MATMUL_CONFIG_FP8, 1), "fp8_mlp_down": (MLP_MATMUL_CONFIG, 2)}
    off += [name for name, (config, size) in tiles.items() if getattr(hp, name) and name not in off
            and mlp_matmul_shared_bytes(config, size, 2) > gpu_properties(index)["max_shared_mem"]]
    if not off:
        return hp
    warnings.warn(f"{' and '.join('--' + name for name in off)} cannot run on this GPU (compute capability "
                  f"{capability[0]}.{capability[1]}; float8 needs 8.9, the fused MLP's FP8 tiles Hopper's shared memory): "
                  f"off for this run (pass {' '.join('--' + name + '=false' for name in off)} to say so)", stacklevel=2)
    return dataclasses.replace(hp, **{name: False for name in off})


def fp8_applies(enabled: bool, x) -> bool:
    """An FP8 matmul (the head's, --fp8_head; the MLP up-projection's, --fp8_mlp_up; q, k, v's, --fp8_qkv) runs on GPU while training
    only: validation (no gradients) reads the bf16 model, as the public code does (it casts when training), so
    the measured loss carries no e4m3 rounding."""
    return enabled and x.is_cuda and torch.is_grad_enabled()


def _e4m3(t: torch.Tensor, scale) -> torch.Tensor:
    return t.div(scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def _fp8_head_operands(x, w, x_s: float, w_s: float):
    """(x8, w8, x_s, w_s): the head's operands cast to e4m3 and their scales as 0-d fp32 tensors on x's device."""
    return _e4m3(x, x_s), _e4m3(w, w_s), *(x.new_full((), scale, dtype=torch.float32) for scale in (x_s, w_s))


def _fp8_head_grads(x8, w8, g8, x_s, w_s, grad_s):
    """(dL/dx bf16, dL/dw fp32) from the e5m2 logit gradient g8 = dL/dy / grad_s."""
    grad_x = fp8_mm(g8, transpose_bytes(w8), grad_s, w_s, False, False)  # g w: [T, V] [V, K]
    # w's gradient as (x^T g)^T: the [K, T] x [T, V] product is the faster cuBLAS shape for K << V.
    grad_w = fp8_mm(transpose_bytes(x8), transpose_bytes(g8), x_s, grad_s, True, False).T
    return grad_x, grad_w


class FP8Linear(torch.autograd.Function):
    """y = x w^T (bf16) for x [T, K] (bf16) and w [V, K] (fp32) through float8 operands; gradients likewise.
    x_s, w_s: floats; grad_s: a 0-d fp32 tensor on x's device (it changes with the row count, and a
    tensor does not recompile). T, K, V must be multiples of 16."""

    @staticmethod
    def forward(ctx, x, w, x_s: float, w_s: float, grad_s: torch.Tensor):
        x8, w8, x_s, w_s = _fp8_head_operands(x, w, x_s, w_s)
        ctx.save_for_backward(x8, w8, x_s, w_s, grad_s)
        return fp8_mm(x8, w8, x_s, w_s, False, True)

    @staticmethod
    def backward(ctx, grad_y):
        x8, w8, x_s, w_s, grad_s = ctx.saved_tensors
        g8 = (grad_y / grad_s).clamp(-FP8_E5M2_MAX, FP8_E5M2_MAX).to(torch.float8_e5m2)
        return *_fp8_head_grads(x8, w8, g8, x_s, w_s, grad_s), None, None, None


class FP8ForwardLinear(torch.autograd.Function):
    """y = x w^T (bf16) for an RMS-normed x [T, K] and w [N, K] in x's dtype, the forward from e4m3 operands: x at
    the fixed scale x_scale (normed_e4m3_scale: no pass over x, each token's rounding its own) and w at its
    amax / 448 (e4m3_per_tensor), the product with cuBLAS's fast accumulation as the head's. The backward is
    x's dtype's, from the unrounded x and w (the FP8 up-projection's split, records #84, applied to the
    attention's input projection). T, K, N multiples of 16."""

    @staticmethod
    def forward(ctx, x, w, x_scale: float):
        (w8, w_s), x8 = e4m3_per_tensor(w), _e4m3(x.float(), x_scale)
        ctx.save_for_backward(x, w)
        return fp8_mm(x8, w8, x.new_full((), x_scale, dtype=torch.float32), w_s, False, True)

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        grad_y = grad_y.to(x.dtype)
        return grad_y @ w, grad_y.T @ x, None


class FP8HeadLoss(torch.autograd.Function):
    """sum_t of softcap_mtp_ce's row losses on the logits x w^T (FP8Linear's product), with the logit gradient
    made by the loss kernel's forward, already divided by the cast scale and cast to e5m2 (records #67): the
    [T, V] gradient is never written in bf16, read back and cast, and the logits are not kept for the
    backward. The sum's incoming gradient g (1/m under the trainer's loss scaling) goes into the matmuls'
    scale (g 0.75/448), so no micro-batch count is needed. Same arguments as FP8Linear and softcap_mtp_ce."""

    @staticmethod
    def forward(ctx, x, w, targets, weights, x_s: float, w_s: float, cap: float, offset: float, temp: float):
        x8, w8, x_s, w_s = _fp8_head_operands(x, w, x_s, w_s)
        logits = fp8_mm(x8, w8, x_s, w_s, False, True)
        rows, g8 = softcap_mtp_ce_with_grad(logits, targets, weights, cap, offset, temp, 1 / FP8_HEAD_GRAD_SCALE,
                                            FP8_E5M2_MAX, torch.float8_e5m2)
        ctx.save_for_backward(x8, w8, g8, x_s, w_s)
        return rows.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        x8, w8, g8, x_s, w_s = ctx.saved_tensors
        grad_s = grad_loss.float() * FP8_HEAD_GRAD_SCALE
        return *_fp8_head_grads(x8, w8, g8, x_s, w_s, grad_s), None, None, None, None, None, None, None


def row_positions(n: int, rows: int, device=None) -> torch.Tensor:
    """[n] int64: each position's place in its row, `rows` equal rows joined into one sequence of n positions
    (GPT.forward's row_pos). A tensor, not the count: passes of the same length share one compiled graph
    whatever their rows (stages 1 and 2 of the default recipe)."""
    if n % rows:
        raise ValueError(f"{n} positions do not split into {rows} equal rows")
    return torch.arange(n, device=device) % (n // rows)


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al., arXiv 2104.09864) on half of each head: dims (j, j + D/2)
    form pair j, which turns by angle p * omega_j at position p. The first half of the pairs rotate, the
    rest carry no position (the speedrun's "half-truncated RoPE"). `set_frequencies` rewrites the tables in
    place (YaRN at window changes), so compiled graphs, which read them as inputs, need no recompile."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        quarter = head_dim // 4
        self.base = torch.cat([(1 / 1024) ** torch.linspace(0, 1, quarter, dtype=torch.float64),
                               torch.zeros(quarter, dtype=torch.float64)])
        self.max_seq_len = max_seq_len
        self.register_buffer("cos", torch.empty(max_seq_len, 2 * quarter), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, 2 * quarter), persistent=False)
        # Dims that carry no position: both members of each non-rotating pair.
        self.register_buffer("unrotated", torch.cat([self.base == 0, self.base == 0]), persistent=False)
        self.set_frequencies(self.base)

    @torch.no_grad()
    def set_frequencies(self, freqs: torch.Tensor):
        device = self.cos.device
        positions = torch.arange(self.max_seq_len, dtype=torch.float64, device=device)
        theta = positions[:, None] * freqs.to(device, torch.float64)[None, :]
        self.cos.copy_(theta.cos())
        self.sin.copy_(theta.sin())

    def forward(self, x_THD: torch.Tensor, row_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H, D] at positions row_pos [T] (row_positions; None: one row, 0 .. T - 1)."""
        T = x_THD.size(0)
        cos, sin = (self.cos[:T], self.sin[:T]) if row_pos is None else (self.cos[row_pos], self.sin[row_pos])
        x1, x2 = x_THD.float().chunk(2, dim=-1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).type_as(x_THD)


YARN_BETA = 32  # pairs turning at least this often within the old window keep their frequency (YaRN's beta)
ATTN_SCALE_GROWTH = 0.2  # softmax scale grows by 1 + 0.2 ln(new / old) per window change (the speedrun's, #31)


def yarn_frequencies(base: torch.Tensor, long_windows: tuple[int, ...]) -> torch.Tensor:
    """RoPE frequencies after YaRN steps (arXiv 2309.00071, "NTK-by-parts") at each change of the long window
    old -> new (tokens), applied cumulatively: r_j = old omega_j / (2 pi) turns within the old window,
    w_j = clamp((r_j - 1) / (beta - 1), 0, 1), omega_j <- omega_j (old/new + w_j (1 - old/new)). Fast pairs
    keep their frequency; slow ones are compressed by old/new, so the longer window spans the angles the
    shorter one trained on."""
    freqs = base
    for old, new in zip(long_windows, long_windows[1:]):
        if new != old:
            turns = old * freqs / (2 * math.pi)
            w = ((turns - 1) / (YARN_BETA - 1)).clamp(0, 1)
            freqs = freqs * (old / new + w * (1 - old / new))
    return freqs


def yarn_attention_scale(base: float, long_windows: tuple[int, ...]) -> float:
    """The softmax scale after the long-window changes of `long_windows` (tokens): YaRN's temperature rule in
    the speedrun's form, times 1 + 0.2 ln(new / old) per change."""
    scale = base
    for old, new in zip(long_windows, long_windows[1:]):
        scale *= 1 + ATTN_SCALE_GROWTH * math.log(new / old)
    return scale


def shift_unrotated_keys(k: torch.Tensor, unrotated: torch.Tensor, row_pos: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Keys k [T, H, D] (rows joined at row_pos, row_positions; None: one row) whose unrotated dims come from the
    previous position (a row's first position keeps its own): a query can then match on the token before a key,
    which lets one layer do induction (the speedrun's partial key offset, records #49 and #62). Crosses document
    starts, as there."""
    previous = torch.cat([k[:1], k[:-1]])
    if row_pos is not None:
        unrotated = unrotated & (row_pos != 0)[:, None, None]
    return torch.where(unrotated, previous, k)


def exclude_self_value(y: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """y - tanh(alpha_h) (y . v / |v|^2) v per head and token, y, v [T, H, D], alpha [H] (static) or [T, H]
    (per token): each head removes a learned share of its output along the token's own value vector (XSA,
    arXiv 2603.09078; the speedrun's learnable form, records #82 and #86, per token since #85). alpha = 0 is
    the identity."""
    along = (y * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True).clamp_min(1e-8)
    return y - torch.tanh(alpha)[..., None] * along * v


DC_WINDOW = 112  # DC's local attention: keys t - 111 .. t of the query's document (records #85)
DC_BLOCK = 128  # DC queries in blocks of 128, each scoring its own and the previous block's keys (>= DC_WINDOW)


# DC as three Triton kernels (the public record's DC is a custom Triton forward and backward too, records #85;
# this is our own): a program takes DC_QUERIES queries and the DC_KEYS keys before and up to them (enough for
# the window), scores and softmaxes each head on chip and mixes the heads there, so no probability is written.
# The forward keeps each head's log-sum-exp; the backward recomputes the probabilities, query-major for dq,
# the mix weights' gradients and the rows' sums E_h = sum_s P_h dA, then key-major for dk and dv (no atomics).
DC_QUERIES = 16
DC_KEYS = 128  # >= DC_WINDOW + DC_QUERIES - 1: query t of a block sees keys t - 111 .. t
DC_WARPS = 8  # the sm_90 build spills fewer registers (STL/LDL in its SASS) than at 4

if HAS_TRITON:

    @triton.jit
    def _dc_tile(X, t, h, d, H: tl.constexpr, D: tl.constexpr):
        """Pointers to head h's [len(t), D] tile of rows t in X [T, H, D], added pointer first: summing the integer
        offsets before adding them made the sm_90 build of the key-major kernel spill more registers."""
        return X + t[:, None] * (H * D) + h * D + d[None, :]

    @triton.jit
    def _dc_gated(grad, W2, tq, q_ok, h, H: tl.constexpr, dtype: tl.constexpr):
        """w2_h grad_h of queries tq (grad: head h's output-gradient tile), in dtype: what reaches the head mix."""
        gate = tl.load(W2 + tq * H + h, mask=q_ok, other=0.0)
        return (grad.to(tl.float32) * gate[:, None]).to(dtype)

    @triton.jit
    def _dc_scores(Q, K, DOC, tq, tk, T, h, d, H: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr,
                   PRECISION: tl.constexpr):
        """Head h's scores of queries tq against keys tk, -1e30 where the key is outside the query's window or
        document; (scores, visible, the head's query tile)."""
        q_ok, k_ok = tq < T, (tk >= 0) & (tk < T)
        doc_q = tl.load(DOC + tq, mask=q_ok, other=-1)
        doc_k = tl.load(DOC + tk, mask=k_ok, other=-2)
        delta = tq[:, None] - tk[None, :]
        visible = (delta >= 0) & (delta < WINDOW) & (doc_q[:, None] == doc_k[None, :]) & k_ok[None, :]
        qh = tl.load(_dc_tile(Q, tq, h, d, H, D), mask=q_ok[:, None], other=0.0)
        kh = tl.load(_dc_tile(K, tk, h, d, H, D), mask=k_ok[:, None], other=0.0)
        scores = tl.where(visible, tl.dot(qh, tl.trans(kh), input_precision=PRECISION), -1.0e30)
        return scores, visible, qh

    @triton.jit
    def _dc_probs(Q, K, DOC, LSE, tq, tk, T, h, d, H: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr,
                  PRECISION: tl.constexpr):
        """(head h's probabilities P[tq, tk] from the forward's log-sum-exp, the head's query tile)."""
        scores, visible, qh = _dc_scores(Q, K, DOC, tq, tk, T, h, d, H, D, WINDOW, PRECISION)
        lse = tl.load(LSE + tq * H + h, mask=tq < T, other=0.0)
        return tl.where(visible, tl.exp(scores - lse[:, None]), 0.0), qh

    @triton.jit
    def _dc_forward_kernel(Q, K, V, MIX, W2, DOC, OUT, LSE, T, H: tl.constexpr, D: tl.constexpr,
                           WINDOW: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        """out_h = w2_h (sum_h' mix_h' P_h') V_h for queries q0 .. q0 + BQ - 1; LSE [T, H] per head."""
        q0 = tl.program_id(0) * BQ
        tq, tk, d = q0 + tl.arange(0, BQ), q0 + BQ - BK + tl.arange(0, BK), tl.arange(0, D)
        q_ok, k_ok = tq < T, (tk >= 0) & (tk < T)
        mixed = tl.zeros((BQ, BK), dtype=tl.float32)
        for h in tl.static_range(H):
            scores, _, _ = _dc_scores(Q, K, DOC, tq, tk, T, h, d, H, D, WINDOW, PRECISION)
            top = tl.max(scores, 1)
            e = tl.exp(scores - top[:, None])
            total = tl.sum(e, 1)
            tl.store(LSE + tq * H + h, top + tl.log(total), mask=q_ok)
            weight = tl.load(MIX + tq * H + h, mask=q_ok, other=0.0)
            mixed += (weight / total)[:, None] * e
        for h in tl.static_range(H):
            vh = tl.load(_dc_tile(V, tk, h, d, H, D), mask=k_ok[:, None], other=0.0)
            out = tl.dot(mixed.to(vh.dtype), vh, input_precision=PRECISION)
            gate = tl.load(W2 + tq * H + h, mask=q_ok, other=0.0)
            tl.store(_dc_tile(OUT, tq, h, d, H, D), (out * gate[:, None]).to(OUT.dtype.element_ty),
                     mask=q_ok[:, None])

    @triton.jit
    def _dc_backward_q_kernel(Q, K, V, MIX, W2, DOC, LSE, GRAD, DQ, DW2, ROWSUM, T, H: tl.constexpr,
                              D: tl.constexpr, WINDOW: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                              PRECISION: tl.constexpr):
        """Per query block: dw2_h = <grad_h, A V_h>, dA = sum_h (w2_h grad_h) V_h^T, E_h = sum_s P_h dA (ROWSUM:
        the gradient of mix_h, and the key-major kernel's softmax term), dq_h = (mix_h P_h (dA - E_h)) K_h."""
        q0 = tl.program_id(0) * BQ
        tq, tk, d = q0 + tl.arange(0, BQ), q0 + BQ - BK + tl.arange(0, BK), tl.arange(0, D)
        q_ok, k_ok = tq < T, (tk >= 0) & (tk < T)
        mixed = tl.zeros((BQ, BK), dtype=tl.float32)
        for h in tl.static_range(H):
            probs, _ = _dc_probs(Q, K, DOC, LSE, tq, tk, T, h, d, H, D, WINDOW, PRECISION)
            mixed += tl.load(MIX + tq * H + h, mask=q_ok, other=0.0)[:, None] * probs
        d_mixed = tl.zeros((BQ, BK), dtype=tl.float32)
        for h in tl.static_range(H):
            vh = tl.load(_dc_tile(V, tk, h, d, H, D), mask=k_ok[:, None], other=0.0)
            grad = tl.load(_dc_tile(GRAD, tq, h, d, H, D), mask=q_ok[:, None], other=0.0)
            out = tl.dot(mixed.to(vh.dtype), vh, input_precision=PRECISION)
            tl.store(DW2 + tq * H + h, tl.sum(grad.to(tl.float32) * out, 1), mask=q_ok)
            d_mixed += tl.dot(_dc_gated(grad, W2, tq, q_ok, h, H, vh.dtype), tl.trans(vh), input_precision=PRECISION)
        for h in tl.static_range(H):
            probs, _ = _dc_probs(Q, K, DOC, LSE, tq, tk, T, h, d, H, D, WINDOW, PRECISION)
            rowsum = tl.sum(probs * d_mixed, 1)
            tl.store(ROWSUM + tq * H + h, rowsum, mask=q_ok)
            weight = tl.load(MIX + tq * H + h, mask=q_ok, other=0.0)
            d_scores = weight[:, None] * probs * (d_mixed - rowsum[:, None])
            kh = tl.load(_dc_tile(K, tk, h, d, H, D), mask=k_ok[:, None], other=0.0)
            dq = tl.dot(d_scores.to(kh.dtype), kh, input_precision=PRECISION)
            tl.store(_dc_tile(DQ, tq, h, d, H, D), dq.to(DQ.dtype.element_ty), mask=q_ok[:, None])

    @triton.jit
    def _dc_backward_kv_kernel(Q, K, V, MIX, W2, DOC, LSE, GRAD, ROWSUM, DK, DV, T, H: tl.constexpr,
                               D: tl.constexpr, WINDOW: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                               PRECISION: tl.constexpr):
        """Per block of BQ keys and the BK queries that can see them: dv_h = A^T (w2_h grad_h),
        dk_h = (mix_h P_h (dA - E_h))^T Q_h."""
        k0 = tl.program_id(0) * BQ
        tk, tq, d = k0 + tl.arange(0, BQ), k0 + tl.arange(0, BK), tl.arange(0, D)
        q_ok, k_ok = tq < T, tk < T
        mixed = tl.zeros((BK, BQ), dtype=tl.float32)
        d_mixed = tl.zeros((BK, BQ), dtype=tl.float32)
        for h in tl.static_range(H):
            probs, _ = _dc_probs(Q, K, DOC, LSE, tq, tk, T, h, d, H, D, WINDOW, PRECISION)
            mixed += tl.load(MIX + tq * H + h, mask=q_ok, other=0.0)[:, None] * probs
            vh = tl.load(_dc_tile(V, tk, h, d, H, D), mask=k_ok[:, None], other=0.0)
            grad = tl.load(_dc_tile(GRAD, tq, h, d, H, D), mask=q_ok[:, None], other=0.0)
            d_mixed += tl.dot(_dc_gated(grad, W2, tq, q_ok, h, H, vh.dtype), tl.trans(vh), input_precision=PRECISION)
        for h in tl.static_range(H):
            probs, qh = _dc_probs(Q, K, DOC, LSE, tq, tk, T, h, d, H, D, WINDOW, PRECISION)
            grad = tl.load(_dc_tile(GRAD, tq, h, d, H, D), mask=q_ok[:, None], other=0.0)  # again: 6 heads' tiles
            gated = _dc_gated(grad, W2, tq, q_ok, h, H, qh.dtype)  # would not fit in registers
            dv = tl.dot(tl.trans(mixed.to(qh.dtype)), gated, input_precision=PRECISION)
            tl.store(_dc_tile(DV, tk, h, d, H, D), dv.to(DV.dtype.element_ty), mask=k_ok[:, None])
            weight = tl.load(MIX + tq * H + h, mask=q_ok, other=0.0)
            rowsum = tl.load(ROWSUM + tq * H + h, mask=q_ok, other=0.0)
            d_scores = weight[:, None] * probs * (d_mixed - rowsum[:, None])
            dk = tl.dot(tl.trans(d_scores.to(qh.dtype)), qh, input_precision=PRECISION)
            tl.store(_dc_tile(DK, tk, h, d, H, D), dk.to(DK.dtype.element_ty), mask=k_ok[:, None])


def _dc_launch_args(q: torch.Tensor):
    T, H, D = q.shape
    return dict(H=H, D=D, WINDOW=DC_WINDOW, BQ=DC_QUERIES, BK=DC_KEYS, PRECISION=_dot_precision(q.dtype),
                num_warps=DC_WARPS), (triton.cdiv(T, DC_QUERIES),)


@torch.library.custom_op(f"{OP_NAMESPACE}::dc_mix", mutates_args=())
def dc_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix: torch.Tensor, w2: torch.Tensor,
           doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(DC's correction [T, H, D] in v's dtype, log-sum-exp [T, H] fp32) by the Triton kernels: local_head_mix's
    math with mix = the RMS-normed w1 and w2 given in fp32 [T, H], doc [T] int32 each position's document."""
    q, k, v, mix, w2, doc = (t.contiguous() for t in (q, k, v, mix, w2, doc))
    out = torch.empty_like(v)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    meta, grid = _dc_launch_args(q)
    _dc_forward_kernel[grid](q, k, v, mix, w2, doc, out, lse, q.size(0), **meta)
    return out, lse


@dc_mix.register_fake
def _(q, k, v, mix, w2, doc):
    return torch.empty_like(v), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op(f"{OP_NAMESPACE}::dc_mix_backward", mutates_args=())
def dc_mix_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix: torch.Tensor,
                    w2: torch.Tensor, doc: torch.Tensor, lse: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmix, dw2) of dc_mix's output for its gradient grad."""
    grad, q, k, v, mix, w2, doc = (t.contiguous() for t in (grad, q, k, v, mix, w2, doc))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dw2, rowsum = torch.empty_like(mix), torch.empty_like(mix)
    meta, grid = _dc_launch_args(q)
    T = q.size(0)
    _dc_backward_q_kernel[grid](q, k, v, mix, w2, doc, lse, grad, dq, dw2, rowsum, T, **meta)
    _dc_backward_kv_kernel[grid](q, k, v, mix, w2, doc, lse, grad, rowsum, dk, dv, T, **meta)
    return dq, dk, dv, rowsum, dw2  # rowsum is dmix


@dc_mix_backward.register_fake
def _(grad, q, k, v, mix, w2, doc, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(mix), torch.empty_like(w2)


def _dc_mix_setup(ctx, inputs, output):
    q, k, v, mix, w2, doc = inputs
    ctx.save_for_backward(q, k, v, mix, w2, doc, output[1])


def _dc_mix_grad(ctx, grad_out, grad_lse):
    q, k, v, mix, w2, doc, lse = ctx.saved_tensors
    return *dc_mix_backward(grad_out, q, k, v, mix, w2, doc, lse), None


dc_mix.register_autograd(_dc_mix_grad, setup_context=_dc_mix_setup)


def local_head_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, w1: torch.Tensor,
                   w2: torch.Tensor, kernel: bool = False) -> torch.Tensor:
    """The DC correction [T, H, D] of a layer's attention output (lightweight dynamically composable attention,
    arXiv 2405.08553, in the speedrun's form, records #85): P_h[t, s] = softmax of q_h[t] . k_h[s] over the
    keys s in t - 111 .. t of t's document (the softmax scale is folded into q); A[t, s] = sum_h' n_h'[t]
    P_h'[t, s] with n = w1 RMS-normed over heads (eps 1e-6); out_h[t] = w2[t, h] sum_s A[t, s] v_h[s].
    q, k, v [T, H, D]; w1, w2 [T, H]; cu [T + 1] the document starts of document_bounds (padded with T).
    kernel: by the Triton kernels (dc_mix) where they run. Otherwise plain tensor ops: blocks of 128 queries
    score the 256 keys of their own and the previous block, so the work is O(T 256 H D) and the shapes are
    static (T is padded to whole blocks)."""
    T, H, D = q.shape
    pad = -T % DC_BLOCK
    n = (T + pad) // DC_BLOCK
    pos = torch.arange(T + pad, device=q.device)
    doc = torch.searchsorted(cu[1:], pos.to(cu.dtype), right=True)  # padded positions: one past the last document
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax and head mix in fp32 (fp64 stays fp64: tests)
    mix = F.rms_norm(w1.to(acc), (H,), eps=1e-6)
    if kernel and _triton_runs_on(q):
        return dc_mix(q, k, v, mix, w2.to(acc), doc[:T].to(torch.int32))[0]

    def blocks(x):  # [T, ...] -> [n, 128, ...]
        return F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad)).view(n, DC_BLOCK, *x.shape[1:])

    def with_previous(xb):  # [n, 128, ...] -> [n, 256, ...]: the previous block (zeros before the first), then its own
        return torch.cat([torch.cat([torch.zeros_like(xb[:1]), xb[:-1]]), xb], dim=1)

    t = pos.view(n, DC_BLOCK)
    s = t[:, :1] - DC_BLOCK + torch.arange(2 * DC_BLOCK, device=q.device)  # key positions [n, 256]
    delta = t[:, :, None] - s[:, None, :]
    visible = (s[:, None, :] >= 0) & (delta >= 0) & (delta < DC_WINDOW)
    visible = visible & (doc.view(n, DC_BLOCK)[:, :, None] == doc[s.clamp_min(0)][:, None, :])  # [n, 128, 256]
    scores = torch.einsum("bqhd,bkhd->bhqk", blocks(q), with_previous(blocks(k))).to(acc)
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)  # the diagonal is always visible
    # A product and a sum over the heads rather than an einsum: as a contraction over 6 heads the einsum ran as
    # float32 matrix-vector kernels (README: "Per-token gates, MUDD and DC"); this form Inductor can fuse with
    # the softmax, so the probabilities need not be written out
    a = (probs * blocks(mix).transpose(1, 2)[..., None]).sum(1)
    out = torch.einsum("bqk,bkhd->bqhd", a.type_as(v), with_previous(blocks(v)))
    return (out * blocks(w2.type_as(v))[..., None]).reshape(n * DC_BLOCK, H, D)[:T]


GATE_DIMS = 12  # gates read the first 12 dims of their input (the speedrun's sparse gates, records #28, #34)
VE_GATE_DIMS = 6  # value-embedding gates read 6 dims of the attention input and 6 of the value embedding
RESIDUAL_INIT = 1.1 ** 0.5  # each sublayer scales the residual by this at init: 1.1 per layer (records #45)


def _init_linear_(w: torch.Tensor):
    bound = 3 ** 0.5 * 0.5 / w.size(-1) ** 0.5  # uniform with std 0.5 / sqrt(fan_in)
    with torch.no_grad():
        w.uniform_(-bound, bound)


@dataclass(frozen=True)
class LayerSpec:
    """What one layer has (parse_recipe's layer sets, read for layer i)."""
    attention: str  # "L", "S" or "-"
    value_embed: int | None  # index of its value-embedding table
    xsa: bool
    attn_gate: bool
    key_offset: bool
    paired: bool
    dc: bool
    dynamic_gates: bool  # XSA and output gates come per token from the gate generators (GPT.forward)
    mudd: bool  # the last layer under MUDD: its sublayer weights and value-embedding gate come from MUDD_IN


def layer_specs(hp: Hyperparameters, r: Recipe) -> list[LayerSpec]:
    return [LayerSpec(kind, r.value_embed_layers.index(i) if i in r.value_embed_layers else None,
                      i in r.xsa_layers, i in r.attn_gate_layers, i in r.key_offset_layers, i in r.paired_head_layers,
                      i in r.dc_layers, r.gate_split > 0, hp.mudd and i == hp.num_layers - 1)
            for i, kind in enumerate(hp.layer_attention)]


MLP_PROJ_LR_MUL = 2.0  # Muon lr multiplier of the MLP's output matrix (the speedrun's, records #48 and later)


# The per-layer scalars, each table in the order of the rows of its [L, n] parameter, with their initial
# values: the residual weights r and the sublayer weights p of attention and MLP (x <- r x + p f(x)), in
# GPT.resid_scalars and GPT.post_scalars (Adam lrs and betas of their own: the public's resid_lambdas and
# post_lambdas), and in GPT.layer_scalars the gates of x0 and of the bigram embedding added after attention,
# and the scale of the values.
RESID_SCALARS = dict(resid_attn=RESIDUAL_INIT, resid_mlp=RESIDUAL_INIT)
POST_SCALARS = dict(post_attn=1.0, post_mlp=1.0)
LAYER_SCALARS = dict(x0_gate=0.0, bigram_gate=0.05, value_scale=0.5)
# The model-wide scalars: the bigram gate before layer 0, the skip's sigmoid logit and gate (their product
# starts near 0.09), the backout weight of the cached layer, and the smear weight (0: starts off).
GLOBAL_SCALARS = dict(bigram_gate=0.05, skip_logit=-1.5, skip_gate=0.5, backout=0.5, smear=0.0)
# With --gate_split_layer > 0 these come per token from the gate generators instead; MUDD replaces the backout.
DYNAMIC_LAYER_SCALARS = ("x0_gate", "bigram_gate")
DYNAMIC_GLOBAL_SCALARS = ("bigram_gate", "skip_gate")

COEF_HIDDEN = 64  # hidden width of the coefficient generators (records #81, #85)
MUDD_SCALE = 0.1  # MUDD's fixed output scale (records #81)
GATE_SCALE_INIT = 0.1  # initial value of the dynamic gates' learned output scale (records #85: for stability)


class CoefficientGenerator(nn.Module):
    """Per-token coefficients c = s (W2 gelu(W1 x) + b) [T, n] of x [T, dim] (the MUDD generator, arXiv
    2502.12170, as the speedrun trims it: records #81 for MUDD with s = 0.1 fixed, #85 for the gates with s
    learned). W1 [64, dim] has nn.Linear's default init, W2 [n, 64] starts at zero and b at init / s, so each
    coefficient starts at `init`, the value of the quantity it replaces."""

    def __init__(self, dim: int, init: list[float], scale: float, learn_scale: bool):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(COEF_HIDDEN, dim))
        nn.init.kaiming_uniform_(self.w1, a=math.sqrt(5))  # nn.Linear's default
        self.w2 = nn.Parameter(torch.zeros(len(init), COEF_HIDDEN))
        self.b = nn.Parameter(torch.tensor(init, dtype=torch.float32) / scale)
        self.scale = nn.Parameter(torch.tensor(float(scale))) if learn_scale else None
        self.fixed_scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(F.gelu(F.linear(x, self.w1.type_as(x))), self.w2.type_as(x), self.b.type_as(x))
        return out * (self.fixed_scale if self.scale is None else self.scale.type_as(x))

    def adam_params(self, lr: float, betas, wd: float) -> list:
        """DistAdam entries: decay on the matrices only."""
        scale = [] if self.scale is None else [(self.scale, lr, betas, 0.0)]
        return [(self.w1, lr, betas, wd), (self.w2, lr, betas, wd), (self.b, lr, betas, 0.0)] + scale


# The dynamic gates (records #85), per kind: width (1, or "heads": one per head) and initial value. Blocks read
# the kinds in BLOCK_GATES; bigram_gate of layer 0 weights the bigram before layer 0, skip_gate the skip.
GATE_KINDS = dict(xsa=("heads", 0.0), attn_gate=("heads", 0.25), x0_gate=(1, 0.0), bigram_gate=(1, 0.05),
                  skip_gate=(1, 0.5), dc_w1=("heads", 1.0), dc_w2=("heads", 0.0))
BLOCK_GATES = ("xsa", "attn_gate", "x0_gate", "bigram_gate", "dc_w1", "dc_w2")


def gate_layout(hp: Hyperparameters, r: Recipe) -> tuple[list, list]:
    """(pre, post): the outputs of the gate generator on x0 (layers before r.gate_split) and of the one on the
    residual entering layer r.gate_split (the rest), each a list of (kind, layer, width) in output order:
    XSA strengths, output gates, (x0 gate, bigram gate) of each attention layer in order (the MUDD layer's
    come from MUDD_IN), the skip gate, DC's w1 then w2. At the default recipe this is the speedrun's 26 + 41
    outputs (records #85)."""
    L = hp.num_layers
    mixed = [i for i, kind in enumerate(hp.layer_attention) if kind != "-" and not (hp.mudd and i == L - 1)]
    entries = [("xsa", i) for i in sorted(r.xsa_layers)] + [("attn_gate", i) for i in sorted(r.attn_gate_layers)]
    for i in range(L):
        entries += [("x0_gate", i)] if i in mixed else []
        entries += [("bigram_gate", i)] if hp.bigram_buckets and (i in mixed or i == 0) else []
    entries += [("skip_gate", r.skip[1])] if r.skip else []
    entries += [("dc_w1", i) for i in sorted(r.dc_layers)] + [("dc_w2", i) for i in sorted(r.dc_layers)]
    width = {kind: hp.num_heads if w == "heads" else w for kind, (w, _) in GATE_KINDS.items()}
    layout = [(kind, i, width[kind]) for kind, i in entries]
    return [e for e in layout if e[1] < r.gate_split], [e for e in layout if e[1] >= r.gate_split]


# MUDD at the start of the last layer (records #81), coefficient -> initial value, in output order. With x the
# layer's input, e the residual after the bigram before layer 0 and c the cached layer's output: the values add
# v_embed e + v_cached c + v_resid x; then x <- (1 + x_resid) x + x_embed e + x_cached c; the value-embedding
# gate is ve_gate_a on the first half of the heads, ve_gate_b on the rest; then the layer's sublayer weights,
# its x0 gate weighting e. The initial values are the static path's, but for the value-embedding gate (2, not 1).
MUDD_IN = dict(v_embed=0.0, v_cached=0.0, v_resid=0.0, x_embed=0.0, x_cached=0.0, x_resid=0.0, ve_gate_a=2.0,
               ve_gate_b=2.0, resid_attn=RESIDUAL_INIT, post_attn=1.0, x0_gate=0.0, bigram_gate=0.05,
               resid_mlp=RESIDUAL_INIT, post_mlp=1.0)
# MUDD after the last layer: x += embed e + cached c + last_input x_L + value_embed ve_0 + skip s, with x_L the
# last layer's input, ve_0 the first value embedding, s the skip's source output; cached -0.5 is the backout.
MUDD_OUT = dict(embed=0.0, cached=-0.5, last_input=0.0, value_embed=0.0, skip=0.0)


def coefficient_columns(c: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """Name -> column [T, 1] of c [T, len(names)]."""
    return {name: col for name, col in zip(names, c.split(1, dim=-1), strict=True)}


def mudd_enter(c: dict, x, embed, cached) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual, value addition [T, dim]) at the start of the last layer: MUDD_IN's mix, c its columns."""
    value_add = c["v_embed"] * embed + c["v_cached"] * cached + c["v_resid"] * x
    return (1 + c["x_resid"]) * x + c["x_embed"] * embed + c["x_cached"] * cached, value_add


def mudd_exit(c: dict, x, embed, cached, last_input, value_embed, skip) -> torch.Tensor:
    """The final residual after MUDD_OUT's mix, c its columns."""
    return (x + c["embed"] * embed + c["cached"] * cached + c["last_input"] * last_input
            + c["value_embed"] * value_embed + c["skip"] * skip)


class Block(nn.Module):
    """One layer: x <- r_a x + p_a attn(norm(x or the cached layer's output)) + g_0 x0 + g_b bigram, then
    x <- r_m x + p_m mlp(norm(x)). Attention: QK-normed heads, half-truncated RoPE, optional value
    embedding (gated per head), key offset, paired heads, DC, XSA and output gate; the MLP is ReLU^2.
    Weights and gates come in a dict (GPT.forward): 0-d per layer, or per token ([T, 1], [T, H])."""

    def __init__(self, hp: Hyperparameters, rotary: Rotary, spec: LayerSpec):
        super().__init__()
        hdim, H, D = hp.num_heads * hp.head_dim, hp.num_heads, hp.head_dim
        self.num_heads, self.head_dim, self.spec, self.rotary = H, D, spec, rotary
        attention = spec.attention != "-"
        # Q and K as blocks of two heads ([Q blocks; K blocks], each [2 D, dim]), which Muon orthogonalizes one
        # by one (the speedrun's per-pair Q/K, records #80); block j holds heads j and j + H/2, the pair that
        # paired attention interleaves. --muon_qk_blocks=whole: the same memory as [Q; K], each [H D, dim], so
        # the same initial weights and model, and Muon orthogonalizes Q and K whole. V [hdim, dim]; O stored
        # [dim, hdim] (out, in) like the other matrices, so NorMuon's per-row statistic is per output channel (the
        # public's) and Muon's shape scale max(1, m/n)^0.5 reads it as out over in; --normuon_out_rows=false
        # stores O [hdim, dim] (in, out), applied transposed: per input channel of a square O.
        self.o_out_in = hp.normuon_out_rows
        o_shape = (hp.model_dim, hdim) if self.o_out_in else (hdim, hp.model_dim)
        qk_shape = (H, 2 * D, hp.model_dim) if hp.muon_qk_blocks == "pair" else (2, hdim, hp.model_dim)
        self.qk_w = nn.Parameter(torch.empty(qk_shape)) if attention else None
        self.v_w = nn.Parameter(torch.empty(hdim, hp.model_dim)) if attention else None
        self.o_w = nn.Parameter(torch.empty(o_shape)) if attention else None
        # Both MLP matrices stored [hidden, dim] (the output one applied transposed), so Muon's shape scale and
        # NorMuon's per-row statistic treat them alike: per hidden unit.
        self.mlp_fc = nn.Parameter(torch.empty(hp.mlp_ratio * hp.model_dim, hp.model_dim))
        self.mlp_proj = nn.Parameter(torch.zeros(hp.mlp_ratio * hp.model_dim, hp.model_dim))
        self.fused_mlp, self.fp8_mlp_up, self.fp8_qkv = hp.fused_mlp, hp.fp8_mlp_up, hp.fp8_qkv
        self.fp8_mlp_down = hp.fp8_mlp_down
        self.dc_kernel = hp.dc_kernel
        _init_linear_(self.mlp_fc)
        if attention:
            _init_linear_(self.qk_w)
            vo = torch.empty(2, hdim, hp.model_dim)
            _init_linear_(vo)  # V and O in one draw: the same initial weights in either layout of O
            with torch.no_grad():
                self.v_w.copy_(vo[0])
                self.o_w.copy_(vo[1].T if self.o_out_in else vo[1])
        # Static gates start neutral: 2 sigmoid(0) = 1 for the value embedding, sigmoid(0) = 1/2 on the output.
        static = not spec.dynamic_gates
        self.ve_gate = (nn.Parameter(torch.zeros(H, 2 * VE_GATE_DIMS))
                        if spec.value_embed is not None and not spec.mudd else None)
        self.attn_gate = nn.Parameter(torch.zeros(H, GATE_DIMS)) if spec.attn_gate and static else None
        self.xsa_alpha = nn.Parameter(torch.zeros(H)) if spec.xsa and static else None

    def matrices(self):
        """(matrix parameter, Muon lr multiplier) pairs."""
        pairs = [(self.qk_w, 1.0), (self.v_w, 1.0), (self.o_w, 1.0), (self.mlp_fc, 1.0),
                 (self.mlp_proj, MLP_PROJ_LR_MUL)]
        return [(p, lr_mul) for p, lr_mul in pairs if p is not None]

    def qkv_weight(self, dtype) -> torch.Tensor:
        """[3 hdim, dim]: the rows of q, k and v in head order (head e H/2 + j is half e of Q/K block j)."""
        H, D = self.num_heads, self.head_dim
        qk = self.qk_w.view(2, H // 2, 2, D, -1).transpose(1, 2).reshape(2 * H * D, -1)
        return torch.cat([qk, self.v_w]).to(dtype)

    def attention(self, xhat, ve, s, cu, attn_meta, attn_scale, row_pos=None):
        T = xhat.size(0)
        H, D = self.num_heads, self.head_dim
        w = self.qkv_weight(xhat.dtype)
        if fp8_applies(self.fp8_qkv, xhat):
            qkv = FP8ForwardLinear.apply(xhat, w, normed_e4m3_scale(xhat.size(-1)))
        else:
            qkv = F.linear(xhat, w)
        q, k, v = qkv.view(T, 3 * H, D).chunk(3, dim=-2)
        q, k, v = rms_norm(q), rms_norm(k), s["value_scale"] * v
        if ve is not None:
            if self.ve_gate is None:  # MUDD's gate
                gate = s["ve_gate"]
            else:
                gate_in = torch.cat([xhat[..., :VE_GATE_DIMS], ve[..., :VE_GATE_DIMS]], dim=-1)
                gate = 2 * torch.sigmoid(F.linear(gate_in, self.ve_gate.type_as(xhat)))  # [T, H]
            v = v + gate[..., None] * ve.view(T, H, D)
        if self.spec.mudd:
            v = v + s["value_add"].view(T, H, D)
        kind = self.spec.attention
        if self.spec.paired:
            # Paired heads (the speedrun's #58): documents double in length, the window stays.
            q, k, v = pair_heads(q), pair_heads(k), pair_heads(v)
            cu, kind = 2 * cu, "P" + kind
            if row_pos is not None:  # token t's two heads sit at places 2p and 2p + 1 of its row's sequence
                row_pos = torch.stack([2 * row_pos, 2 * row_pos + 1], dim=1).view(-1)
        q, k = self.rotary(q, row_pos), self.rotary(k, row_pos)
        if self.spec.key_offset:
            k = shift_unrotated_keys(k, self.rotary.unrotated, row_pos)
        # The scale is folded into q (a tensor, so YaRN's changes of it do not recompile the graph).
        q = q * attn_scale.type_as(q) if isinstance(attn_scale, torch.Tensor) else q * attn_scale
        y, _ = window_attention(q, k, v, cu, attn_meta[kind])
        y = y.view(T, H, D)
        if self.spec.dc:
            y = y + local_head_mix(q, k, v, cu, s["dc_w1"], s["dc_w2"], kernel=self.dc_kernel)
        if self.spec.xsa:
            y = exclude_self_value(y, v, s["xsa"] if self.xsa_alpha is None else self.xsa_alpha.type_as(y))
        if self.spec.attn_gate:
            if self.attn_gate is None:  # per token, linear (records #85)
                gate = s["attn_gate"]
            else:
                gate = torch.sigmoid(F.linear(xhat[..., :GATE_DIMS], self.attn_gate.type_as(xhat)))
            y = y * gate[..., None]
        y = y.reshape(T, H * D)
        return F.linear(y, self.o_w.type_as(y)) if self.o_out_in else y @ self.o_w.type_as(y)

    def forward(self, x, x0, bigram, ve, cached, s, cu, attn_meta, attn_scale, row_pos=None):
        """x, x0 [T, dim]; bigram (None at layer 0 or when off), ve, cached: [T, dim] or None; s: this layer's
        weights and gates by name (RESID_SCALARS, POST_SCALARS, LAYER_SCALARS, BLOCK_GATES, MUDD_IN's ve_gate
        [T, H] and value_add [T, dim]); cu, attn_meta: the documents and windows (GPT.forward); attn_scale:
        a float, or a 0-d tensor; row_pos: the rows x joins (GPT.forward)."""
        if self.qk_w is not None:
            xhat = rms_norm(x if cached is None else cached)
            attn = self.attention(xhat, ve, s, cu, attn_meta, attn_scale, row_pos)
            x = s["resid_attn"] * x + s["post_attn"] * attn + s["x0_gate"] * x0
            if bigram is not None:
                x = x + s["bigram_gate"] * bigram
        xn, w1, w2 = rms_norm(x), self.mlp_fc.type_as(x), self.mlp_proj.type_as(x)
        if self.fused_mlp and _triton_runs_on(xn):
            x_scale = normed_e4m3_scale(xn.size(-1)) if fp8_applies(self.fp8_mlp_up, xn) else None
            mlp = ReluSquaredMLP.apply(xn, w1, w2, x_scale, fp8_applies(self.fp8_mlp_down, xn))
        else:
            mlp = F.relu(F.linear(xn, w1)).square() @ w2
        return s["resid_mlp"] * x + s["post_mlp"] * mlp


BIGRAM_HASH = (36313, 27191)  # multipliers of the current and previous token ids (the speedrun's, #62)
BIGRAM_SIGN_ROWS = 8192  # rows of the fixed +-1 table that decorrelates colliding bigrams (#83)
BIGRAM_SIGN_SEED = 1234  # the sign table is the same on every rank and run


def bigram_indices(tokens: torch.Tensor, buckets: int, row_pos: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hash row, sign row) of each position's bigram (previous, current token) of tokens [T], rows joined at
    row_pos (row_positions; None: one row): h_t = (36313 x_t XOR 27191 x_{t-1}) mod (buckets - 1),
    s_t = (x_{t-1} XOR x_t) mod 8192; a row's first position has no previous token and gets the reserved row
    buckets - 1 and sign row 0 (the speedrun's hash, records #62, #83; the sign trick is Chen et al., arXiv
    1504.04788)."""
    x = tokens.long()
    prev = torch.cat([x[:1], x[:-1]])
    first = torch.arange(x.numel(), device=x.device) == 0 if row_pos is None else row_pos == 0
    h = torch.where(first, buckets - 1, ((BIGRAM_HASH[0] * x) ^ (BIGRAM_HASH[1] * prev)) % (buckets - 1))
    s = torch.where(first, 0, (prev ^ x) % BIGRAM_SIGN_ROWS)
    return h, s


class GPT(nn.Module):
    """The speedrun's 2026 architecture in the form the Hyperparameters' layer sets give it: token embedding
    with smear, hashed bigram embedding, value embeddings, a skip connection, attention of the last layers
    reading a cached layer's output (subtracted again at the end, or per token under MUDD), per-token gates,
    MUDD connections into the last layer and the output, DC, and a softcapped head trained on several next
    tokens. Returns the weighted sum of the token losses (fp32)."""

    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.hp, self.recipe = hp, parse_recipe(hp)
        self.specs = layer_specs(hp, self.recipe)
        V, D, L = hp.vocab_size, hp.model_dim, hp.num_layers
        # Head and embedding share one initial matrix (tied until --untie_stage; the speedrun's #51, #53).
        self.lm_head_w = nn.Parameter(0.005 * torch.randn(V, D))
        self.embed = nn.Embedding(V, D)
        with torch.no_grad():
            self.embed.weight.copy_(self.lm_head_w)
        self.value_embeds = nn.ParameterList([nn.Parameter(0.01 * torch.randn(V, D))
                                              for _ in self.recipe.value_embed_layers])
        self.bigram = nn.Parameter(torch.zeros(hp.bigram_buckets, D)) if hp.bigram_buckets else None
        if hp.bigram_buckets:
            g = torch.Generator().manual_seed(BIGRAM_SIGN_SEED)
            signs = 2 * torch.randint(0, 2, (BIGRAM_SIGN_ROWS, D), generator=g, device="cpu") - 1
            self.register_buffer("bigram_signs", signs.to(torch.get_default_device(), torch.float32), persistent=False)
        self.smear_gate = nn.Parameter(torch.zeros(GATE_DIMS)) if hp.smear else None
        rotary = Rotary(hp.head_dim, 2 * max(longest_train_row(self.recipe), hp.val_seq_len))  # paired: 2T positions
        self.blocks = nn.ModuleList([Block(hp, rotary, spec) for spec in self.specs])
        split = self.recipe.gate_split
        self.layer_scalar_names = tuple(n for n in LAYER_SCALARS if not (split and n in DYNAMIC_LAYER_SCALARS))
        self.global_scalar_names = tuple(n for n in GLOBAL_SCALARS if not (split and n in DYNAMIC_GLOBAL_SCALARS)
                                         and not (hp.mudd and n == "backout"))
        # (Under MUDD the last rows of resid_scalars and post_scalars are unused: MUDD_IN has them per token.)
        layer_init = torch.tensor([LAYER_SCALARS[n] for n in self.layer_scalar_names])
        # 1 / the step's row count over all ranks, set by the trainer: the FP8 head's gradient scale follows the loss's.
        self.register_buffer("head_grad_scale", torch.ones(()), persistent=False)
        # Each token's byte-prefix token (-1: none), filled by the trainer from --prefix_vocab (prefix_token_table).
        self.register_buffer("prefix_table", torch.full((hp.vocab_size,), -1, dtype=torch.long), persistent=False)
        self.resid_scalars = nn.Parameter(torch.tensor(list(RESID_SCALARS.values())).repeat(L, 1))
        self.post_scalars = nn.Parameter(torch.tensor(list(POST_SCALARS.values())).repeat(L, 1))
        self.layer_scalars = nn.Parameter(layer_init.repeat(L, 1))
        self.global_scalars = nn.Parameter(torch.tensor([GLOBAL_SCALARS[n] for n in self.global_scalar_names]))
        self.gate_layouts = gate_layout(hp, self.recipe) if split else ([], [])
        self.pre_gate, self.post_gate = (
            CoefficientGenerator(D, [GATE_KINDS[kind][1] for kind, _, w in layout for _ in range(w)],
                                 GATE_SCALE_INIT, learn_scale=True)
            if layout else None for layout in self.gate_layouts)
        self.mudd_in = CoefficientGenerator(D, list(MUDD_IN.values()), MUDD_SCALE, False) if hp.mudd else None
        self.mudd_out = CoefficientGenerator(D, list(MUDD_OUT.values()), MUDD_SCALE, False) if hp.mudd else None

    @property
    def rotary(self) -> Rotary:
        return self.blocks[0].rotary

    def hidden_matrices(self):
        """(matrix, Muon lr multiplier) pairs of every block."""
        return [pair for b in self.blocks for pair in b.matrices()]

    def layer_scalar_tables(self) -> list:
        """(column names, [L, n] parameter) of each table of per-layer scalars."""
        return [(tuple(RESID_SCALARS), self.resid_scalars), (tuple(POST_SCALARS), self.post_scalars),
                (self.layer_scalar_names, self.layer_scalars)]

    def layer_weights(self, i: int) -> dict:
        """Layer i's scalars by name (0-d): its row of every table of layer_scalar_tables."""
        return {name: w for names, table in self.layer_scalar_tables() for name, w in zip(names, table[i].unbind(0))}

    def compile_per_block(self, backend: str = "inductor"):
        """torch.compile each block and the head separately, in place (validation always; training with
        `--compile_per_block`): blocks of one kind share a compiled graph, and new documents or windows
        (tensors, see window_attention) do not recompile a block."""
        # Training and no-grad graphs of every layer kind hang off Block.forward's one code object; dynamo's
        # default limit of 8 per code object is too few for them.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in self.blocks:
            block.compile(backend=backend, dynamic=False)
        self.head_loss = torch.compile(self.head_loss, backend=backend, dynamic=False)

    def adam_generators(self):
        """(coefficient generator, Adam lr) pairs: MUDD's and the gates'."""
        hp = self.hp
        pairs = [(self.pre_gate, hp.adam_lr_dynamic_gate), (self.post_gate, hp.adam_lr_dynamic_gate),
                 (self.mudd_in, hp.adam_lr_mudd), (self.mudd_out, hp.adam_lr_mudd)]
        return [(gen, lr) for gen, lr in pairs if gen is not None]

    def embedding_rows(self, inputs: torch.Tensor, row_pos: torch.Tensor | None = None):
        """(token rows, bigram rows, bigram sign index, [value-embedding rows]) of this micro-batch (rows joined at
        row_pos, row_positions; None: one row), in the tables' dtype (the bigram ones None without the table)."""
        h, s = bigram_indices(inputs, self.hp.bigram_buckets, row_pos) if self.bigram is not None else (None, None)
        return (F.embedding(inputs, self.embed.weight), None if h is None else F.embedding(h, self.bigram), s,
                [F.embedding(inputs, table) for table in self.value_embeds])

    def smear(self, e: torch.Tensor, row_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings e [T, dim] (rows joined at row_pos, row_positions; None: one row) with smear:
        e_t += lambda sigmoid(w . e_t[:12]) e_{t-1} (records #34), except at a row's first position."""
        if self.smear_gate is None:
            return e
        gate = torch.sigmoid(F.linear(e[1:, :GATE_DIMS], self.smear_gate.type_as(e)[None]))
        if row_pos is not None:
            gate = gate * (row_pos[1:] != 0)[:, None]
        smear = self.global_scalars[self.global_scalar_names.index("smear")]
        return torch.cat([e[:1], e[1:] + smear * gate * e[:-1]])

    @staticmethod
    def _gates(generator, layout, x) -> dict:
        """(kind, layer) -> the generator's per-token gates of x, [T, width]."""
        return {(kind, i): g for (kind, i, _), g in zip(layout, generator(x).split([w for *_, w in layout], -1))}

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, cu: torch.Tensor, attn_meta: dict, attn_scale,
                loss_weights: torch.Tensor, row_pos: torch.Tensor | None = None) -> torch.Tensor:
        """inputs, targets [T] (targets -100 are ignored); cu [T + 1] the document starts (int32,
        document_bounds); attn_meta: attention_meta's CPU tensors per layer kind; attn_scale the softmax scale
        (float or 0-d tensor); loss_weights [K] of head_loss (with the recipe's prefix loss the last one is the
        prefix target's: StepPlan.loss_weights); row_pos [T]: each position's place in its row when inputs joins
        several equal rows (row_positions; None: one row). Each row starts a document in cu; what looks at the
        previous position or further ahead stops at their boundaries, so the result is the sum of the rows' own.
        Returns the weighted sum of the token losses (fp32)."""
        hp, split = self.hp, self.recipe.gate_split
        dtype = torch.bfloat16 if inputs.is_cuda else torch.float32
        g = dict(zip(self.global_scalar_names, self.global_scalars.unbind(0)))
        token_rows, bigram_rows, bigram_sign, ve_rows = self.embedding_rows(inputs, row_pos)
        x = x0 = rms_norm(self.smear(token_rows.to(dtype), row_pos))
        gates = self._gates(self.pre_gate, self.gate_layouts[0], x0) if self.pre_gate is not None else {}
        if split:  # the static gates' names read the per-token ones
            g["bigram_gate"] = gates.get(("bigram_gate", 0))
        bigram = None
        if self.bigram is not None:
            bigram = bigram_rows.to(dtype) * self.bigram_signs[bigram_sign].to(dtype)
            x = x + g["bigram_gate"] * bigram
        embedded = x
        ves = [table_rows.to(dtype) for table_rows in ve_rows]
        skip, cached, skip_saved = self.recipe.skip, None, None
        for i, (block, spec) in enumerate(zip(self.blocks, self.specs)):
            if i == split and self.post_gate is not None:
                gates |= self._gates(self.post_gate, self.gate_layouts[1], x)
            if skip is not None and i == skip[1]:
                gate = gates[("skip_gate", i)] if split else g["skip_gate"]
                x = x + torch.sigmoid(g["skip_logit"]) * gate * skip_saved
            s = self.layer_weights(i)
            s |= {kind: gates[(kind, i)] for kind in BLOCK_GATES if (kind, i) in gates}
            layer_x0 = x0
            if spec.mudd:
                c = coefficient_columns(self.mudd_in(x), MUDD_IN)
                last_input = x
                x, s["value_add"] = mudd_enter(c, x, embedded, cached)
                H = hp.num_heads
                s["ve_gate"] = torch.cat([c["ve_gate_a"].expand(-1, H // 2), c["ve_gate_b"].expand(-1, H - H // 2)], -1)
                s |= {name: c[name] for name in ("resid_attn", "post_attn", "x0_gate", "bigram_gate", "resid_mlp",
                                                 "post_mlp")}
                layer_x0 = embedded  # MUDD's x0 term weights the residual after the first bigram (records #81)
            ve = ves[spec.value_embed] if spec.value_embed is not None else None
            x = block(x, layer_x0, bigram if i > 0 else None, ve, cached, s, cu, attn_meta, attn_scale, row_pos)
            if skip is not None and i == skip[0]:
                skip_saved = x
            if i == hp.cache_layer:
                cached = x
        if self.mudd_out is not None:
            c = coefficient_columns(self.mudd_out(x), MUDD_OUT)
            x = mudd_exit(c, x, embedded, cached, last_input, ves[0], skip_saved)
        elif cached is not None:
            x = x - g["backout"] * cached
        return self.head_loss(x, targets, loss_weights, row_pos)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, loss_weights: torch.Tensor,
                  row_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Softcapped multi-target loss (softcap_mtp_ce) of the final hidden states x [T, dim], summed (fp32):
        sum_t sum_k loss_weights[k] CE(logits_t, y_tk). y_t0 is the next token; k >= 1 train the same logits to
        also predict later tokens (multi-token prediction without extra heads, the speedrun's #53); with the
        recipe's prefix loss the last weight's target is the next token's longest byte prefix that is itself a
        token (records #88: an easier neighbour of the answer), where it has one."""
        hp = self.hp
        x = rms_norm(x)
        prefix = self.recipe.prefix_loss
        y = target_matrix(targets, loss_weights.numel() - prefix, self.prefix_table if prefix else None, row_pos)
        softcap = (hp.logit_softcap, hp.logit_offset, hp.logit_temp)
        if fp8_applies(hp.fp8_head, x):
            scales = (normed_e4m3_scale(hp.model_dim), FP8_HEAD_W_MAX / FP8_E4M3_MAX)
            if hp.fp8_head_fused_grad:
                return FP8HeadLoss.apply(x, self.lm_head_w, y, loss_weights, *scales, *softcap)
            logits = FP8Linear.apply(x, self.lm_head_w, *scales, self.head_grad_scale * FP8_HEAD_GRAD_SCALE)  # bf16
        else:
            logits = F.linear(x, self.lm_head_w.type_as(x))
        # Softcapped into (0, cap), asymmetric around z = 0 (the speedrun's form since records #54), inside the loss:
        # the fused kernels on GPU, autograd through the reference on CPU.
        loss = softcap_mtp_ce if _triton_runs_on(logits) else softcap_mtp_ce_reference
        token_losses, _ = loss(logits, y, loss_weights, *softcap)
        return token_losses.sum()


# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


class DataError(RuntimeError):
    """Missing, corrupt or exhausted data; the message names the file and what to do."""


def read_shard_header(path: str) -> int:
    """The token count of a shard, after checking its header and size against each other.

    Format (modded-nanogpt): 256 little-endian int32 (magic 20240520, version 1, token count), then
    the tokens as little-endian uint16.
    """
    try:
        size = os.path.getsize(path)
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if header.size < HEADER_INTS:
        raise DataError(f"{path}: truncated header ({size} bytes, need {4 * HEADER_INTS}); re-download the shard")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = 4 * HEADER_INTS + 2 * count
    if size != expected:
        raise DataError(f"{path}: size mismatch: header says {count} tokens ({expected} bytes), file has "
                        f"{size} bytes; the file is truncated or corrupt, re-download it")
    return count


def read_shard(path: str, vocab: int) -> np.ndarray:
    """Tokens of one shard (read-only memmap), after checking header, size and token range (ids < vocab)."""
    count = read_shard_header(path)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=4 * HEADER_INTS, shape=(count,))
    top = int(tokens.max()) if count else 0
    if top >= vocab:
        raise DataError(f"{path}: token id {top} is not below --tokenizer_vocab={vocab}; the shard is corrupt or "
                        "not made with this tokenizer (GPT-2 ids end at 50256)")
    return tokens


def list_shards(pattern: str, flag: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no files match --{flag}={pattern!r}; download FineWeb with "
                        f"`python data/cached_fineweb10B.py 9` or point --{flag} at your shards")
    return files


def next_row_start(bos: np.ndarray, pos: int, n_tokens: int, seq_len: int) -> int | None:
    """Where the next training row (seq_len + 1 tokens) begins in a shard of n_tokens whose BOS positions are
    `bos`, the previous row having ended at `pos`; None if no whole row fits in the rest of the shard.

    A row begins at the first document start (BOS) at or after pos, so the tail of the document the last
    row cut is skipped (the speedrun's BOS-aligned rows), unless that document runs on for a whole row or
    more: then the row continues it from pos. Long documents are thus used whole, in row-sized pieces."""
    i = int(np.searchsorted(bos, pos))
    following = int(bos[i]) if i < len(bos) else n_tokens
    start = pos if following - pos >= seq_len else following
    return start if start + seq_len + 1 <= n_tokens else None


def rows_in_shard(bos: np.ndarray, n_tokens: int, seq_len: int) -> int:
    """How many rows one pass over a shard yields (the rule of next_row_start)."""
    rows, pos = 0, 0
    while (start := next_row_start(bos, pos, n_tokens, seq_len)) is not None:
        rows, pos = rows + 1, start + seq_len
    return rows


def document_pieces(bos: np.ndarray, pos: int, n_tokens: int, clip: int, split: bool):
    """The pieces (start, stop, continued) that rows take from a shard, in order, from pos on: each document
    that begins at or after pos, cut to its first `clip` tokens. With `split` nothing is dropped: a longer
    document goes on in pieces of clip - 1 tokens that each follow an inserted BOS (continued=True), so
    every piece is at most clip tokens, and a pos inside a document first yields the rest of it."""
    i = int(np.searchsorted(bos, pos))
    if split:
        yield from _continuations(pos, int(bos[i]) if i < len(bos) else n_tokens, clip)
    for j in range(i, len(bos)):  # lazily: a row takes a few dozen of the shard's documents
        start, end = int(bos[j]), int(bos[j + 1]) if j + 1 < len(bos) else n_tokens
        yield start, min(start + clip, end), False
        if split:
            yield from _continuations(start + clip, end, clip)


def _continuations(pos: int, end: int, clip: int):
    for start in range(pos, end, clip - 1):
        yield start, min(start + clip - 1, end), True


def clipped_row(bos: np.ndarray, pos: int, n_tokens: int, seq_len: int, clip: int, split: bool = False):
    """A row of seq_len + 1 tokens packed from document_pieces (the speedrun's clipping, records #29 and #72,
    which drops the rest of a long document; or, with `split`, that rest in further pieces); the last piece
    is cut to fill the row. Returns (segments [(start, length)], where the next row's pieces begin), a
    segment with start -1 being one inserted BOS; None if the shard's remaining pieces cannot fill a row."""
    need, segments = seq_len + 1, []
    for start, stop, continued in document_pieces(bos, pos, n_tokens, clip, split):
        if continued:
            segments.append((-1, 1))
            need -= 1
            if not need:
                return segments, start
        take = min(stop - start, need)
        segments.append((start, take))
        need -= take
        if not need:
            return segments, start + take
    return None


class _ShardPrefetcher:
    """Opens (reads, validates and indexes) the next shard on a background thread."""

    def __init__(self, path, vocab, bos_id, seq_len):
        self.result, self.error = None, None
        # Not a daemon: the interpreter waits for it at exit. A daemon thread still reading when the process
        # ends is stopped inside numpy's C code, which aborts the process ("terminate called without an active
        # exception", seen on gloo ranks in the tests).
        self.thread = threading.Thread(target=self._run, args=(path, vocab, bos_id, seq_len))
        self.thread.start()

    def _run(self, path, vocab, bos_id, seq_len):
        try:
            tokens = read_shard(path, vocab)
            bos = np.flatnonzero(tokens == bos_id)
            self.result = (tokens, bos, rows_in_shard(bos, len(tokens), seq_len))
        except Exception as e:  # re-raised in the consumer's thread
            self.error = e

    def get(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


class TrainStream:
    """The global sequence of training rows (micro-batches), independent of the world size.

    Row j is seq_len + 1 tokens (or the length next_micro_batch asks for); where each begins is next_row_start's
    rule. The tail of a shard that cannot hold a whole row is skipped. Rank r of W takes rows j = r mod W.
    `on_shard(path, tokens, rows)` is called as each shard is opened (the log's account of how much of the data the rows use). `start`, a
    `position()` of an earlier stream over the same files, continues from there (a resumed run). `split_tails`:
    clipped rows keep what the clip cuts off a long document, in further pieces (clipped_row).
    """

    def __init__(self, pattern: str, seq_len: int, *, vocab: int, bos_id: int, cycle: bool,
                 flag: str = "train_files", on_shard=None, start: dict | None = None, split_tails: bool = False):
        self.files = list_shards(pattern, flag)
        self.pattern, self.seq_len, self.cycle, self.on_shard = pattern, seq_len, cycle, on_shard
        self.bos_id, self.split_tails = bos_id, split_tails
        start = start or dict(file_index=0, pos=0, tokens_served=0)
        self.file_index = start["file_index"] - 1
        self._open = lambda path: _ShardPrefetcher(path, vocab, bos_id, seq_len)
        self._next = self._open(self.files[start["file_index"]])
        self._advance_shard()
        self.pos, self.tokens_served = start["pos"], start["tokens_served"]

    def position(self) -> dict:
        """Where the next row is looked for: the shard, the offset in it, and the tokens served so far."""
        return dict(file_index=self.file_index, pos=self.pos, tokens_served=self.tokens_served)

    def _advance_shard(self):
        self.file_index += 1
        if self.file_index == len(self.files):
            if not self.cycle:
                raise DataError(f"training data exhausted after {self.tokens_served:,} tokens in "
                                f"{len(self.files)} file(s) matching {self.pattern!r}; add shards "
                                "(python data/cached_fineweb10B.py N), lower --num_iterations, or pass "
                                "--cycle_train_data=true")
            self.file_index = 0
        self.tokens, self.bos, rows = self._next.get()
        self.pos = 0
        if self.on_shard is not None:
            self.on_shard(self.files[self.file_index], len(self.tokens), rows)
        following = (self.file_index + 1) % len(self.files)
        self._next = self._open(self.files[following])

    def next_micro_batch(self, doc_clip: int = 0, seq_len: int | None = None) -> np.ndarray:
        """The next row of seq_len + 1 tokens (default: the stream's): documents used whole (next_row_start), or
        cut into pieces of at most doc_clip tokens (clipped_row)."""
        seq_len = seq_len or self.seq_len
        for _ in range(2 * len(self.files) + 1):
            if doc_clip:
                found = clipped_row(self.bos, self.pos, len(self.tokens), seq_len, doc_clip, self.split_tails)
                if found is not None:
                    segments, self.pos = found
                    self.tokens_served += seq_len
                    bos = np.array([self.bos_id], dtype=self.tokens.dtype)
                    return np.concatenate([self.tokens[s:s + n] if s >= 0 else bos for s, n in segments])
            else:
                start = next_row_start(self.bos, self.pos, len(self.tokens), seq_len)
                if start is not None:
                    self.pos = start + seq_len
                    self.tokens_served += seq_len
                    return self.tokens[start:start + seq_len + 1]
            self._advance_shard()
        raise DataError(f"no shard in {self.pattern!r} holds a row of {seq_len + 1} tokens "
                        "(--stage_seq_len + 1); lower --stage_seq_len or add data")


class StagingRing:
    """Host buffers through which micro-batches go to the device, reused in turn.

    On CUDA they are pinned, so the copy to the device is asynchronous, and they are allocated once: a
    per-batch `pin_memory()` goes through the pinned allocator and torch's multi-threaded CPU copy, which
    profiles caught holding up the host (README, "host-bound"). Rows are written through numpy views, on one
    thread. A buffer is rewritten only once the copies that last read it have run (its CUDA event): the host
    is then `slots - 1` micro-batches of work ahead of the GPU, so the wait costs the GPU nothing. On CPU the
    batch is copied out of the buffer (`copy=True`), so no caller holds a buffer that is reused."""

    def __init__(self, slots: int, tokens: int, device: torch.device):
        self.device, self.turn = device, 0
        self.events = [torch.cuda.Event() if device.type == "cuda" else None for _ in range(slots)]
        self.tokens, self.cu, self.views = [None] * slots, [None] * slots, [None] * slots
        for k in range(slots):
            self._allocate(k, tokens)

    def _allocate(self, k: int, tokens: int):
        pinned = self.device.type == "cuda"
        self.tokens[k] = torch.empty(tokens, dtype=torch.int64, pin_memory=pinned)
        self.cu[k] = torch.empty(tokens, dtype=torch.int32, pin_memory=pinned)
        self.views[k] = (self.tokens[k].numpy(), self.cu[k].numpy())

    def upload(self, tokens: np.ndarray, cu: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (any integer dtype) as int64 and cu (int32) on the device, through the next buffer."""
        k = self.turn
        self.turn = (k + 1) % len(self.events)
        if self.events[k] is not None:
            self.events[k].synchronize()  # returns at once for an event never recorded
        if max(len(tokens), len(cu)) > len(self.views[k][0]):  # sized for the schedule: only hand-made specs
            self._allocate(k, max(len(tokens), len(cu)))
        host_tokens, host_cu = self.views[k]
        np.copyto(host_tokens[:len(tokens)], tokens, casting="safe")
        np.copyto(host_cu[:len(cu)], cu, casting="safe")
        out = (self.tokens[k][:len(tokens)].to(self.device, non_blocking=True, copy=True),
               self.cu[k][:len(cu)].to(self.device, non_blocking=True, copy=True))
        if self.events[k] is not None:
            self.events[k].record(torch.cuda.current_stream(self.device))
        return out


class DistributedTrainLoader:
    """This rank's micro-batches as (inputs, targets, cu_seqlens, (documents, longest document)) on `device`:
    int64 tokens, int32 document starts and host ints (document_bounds).

    `rows` gives the (row length, document clip, rows joined) of each micro-batch, in order: the schedule's
    (row_specs; a pair means one row). A micro-batch takes `rows joined` rounds of world_size rows (one row per
    rank per round), so that the stream is the same at any world size, and joins this rank's rows: inputs
    and targets are the rows' own, concatenated. The next batch is staged while the current one computes
    (StagingRing: pinned host buffers, non-blocking copy). `start`: the stream's start (TrainStream).
    """

    def __init__(self, hp: Hyperparameters, rank: int, world_size: int, device: torch.device, rows, on_shard=None,
                 start: dict | None = None):
        recipe = parse_recipe(hp)
        self.stream = TrainStream(hp.train_files, longest_train_row(recipe), vocab=hp.tokenizer_vocab,
                                  bos_id=hp.bos_id, cycle=hp.cycle_train_data, on_shard=on_shard, start=start,
                                  split_tails=hp.doc_tails == "split")
        self.rank, self.world_size, self.device, self.rows = rank, world_size, device, iter(rows)
        self.bos_id = hp.bos_id
        _, joined = rows_per_step_and_pass(recipe.stages, world_size, hp.micro_batch_tokens)  # each at least 1
        largest = max(rows * (stage.seq_len + 1) for rows, stage in zip(joined, recipe.stages))
        self.ring = StagingRing(4, largest, device)
        self._staged = self._stage()

    def position(self) -> dict:
        """The stream's position after the micro-batches handed out so far (the staged one not yet read)."""
        return self._staged_from

    def _stage(self):
        self._staged_from = self.stream.position()
        row = next(self.rows, None)
        if row is None:  # the schedule's last micro-batch is staged: nothing follows
            return None
        seq_len, clip, joined = row if len(row) == 3 else (*row, 1)
        mine = []
        for _ in range(joined):
            for r in range(self.world_size):
                batch = self.stream.next_micro_batch(clip, seq_len)
                if r == self.rank:
                    mine.append(batch)
        tokens = mine[0] if joined == 1 else np.concatenate(mine)
        inputs = tokens.reshape(joined, seq_len + 1)[:, :-1].reshape(-1)
        cu, docs, max_len = document_bounds(inputs, self.bos_id, joined)
        buf, cu = self.ring.upload(tokens, cu)
        by_row = buf.view(joined, seq_len + 1)  # views of buf, for one row as for several
        return by_row[:, :-1].reshape(-1), by_row[:, 1:].reshape(-1), cu, (docs, max_len)

    def next_batch(self):
        if self._staged is None:
            raise RuntimeError("the loader was asked for more micro-batches than its rows schedule")
        batch, self._staged = self._staged, self._stage()
        return batch


def load_validation_tokens(hp: Hyperparameters) -> np.ndarray:
    """The first val_tokens tokens of the validation files (int64), read and checked once per run."""
    files = list_shards(hp.val_files, "val_files")
    need, parts, have = hp.val_tokens, [], 0
    for path in files:
        tokens = read_shard(path, hp.tokenizer_vocab)
        parts.append(np.asarray(tokens[:need - have]))
        have += parts[-1].size
        if have == need:
            break
    if have < need:
        raise DataError(f"validation files {hp.val_files!r} hold {have:,} tokens; --val_tokens={need:,} needed")
    return np.concatenate(parts).astype(np.int64)


def validation_chunks(stream: np.ndarray, hp: Hyperparameters, rank: int, world_size: int, device: torch.device):
    """This rank's validation forwards over `stream` (load_validation_tokens): (inputs, targets, cu_seqlens,
    (documents, longest document)) as DistributedTrainLoader's, val_seq_len tokens each.

    The loss covers exactly the first val_tokens tokens of the validation stream: chunk c predicts
    tokens c*L+1 .. (c+1)*L; the one target past val_tokens is ignored (-100), so every world size scores
    the same val_tokens - 1 predictions. Chunk c goes to rank c mod world_size.
    """
    L = hp.val_seq_len
    for c in range(rank, len(stream) // L, world_size):
        inputs = torch.from_numpy(stream[c * L:(c + 1) * L])
        targets = torch.full((L,), -100, dtype=torch.int64)
        nxt = stream[c * L + 1:(c + 1) * L + 1]
        targets[:nxt.size] = torch.from_numpy(nxt)
        cu, docs, max_len = document_bounds(stream[c * L:(c + 1) * L], hp.bos_id)
        yield inputs.to(device), targets.to(device), torch.from_numpy(cu).to(device), (docs, max_len)


# -----------------------------------------------------------------------------
# Logging
# -----------------------------------------------------------------------------

RULE = "=" * 100


class RunLog:
    """Rank 0 writes every line to stdout and to <log_dir>/<run_id>.txt, flushed as written.

    The log file is created exclusively: an existing log (a finished run's, say) is never overwritten.
    A folder or file that cannot be made is a ConfigError, raised before anything is trained or compiled.
    """

    def __init__(self, hp: Hyperparameters, rank: int):
        self.file, self.path = None, None
        if rank != 0:
            return
        if os.path.exists(hp.log_dir) and not os.path.isdir(hp.log_dir):
            raise ConfigError(f"--log_dir={hp.log_dir!r} is a file, not a folder; pass a folder for the run logs")
        try:
            os.makedirs(hp.log_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--log_dir={hp.log_dir!r}: cannot create the folder ({e.strerror}); "
                              "pass a writable folder") from None
        self.path = os.path.join(hp.log_dir, f"{hp.run_id or uuid.uuid4()}.txt")
        try:
            self.file = open(self.path, "x", encoding="utf-8")
        except FileExistsError:
            raise ConfigError(f"{self.path} exists (--run_id={hp.run_id}); logs are never overwritten: pick another "
                              "--run_id, or omit it for a fresh one") from None
        except OSError as e:
            raise ConfigError(f"cannot create the log {self.path} ({e.strerror}); pass a writable --log_dir") from None

    def __call__(self, line: str, console: bool = True):
        if self.file is None:
            return
        if console:
            print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


def gpu_identity(device: torch.device) -> str | None:
    """'NVIDIA H200, bus 00000000:00:07.0, uuid GPU-8f1c...': the GPU `device` is, its bus id and UUID as
    nvidia-smi prints them, so that runs can be told apart by GPU: by bus id side by side on one host, by UUID
    across hosts (hosts share bus ids; two GPUs, of one host or two, can differ in speed by a few percent); None
    off CUDA."""
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    gpu_uuid = getattr(p, "uuid", None)  # torch prints it without nvidia-smi's "GPU-" prefix
    return (f"{p.name}, bus {p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"
            + (f", uuid GPU-{str(gpu_uuid).removeprefix('GPU-')}" if gpu_uuid is not None else ""))


def environment_report(device: torch.device) -> str:
    """Versions, the GPU this rank runs on (rank 0 writes the log) and nvidia-smi: the log's header."""
    lines = [f"python {sys.version.split()[0]}", f"torch {torch.__version__} (cuda {torch.version.cuda})",
             f"triton {triton.__version__ if HAS_TRITON else 'not installed'}"]
    if (gpu := gpu_identity(device)) is not None:
        lines.append(f"gpu: {gpu}")
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = "nvidia-smi: not available"
    return "\n".join(lines + [smi])


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model, val_tokens: np.ndarray, hp: Hyperparameters, windows: tuple[int, int], scale, weights,
                    rank: int, world_size: int, device: torch.device) -> tuple[float, int]:
    """(mean next-token loss, predictions scored) of `model` over the validation stream at `windows` (blocks),
    with the softmax `scale` and loss `weights` (next token only) as device tensors and the rotary tables as
    they are; every rank gets the all-reduced mean."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for inputs, targets, cu, (docs, max_len) in validation_chunks(val_tokens, hp, rank, world_size, device):
        loss_sum += model(inputs, targets, cu, attention_meta(docs, max_len, windows), scale, weights).double()
        count += (targets != -100).sum()
    if world_size > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
    return (loss_sum / count).item(), int(count.item())  # val_tokens - 1 predictions on every world size (tested)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class StepPlan:
    """Everything the schedule fixes for one optimizer step."""
    step: int
    stage: int  # index into the recipe's stages; the extension steps belong to the last
    batch_tokens: int  # the stage's tokens per step, all ranks
    seq_len: int  # tokens per row
    micro_batches: int  # rows per rank
    joined_rows: int  # rows per micro-batch (GPT.forward's row_pos); micro_batches // joined_rows passes per step
    doc_clip: int
    windows: tuple[int, int]  # (short, long) in ATTN_BLOCK blocks
    long_windows: tuple[int, ...]  # the long window (tokens) of every stage so far: YaRN and the softmax scale
    lr: float  # multiplier of every optimizer's lr
    momentum: float  # Muon's
    loss_weights: tuple[float, ...]  # of the next 1, 2, ... tokens (padded to the recipe's longest), then of the
    # prefix target if the recipe has one (GPT.head_loss)


def next_token_weights(plan: StepPlan) -> tuple[float, ...]:
    """Loss weights of the plan's width that score the next token only: what validation measures."""
    return (1.0,) + (0.0,) * (len(plan.loss_weights) - 1)


def longest_train_row(recipe: Recipe) -> int:
    """The longest row of any stage, in tokens (a micro-batch may join several: --micro_batch_tokens)."""
    return max(stage.seq_len for stage in recipe.stages)


def total_steps(hp: Hyperparameters) -> int:
    return hp.num_iterations + hp.extension_steps


def plan_step(step: int, hp: Hyperparameters, derived: Derived) -> StepPlan:
    """The schedule at `step` (README: "The staged schedule"). lr: the stage's multiplier until the cooldown,
    then a linear blend towards final_lr_frac, reached at num_iterations and kept in the extension. Muon
    momentum: start -> momentum over the warm-up fraction, back to start over the last cooldown fraction.
    Loss weights (MTP and prefix) ramp linearly within each stage."""
    N, stages = hp.num_iterations, derived.recipe.stages
    k = max(i for i, s in enumerate(stages) if s.start <= min(step, N - 1))
    stage, extension = stages[k], step >= N
    windows = derived.recipe.extension_windows if extension else stage.windows
    long_windows = tuple(ATTN_BLOCK * s.windows[1] for s in stages[:k + 1])
    if extension:
        long_windows += (ATTN_BLOCK * windows[1],)
    cooldown_start = int(N * (1 - hp.cooldown_frac))
    if extension:
        lr = hp.final_lr_frac
    elif step < cooldown_start:
        lr = stage.lr_mul
    else:
        t = min((step - cooldown_start) / max(N - cooldown_start, 1), 1.0)
        lr = stage.lr_mul * (1 - t) + hp.final_lr_frac * t
    warm = hp.muon_momentum_warmup_frac * N
    cool = round(hp.muon_momentum_cooldown_frac * N)
    frac = min(step / warm, 1.0) if warm else 1.0
    momentum = hp.muon_momentum_start + frac * (hp.muon_momentum - hp.muon_momentum_start)
    if cool and step > total_steps(hp) - cool:
        back = (step - (total_steps(hp) - cool)) / cool
        momentum += back * (hp.muon_momentum_start - hp.muon_momentum)
    end = stages[k + 1].start if k + 1 < len(stages) else N
    progress = 1.0 if extension else (step - stage.start) / max(end - stage.start, 1)
    width = max(len(s.mtp) for s in stages)
    weights = tuple(a + (b - a) * progress for a, b in stage.mtp) + (0.0,) * (width - len(stage.mtp))
    if derived.recipe.prefix_loss:
        weights += (stage.prefix[0] + (stage.prefix[1] - stage.prefix[0]) * progress,)
    return StepPlan(step, k, stage.batch_tokens, stage.seq_len, derived.grad_accum[k], derived.joined_rows[k],
                    stage.doc_clip, windows, long_windows, lr, momentum, weights)


def adam_steps_at(step: int, hp: Hyperparameters) -> bool:
    """Whether Adam updates at `step`: the last of every adam_every steps (the speedrun's odd steps, #39)."""
    return (step + 1) % hp.adam_every == 0


def untie_step(hp: Hyperparameters, derived: Derived) -> int | None:
    """The step whose update is the last tied one (the first Adam step of --untie_stage); None if never tied."""
    if not hp.untie_stage:
        return None
    start = derived.recipe.stages[hp.untie_stage - 1].start
    return start + (-(start + 1)) % hp.adam_every


def warmup_step_list(hp: Hyperparameters, derived: Derived) -> list[int]:
    """Steps the untimed warm-up runs: the first warmup_steps, the first two of every later stage, the untie
    step and the first extension step, so every shape, window and code path the timed loop meets is
    compiled (and every collective called) before the clock starts."""
    if not hp.warmup_steps:
        return []
    steps = set(range(hp.warmup_steps))
    for stage in derived.recipe.stages[1:]:
        steps |= {stage.start, stage.start + 1}
    untie = untie_step(hp, derived)
    steps |= {untie, untie + 1} if untie is not None else set()
    steps |= {hp.num_iterations} if hp.extension_steps else set()
    return sorted(s for s in steps if s < total_steps(hp))


def row_specs(steps, hp: Hyperparameters, derived: Derived):
    """(row length, document clip, rows joined) of each micro-batch of `steps`, for DistributedTrainLoader."""
    for step in steps:
        plan = plan_step(step, hp, derived)
        yield from [(plan.seq_len, plan.doc_clip, plan.joined_rows)] * (plan.micro_batches // plan.joined_rows)


class Trainer:
    """Model, optimizers and data of one run; `train_step` and `evaluate` are the whole loop body."""

    def __init__(self, hp: Hyperparameters, rank: int, world_size: int, device: torch.device,
                 val_tokens: np.ndarray | None = None):
        self.hp, self.rank, self.world_size, self.device = hp, rank, world_size, device
        self.derived = derive(hp, world_size)
        torch.manual_seed(hp.seed)  # every rank seeds alike, so all start from the same weights
        with device:
            self.model = GPT(hp)
        if self.derived.recipe.prefix_loss:
            self.model.prefix_table.copy_(torch.from_numpy(load_prefix_table(hp)))
        if world_size > 1:
            for p in self.model.parameters():
                dist.broadcast(p.detach(), 0)
        self.forward = self.model  # the training forward; validation calls self.model
        if hp.compile and device.type == "cuda":
            # Blocks and head compiled one by one (in place) serve validation always, and training with
            # --compile_per_block: validation's forward-only graphs then cost a few block compiles instead of
            # a second whole-model compile (README: "Compile time"). The whole-model compile for training
            # traces through the compiled blocks into the same single graph as without them (tested).
            self.model.compile_per_block()
            if not hp.compile_per_block:
                self.forward = torch.compile(self.model, dynamic=False)
        m, betas = self.model, self.derived.recipe.betas
        wd_embed, wd_value, wd_gate = (hp.adam_weight_decay * mul for mul in
                                       (hp.adam_wd_mul_embed, hp.adam_wd_mul_value_embed, hp.adam_wd_mul_gate))
        adam_params = [(m.embed.weight, hp.adam_lr_embed, betas["embed"], wd_embed),
                       (m.lm_head_w, hp.adam_lr_head, betas["embed"], wd_embed)]
        adam_params += [(t, hp.adam_lr_value_embed, betas["value_embed"], wd_value) for t in m.value_embeds]
        if m.bigram is not None:
            adam_params.append((m.bigram, hp.adam_lr_value_embed, betas["value_embed"], wd_value))
        adam_params += [(m.resid_scalars, hp.adam_lr_resid, betas["lambdas"], 0.0),
                        (m.post_scalars, hp.adam_lr_post, betas["lambdas"], 0.0),
                        (m.layer_scalars, hp.adam_lr_scalar, betas["scalar"], 0.0),
                        (m.global_scalars, hp.adam_lr_scalar, betas["scalar"], 0.0)]
        if m.smear_gate is not None:  # the smear gate learns 100x slower than the other gates (records #52)
            adam_params.append((m.smear_gate, hp.adam_lr_gate / 100, betas["scalar"], 0.0))
        for b in m.blocks:
            adam_params += [(g, hp.adam_lr_gate, betas["scalar"], wd_gate) for g in (b.ve_gate, b.attn_gate)
                            if g is not None]
            if b.xsa_alpha is not None:
                adam_params.append((b.xsa_alpha, hp.adam_lr_scalar, betas["scalar"], 0.0))
        for gen, lr in m.adam_generators():  # records #81 (MUDD, 0.25 x 0.008) and #85 (gates, 0.1 x 0.008)
            adam_params += gen.adam_params(lr, betas["scalar"], wd_gate)
        matrices = m.hidden_matrices()
        self.adam = DistAdam(adam_params, hp.adam_eps, rank, world_size, cautious=hp.adam_cautious_wd)
        self.muon = DistMuon(matrices, hp, rank, world_size)
        self.muon_params = [p for p, _ in matrices]
        owned = [id(entry[0]) for entry in adam_params] + [id(p) for p in self.muon_params]
        assert sorted(owned) == sorted(id(p) for p in m.parameters()), "every parameter has exactly one optimizer"
        self.untie_step = untie_step(hp, self.derived)
        self._set_tied(self.untie_step is not None)
        self._scalar_cache, self._row_pos_cache = {}, {}
        self._attention_state = None
        for step in range(total_steps(hp)):  # made now: a host-to-device copy in the timed loop would stall it
            plan = self.plan(step)
            self._on_device(plan.loss_weights, torch.float32)
            self._on_device(yarn_attention_scale(hp.attn_scale, plan.long_windows), torch.float32)
        self.last_val_predictions = 0
        self._val_tokens = val_tokens

    def _set_tied(self, tied: bool):
        """While tied, the embedding is the head's matrix: its gradient is added to the head's, only the head is
        updated, and the embedding is then set to it (the speedrun's #51)."""
        self.tied = tied
        self.adam.set_active(self.model.embed.weight, not tied)

    def plan(self, step: int) -> StepPlan:
        return plan_step(step, self.hp, self.derived)

    def _on_device(self, value, dtype):
        """A Python number or tuple as a cached 0-d/1-d tensor on the device: a compiled graph reads it as an
        input, so a new value does not recompile (on CPU too, so tests see what a GPU run compiles)."""
        key = (value, dtype)
        if key not in self._scalar_cache:
            self._scalar_cache[key] = torch.tensor(value, dtype=dtype, device=self.device)
        return self._scalar_cache[key]

    def _row_positions(self, plan: StepPlan) -> torch.Tensor | None:
        """GPT.forward's row_pos for the plan's passes (cached on the device): None for a row per pass."""
        if plan.joined_rows == 1:
            return None
        key = (plan.seq_len, plan.joined_rows)
        if key not in self._row_pos_cache:
            self._row_pos_cache[key] = row_positions(plan.seq_len * plan.joined_rows, plan.joined_rows, self.device)
        return self._row_pos_cache[key]

    def _forward_inputs(self, plan: StepPlan, windows=None):
        """(windows in blocks, attention scale, loss weights) for the forward at `plan`, after setting the rotary
        tables to the plan's long-window history (YaRN)."""
        if self._attention_state != plan.long_windows:
            self.model.rotary.set_frequencies(yarn_frequencies(self.model.rotary.base, plan.long_windows))
            self._attention_state = plan.long_windows
        scale = yarn_attention_scale(self.hp.attn_scale, plan.long_windows)
        return (windows or plan.windows, self._on_device(scale, torch.float32),
                self._on_device(plan.loss_weights, torch.float32))

    def train_step(self, step: int, loader: DistributedTrainLoader) -> torch.Tensor:
        """One optimizer step over the stage's batch; returns this rank's mean weighted train loss (device)."""
        hp, plan = self.hp, self.plan(step)
        windows, scale, weights = self._forward_inputs(plan)
        row_pos = self._row_positions(plan)
        rows = plan.micro_batches * self.world_size  # in the whole step, all ranks together
        self.model.head_grad_scale.fill_(1 / rows)
        total = torch.zeros((), device=self.device)
        for _ in range(plan.micro_batches // plan.joined_rows):
            inputs, targets, cu, (docs, max_len) = loader.next_batch()
            loss_sum = self.forward(inputs, targets, cu, attention_meta(docs, max_len, windows), scale, weights,
                                    row_pos)
            # Divided by the row count of the whole step, not of this rank or micro-batch, and summed over ranks
            # by the reduce-scatter: every world size backpropagates the same values (the FP8 head's e5m2 cast
            # of the logit gradient included, whose rounding depends on their scale) and gets the same mean.
            (loss_sum / rows).backward()
            total += loss_sum.detach() / (plan.seq_len * plan.micro_batches)
        embed, head = self.model.embed.weight, self.model.lm_head_w
        if self.tied:
            head.grad += embed.grad
            embed.grad = None
        # Adam's gradients keep accumulating between its steps (a larger batch for the embeddings, at a
        # fraction of the optimizer work); Muon steps and clears its own every step.
        adam_now = adam_steps_at(step, hp)
        if adam_now:
            self.adam.reduce_grads()
        self.muon.reduce_grads()
        if adam_now:
            self.adam.step(plan.lr)
        self.muon.step(plan.lr, plan.momentum)
        if adam_now:
            self.adam.finish()
        self.muon.finish()
        if self.tied and adam_now:
            with torch.no_grad():
                embed.copy_(head)
            if step == self.untie_step:  # the embedding continues from here with the head's Adam state
                self.adam.copy_state(head, embed)
                self._set_tied(False)
        for p in (self.model.parameters() if adam_now else self.muon_params):
            p.grad = None
        return total

    @torch.no_grad()
    def evaluate(self, step: int, final: bool = False) -> float:
        """Mean next-token loss over the first val_tokens validation tokens, with the training windows of
        `step` (the final validation: --final_val_windows, the rotary tables unchanged)."""
        plan = self.plan(min(step, total_steps(self.hp) - 1))
        windows, scale, _ = self._forward_inputs(plan, self.derived.recipe.final_val_windows if final else None)
        weights = self._on_device(next_token_weights(plan), torch.float32)
        loss, self.last_val_predictions = validation_loss(self.model, self.val_tokens, self.hp, windows, scale, weights,
                                                          self.rank, self.world_size, self.device)
        return loss

    @property
    def val_tokens(self) -> np.ndarray:
        """The validation stream, read and checked at first use and kept for the run."""
        if self._val_tokens is None:
            self._val_tokens = load_validation_tokens(self.hp)
        return self._val_tokens

    def _state_tensors(self):
        return list(self.model.parameters()) + self.adam.state_tensors() + self.muon.state_tensors()

    def snapshot(self):
        return [t.detach().clone() for t in self._state_tensors()], self.adam.t, self.tied

    def restore(self, snap):
        saved, self.adam.t, tied = snap
        self._set_tied(tied)
        self.model.zero_grad(set_to_none=True)  # the warm-up may end between Adam steps
        with torch.no_grad():
            for t, s in zip(self._state_tensors(), saved, strict=True):
                t.copy_(s)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LossReadout:
    """A step's loss averaged over ranks, on its way to the host: the all-reduce and the copy are queued right
    after the step (into pinned memory, with an event, on GPU), and value() waits for them alone. x.item() later
    would wait for everything queued by then (the next step too), and the GPU would idle while the host
    prepared the step after it."""

    def __init__(self, loss: torch.Tensor, world_size: int):
        x = loss.detach()
        if world_size > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= world_size
        self.event = None
        if x.is_cuda:
            self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            self.host.copy_(x, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = x

    def value(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return self.host.item()


def check_training_data(hp: Hyperparameters, derived: Derived, log: RunLog) -> None:
    """Fail before any compile if a training file is missing or has a bad header, or if they hold fewer
    tokens than the run reads without --cycle_train_data (header counts: an upper bound on what the rows
    use). Token ids are checked as each shard is opened (read_shard)."""
    files = list_shards(hp.train_files, "train_files")
    total = sum(read_shard_header(f) for f in files)
    reads = np.cumsum([plan_step(s, hp, derived).batch_tokens for s in range(total_steps(hp))])
    need = int(reads[-1])
    log(f"train_data: {len(files)} file(s), {total:,} tokens; {total_steps(hp)} steps read {need:,}"
        + (" (cycling)" if hp.cycle_train_data else ""))
    if total < need and not hp.cycle_train_data:
        raise DataError(f"the training files ({hp.train_files!r}) hold {total:,} tokens, fewer than the {need:,} "
                        f"that {total_steps(hp)} steps read (they suffice for {int(np.searchsorted(reads, total, 'right'))} "
                        "steps); add data, lower --num_iterations, or pass --cycle_train_data=true")


def shard_reporter(log: RunLog, seq_len: int):
    """on_shard callback for the timed loop's stream: one log line per shard opened, saying how many of
    its tokens rows of whole documents use (a row is seq_len + 1 tokens; consecutive rows share one)."""
    def report(path, tokens, rows):
        log(f"train_shard: {path} tokens:{tokens} rows:{rows} tokens_in_rows:{rows * seq_len} "
            f"({100 * rows * seq_len / max(tokens, 1):.1f}% with documents used whole)")
    return report


# The run did not learn if its final val loss is within this fraction of a uniform prediction's, ln(vocab).
NO_LEARNING_FRACTION = 0.02


def _timed_loop(hp: Hyperparameters, trainer: Trainer, N: int, rank: int, world_size: int, device: torch.device,
                log: RunLog) -> float:
    """Steps from the start (or the checkpoint's step) to N, validating and saving as configured; returns the
    final val loss. Training time counts the steps only."""
    derived = trainer.derived
    start, train_ms, position = resume(trainer, hp.resume_from, log) if hp.resume_from else (0, 0.0, None)
    loader = DistributedTrainLoader(hp, rank, world_size, device, row_specs(range(start, N), hp, derived),
                                    on_shard=shard_reporter(log, longest_train_row(derived.recipe)), start=position)
    pending = None  # (step, its LossReadout, training ms after it): its line waits for the loss

    def log_pending():
        """The line of the step before, now that its loss has been read (one step late: no sync per step)."""
        prev_step, prev_loss, ms = pending
        value = prev_loss.value()
        loss_field = f"train_loss:{value:.4f} " if math.isfinite(value) else ""  # the error line says the value
        log(f"step:{prev_step + 1}/{N} {loss_field}train_time:{ms:.0f}ms step_avg:{ms / (prev_step + 1):.2f}ms")
        if not math.isfinite(value):
            raise NonFiniteLossError(f"non-finite train loss {value} at step {prev_step + 1}")

    _sync(device)
    t0 = time.perf_counter()
    val_loss = float("nan")
    for step in range(start, N + 1):
        last = step == N
        validate = last or (hp.val_loss_every and step % hp.val_loss_every == 0)
        if pending is not None and (validate or checkpoint_due(hp, step, start)):
            log_pending()  # before the validation or checkpoint lines of this step
            pending = None
        if validate:
            _sync(device)
            train_ms += 1000 * (time.perf_counter() - t0)
            val_loss = trainer.evaluate(step, final=last)
            if not math.isfinite(val_loss):
                raise NonFiniteLossError(f"non-finite val loss {val_loss} at step {step}")
            avg = train_ms / max(step, 1)
            log(f"step:{step}/{N} val_loss:{val_loss:.{VAL_LOSS_DECIMALS[hp.track]}f} train_time:{train_ms:.0f}ms "
                f"step_avg:{avg:.2f}ms")
            _sync(device)
            t0 = time.perf_counter()
        if checkpoint_due(hp, step, start):  # outside the timed region, like validation
            _sync(device)
            train_ms += 1000 * (time.perf_counter() - t0)
            save_checkpoint(trainer, loader, step, train_ms, log)
            t0 = time.perf_counter()
        if last:
            break
        readout = LossReadout(trainer.train_step(step, loader), world_size)  # queued behind this step's work
        approx_ms = train_ms + 1000 * (time.perf_counter() - t0)
        if pending is not None:  # read the previous step's loss now, while this one runs: the GPU never idles for it
            log_pending()
        pending = (step, readout, approx_ms)
    return val_loss


class GcPauses:
    """The garbage collector's passes while active (gc.callbacks): how many by generation, and the seconds they
    took. A pass stops the host, so in a step it delays the next launches; a full pass (generation 2) walks every
    tracked object, of which compiling leaves many, unless gc.freeze() moved them out of its reach: with
    freeze=True (--gc_freeze) entering collects and freezes what exists (the model, compiled graphs, kernels live
    for the run) and leaving unfreezes it, for a caller that trains again in this process (tests)."""

    def __init__(self, freeze: bool = False):
        self.freeze, self.counts, self.seconds, self._start = freeze, [0, 0, 0], 0.0, None

    def __call__(self, phase: str, info: dict):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.counts[info["generation"]] += 1
            self._start = None

    def __enter__(self):
        if self.freeze:
            gc.collect()
            gc.freeze()
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)
        if self.freeze:
            gc.unfreeze()

    def line(self, where: str = "the timed loop") -> str:
        return (f"gc: {'/'.join(map(str, self.counts))} passes (generation 0/1/2) in {where}, "
                f"{1000 * self.seconds:.1f} ms")


class AllocatorCalls:
    """The CUDA caching allocator's calls into the driver while active (torch.cuda.memory_stats' counters):
    cudaMalloc when no cached block fits, cudaFree when it gives memory back, retries (an allocation that failed,
    freed the cache and tried again) and its synchronizations of every stream before freeing. cudaFree and those
    synchronizations stop the host until the GPU is idle, so one in a step makes the GPU wait for the host's next
    launches. Counted on CUDA only (`line` is None elsewhere); `stats` stands in for memory_stats in tests."""

    COUNTERS = (("num_device_alloc", "cudaMalloc"), ("num_device_free", "cudaFree"), ("num_alloc_retries", "retries"),
                ("num_sync_all_streams", "stream syncs"))

    def __init__(self, device: torch.device, stats=None):
        self.active = device.type == "cuda" or stats is not None
        self.stats = stats or (lambda: torch.cuda.memory_stats(device))
        self.counts, self._start = None, None

    def _read(self):
        values = self.stats()
        return [values.get(key, 0) for key, _ in self.COUNTERS]

    def __enter__(self):
        if self.active:
            self._start = self._read()
        return self

    def __exit__(self, *exc):
        if self.active:
            self.counts = [after - before for before, after in zip(self._start, self._read())]

    def line(self, where: str = "the timed loop") -> str | None:
        if self.counts is None:
            return None
        calls = ", ".join(f"{n} {name}" for n, (_, name) in zip(self.counts, self.COUNTERS))
        return f"allocator: {calls} in {where}"


def train(hp: Hyperparameters, rank: int, world_size: int, device: torch.device, log: RunLog,
          launch_time: float) -> float:
    """The whole run: warm-up (untimed, state restored), then the timed loop. Returns the final val loss."""
    derived = derive(hp, world_size)
    N = total_steps(hp)
    check_training_data(hp, derived, log)
    val_tokens = load_validation_tokens(hp)  # every input is checked before anything compiles
    trainer = Trainer(hp, rank, world_size, device, val_tokens=val_tokens)
    stages = " ".join(f"{s.start}:{s.batch_tokens}" for s in derived.recipe.stages)
    log(f"world_size:{world_size} grad_accum:{','.join(map(str, derived.grad_accum))} "
        f"rows_per_micro_batch:{','.join(map(str, derived.joined_rows))} stages(step:tokens):{stages} "
        f"total_steps:{N} device:{device.type} compile:{hp.compile and device.type == 'cuda'}")

    # Untimed warm-up: compiles and tunes kernels on real batches at every stage, then restores the initial
    # state. The first train step and the first validation forward carry the compiles; the log gives both.
    t_compile = time.perf_counter()
    phases = ""
    warm_steps = warmup_step_list(hp, derived)
    if warm_steps:
        snap = trainer.snapshot()
        warm_loader = DistributedTrainLoader(hp, rank, world_size, device, row_specs(warm_steps, hp, derived))
        for i, step in enumerate(warm_steps):
            # The timed loop's loss all-reduce too: a collective's first call can take seconds, so each
            # collective of a timed step runs here first.
            LossReadout(trainer.train_step(step, warm_loader), world_size).value()
            if i == 0:
                _sync(device)
                t_first = time.perf_counter() - t_compile
        inputs, targets, cu, (docs, max_len) = next(validation_chunks(trainer.val_tokens, hp, rank, world_size, device))
        _sync(device)
        t_val = time.perf_counter()
        for final in (False, True):
            plan = trainer.plan(N - 1 if final else 0)
            windows, scale, _ = trainer._forward_inputs(plan, derived.recipe.final_val_windows if final else None)
            with torch.no_grad():
                trainer.model(inputs, targets, cu, attention_meta(docs, max_len, windows), scale,
                              trainer._on_device(plan.loss_weights, torch.float32))
        _sync(device)
        phases = f"first_train_step:{t_first:.1f}s first_val_forward:{time.perf_counter() - t_val:.1f}s "
        trainer.restore(snap)
        del snap, warm_loader, inputs, targets, cu  # the snapshot holds a copy of every state tensor
    _sync(device)
    log(f"warmup_and_compile_time:{time.perf_counter() - t_compile:.1f}s {phases}"
        f"startup_time:{time.perf_counter() - launch_time:.1f}s")

    with GcPauses(freeze=hp.gc_freeze) as pauses, AllocatorCalls(device) as allocator:
        val_loss = _timed_loop(hp, trainer, N, rank, world_size, device, log)
    log(pauses.line())
    allocator_line = allocator.line()
    if allocator_line:
        log(allocator_line)
    if val_loss > (1 - NO_LEARNING_FRACTION) * math.log(hp.vocab_size):
        log(f"warning: the model did not learn: final val loss {val_loss:.4f}, a uniform prediction's is "
            f"{math.log(hp.vocab_size):.4f}; check the learning rates (--adam_lr_*, --muon_lr) and the data")
    if device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved(device) // 2**20} MiB")
    else:
        import resource
        log(f"peak memory allocated: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB "
            "reserved: n/a (cpu, max resident set size)")
    return val_loss


# -----------------------------------------------------------------------------
# Checkpoints
# -----------------------------------------------------------------------------

# A checkpoint is the folder <log_dir>/<run_id>/step_<k>, the run's state after k steps: state.pt (model,
# optimizer state gathered from every rank's shards, RNG states) and meta.json (the step, the training time
# so far, the loader's position, the tie state, the hyperparameters, the parameters' shapes, and state.pt's
# size and sha256). It is written as step_<k>.tmp and then renamed, so a step_<k> folder is complete.
CHECKPOINT_FORMAT = 1
# Fields a resumed run may change: they name the run or do not touch the math (every other field must match).
RESUME_FREE_FIELDS = ("run_id", "log_dir", "resume_from", "checkpoint_every", "save_checkpoint", "val_loss_every",
                      "warmup_steps", "compile", "compile_per_block", "gc_freeze", "device", "micro_batch_tokens")


class CheckpointError(ConfigError):
    """A checkpoint this run cannot continue: missing, partial, corrupt, or of another configuration."""


def checkpoint_due(hp: Hyperparameters, step: int, start: int) -> bool:
    """Save at the top of `step` (after its validation)? Every checkpoint_every steps after the run's first step
    and before the last; at the last with --save_checkpoint."""
    if step == total_steps(hp):
        return hp.save_checkpoint
    return bool(hp.checkpoint_every) and step > start and step % hp.checkpoint_every == 0


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _write_durably(path: str, write):
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(trainer: Trainer, loader: DistributedTrainLoader, step: int, train_ms: float, log: RunLog):
    """Write the state after `step` steps to <log_dir>/<run_id>/step_<step> (rank 0, after every rank has
    taken part in gathering the optimizer state) and log where and how long it took."""
    t0 = time.perf_counter()
    hp, model = trainer.hp, trainer.model
    state = dict(adam=trainer.adam.state_dict(), muon=trainer.muon.state_dict())
    if trainer.rank != 0:
        return
    state["model"] = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    state["rng"] = dict(cpu=torch.get_rng_state())
    if trainer.device.type == "cuda":
        state["rng"]["cuda"] = torch.cuda.get_rng_state(trainer.device)
    final = os.path.join(os.path.splitext(log.path)[0], f"step_{step}")
    if os.path.exists(final):
        raise FileExistsError(f"{final} exists; checkpoints are never overwritten")
    tmp = final + ".tmp"
    os.makedirs(tmp)
    _write_durably(os.path.join(tmp, "state.pt"), lambda f: torch.save(state, f))
    meta = dict(format=CHECKPOINT_FORMAT, step=step, total_steps=total_steps(hp), train_time_ms=train_ms,
                tied=trainer.tied, loader=loader.position(), train_files=loader.stream.files,
                world_size=trainer.world_size, run_log=log.path, hyperparameters=dataclasses.asdict(hp),
                parameters={name: list(p.shape) for name, p in model.named_parameters()},
                state_bytes=os.path.getsize(os.path.join(tmp, "state.pt")),
                state_sha256=_sha256(os.path.join(tmp, "state.pt")))
    _write_durably(os.path.join(tmp, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    os.rename(tmp, final)
    log(f"checkpoint: {final} step:{step}/{total_steps(hp)} save_time:{time.perf_counter() - t0:.1f}s")


def read_checkpoint(path: str, hp: Hyperparameters | None) -> dict:
    """The meta.json of checkpoint folder `path`, after checking that the folder is complete and intact, that its
    parameters are those of this file's model, and that a run of `hp` may continue it (CheckpointError
    otherwise): run before anything is logged or compiled. hp None (sampling): the checkpoint's own."""
    where = f"--resume_from={path}"
    if not os.path.isdir(path):
        raise CheckpointError(f"{where}: no such checkpoint folder (checkpoints are <log_dir>/<run_id>/step_<k>)")
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no meta.json, so not a complete checkpoint (an interrupted save leaves "
                              "step_<k>.tmp); resume from a step_<k> folder") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: meta.json is unreadable or corrupt ({e})") from None
    keys = {"format", "step", "state_bytes", "state_sha256", "hyperparameters", "parameters", "train_files"}
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or keys - set(meta):
        raise CheckpointError(f"{where}: meta.json is not a format-{CHECKPOINT_FORMAT} checkpoint's")
    state = os.path.join(path, "state.pt")
    size = os.path.getsize(state) if os.path.isfile(state) else None
    if size != meta["state_bytes"]:
        raise CheckpointError(f"{where}: state.pt is missing or truncated ({size} bytes; meta.json says "
                              f"{meta['state_bytes']}); resume from another checkpoint")
    if _sha256(state) != meta["state_sha256"]:
        raise CheckpointError(f"{where}: state.pt is corrupt (its sha256 differs from meta.json's); resume from "
                              "another checkpoint")
    saved, resuming = meta["hyperparameters"], hp is not None
    if resuming:
        mine = json.loads(json.dumps(dataclasses.asdict(hp)))
        # Fields one side lacks: a flag added or removed since the save (free fields do not matter)
        newer = sorted(set(mine) - set(saved) - set(RESUME_FREE_FIELDS))
        older = sorted(set(saved) - set(mine) - set(RESUME_FREE_FIELDS))
        if newer or older:
            lacks = ([f"it had no --{', --'.join(newer)}"] if newer else []) + \
                    ([f"this one has no --{', --'.join(older)}"] if older else [])
            raise CheckpointError(f"{where}: saved by another version of the trainer ({'; '.join(lacks)}); resume "
                                  "it with the trainer that saved it: the run's log begins with its source")
        differ = [k for k in sorted(set(saved) | set(mine))
                  if k not in RESUME_FREE_FIELDS and saved.get(k) != mine.get(k)]
        if differ:
            raise CheckpointError(f"{where}: saved by a run of another configuration: "
                                  + ", ".join(f"--{k}={mine.get(k)!r} here, {saved.get(k)!r} there" for k in differ)
                                  + "; pass the checkpoint's values")
    else:
        try:
            hp = Hyperparameters(**saved)
        except (TypeError, ConfigError) as e:
            raise CheckpointError(f"{where}: its hyperparameters are not this trainer's ({e})") from None
    with torch.device("meta"):
        shapes = {name: list(p.shape) for name, p in GPT(hp).named_parameters()}
    if shapes != meta["parameters"]:
        first = next(n for n in sorted(set(shapes) | set(meta["parameters"]))
                     if shapes.get(n) != meta["parameters"].get(n))
        raise CheckpointError(f"{where}: the model's parameters differ from the checkpoint's ({first}: "
                              f"{shapes.get(first)} here, {meta['parameters'].get(first)} there); it was saved "
                              "by another version of the trainer")
    if resuming and sorted(glob.glob(hp.train_files)) != meta["train_files"]:
        raise CheckpointError(f"{where}: the files matching --train_files={hp.train_files!r} are not the ones the "
                              "checkpoint's loader position refers to")
    return meta


def resume(trainer: Trainer, path: str, log: RunLog) -> tuple[int, float, dict]:
    """Load checkpoint `path` (checked by read_checkpoint in main) into `trainer`, after the warm-up has restored
    its initial state; returns (step, training time so far in ms, loader position) to continue from."""
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", mmap=True, weights_only=True)
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.adam.load_state_dict(state["adam"])
        trainer.muon.load_state_dict(state["muon"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"--resume_from={path}: its state does not fit this trainer ({e})") from None
    trainer._set_tied(meta["tied"])
    torch.set_rng_state(state["rng"]["cpu"])
    if trainer.device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], trainer.device)
    log(f"resumed_from: {path} step:{meta['step']}/{meta['total_steps']} train_time:{meta['train_time_ms']:.0f}ms "
        f"saved_world_size:{meta['world_size']} saved_log:{meta['run_log']}")
    return meta["step"], meta["train_time_ms"], meta["loader"]


# -----------------------------------------------------------------------------
# main
# -----------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM (what schedulers and torchrun send to stop a job), raised in the main thread so the run's
    log records where it stopped, as it does for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done; 1 bad data or a non-finite loss (the log says which); 2 a bad flag or
    configuration, found before any log is written or anything compiles; 143 SIGTERM."""
    launch_time = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    try:
        hp = parse_args(argv)
        rank, world_size, device = setup_distributed(hp)
        hp = fp8_on_this_gpu(hp, device)  # before the log and the resume check, which then see what runs
        if derive(hp, world_size).recipe.prefix_loss:
            load_prefix_table(hp)  # a missing or foreign vocabulary is a usage error before anything compiles
        if hp.resume_from:
            read_checkpoint(hp.resume_from, hp)
        log = RunLog(hp, rank)
    except ConfigError as e:
        print(f"error: {e}\n{usage_line()}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    status = 0
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        with open(__file__, encoding="utf-8") as f:
            log(f.read().rstrip("\n"), console=False)
        log(RULE, console=False)
        log(environment_report(device), console=False)
        log(RULE, console=False)
        log("hyperparameters: " + json.dumps(dataclasses.asdict(hp)))
        train(hp, rank, world_size, device, log, launch_time)
    except (DataError, NonFiniteLossError, CheckpointError) as e:
        log(f"error: {e}")
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        status = 2 if isinstance(e, CheckpointError) else 1
    except Terminated as e:
        log(f"crash: {e}\n" + traceback.format_exc().rstrip("\n"), console=False)
        status = 128 + signal.SIGTERM
    except BaseException:  # a bug or Ctrl-C: the traceback goes to the log too, then on as usual
        log("crash:\n" + traceback.format_exc().rstrip("\n"), console=False)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        log.close()
        if dist.is_initialized():
            # Free now, while the interpreter is whole, any reference cycle that still holds tensors of the
            # collectives: freed during interpreter exit they can abort the process ("terminate called without
            # an active exception", seen on gloo at random; README: "Tests").
            gc.collect()
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
