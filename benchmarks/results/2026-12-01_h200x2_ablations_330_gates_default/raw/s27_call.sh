#!/bin/bash
# Session 27's device work: the ~150 s column of README's ablation table for the five removals decided at ~90 s,
# against the default with paired heads and gates + MUDD + DC (session 26 on), round 1 at 330 + 15 steps, 2 seeds
# per arm, seed k on GPU k (a 2xH200 host; on one H200 use --runs 1: each new arm's first run compiles ~300 s).
# Repeat until every arm ran; logs in $OUT/ablogs_330.tgz (if the machine went cold, unpack into .device_data/abl330/).
# Move session 26's logs out of .device_data/abl330/ first: they are the previous default's.
# usage (device, repository root): bash .device_data/s27_call.sh LEASE_S [--runs 1]
L=${1:?lease}; shift
exec bash .device_data/abl_call.sh 330 "$L" round1 \
  --only no_xsa,no_cache_layer,no_key_offset,no_bigram,no_value_embed "$@"
