#!/bin/bash
# Session 26 on one H200 (the only kind lent): the ~150 s column for the arms it lacks, one seed each beside the
# default with paired heads, at 330 + 15 steps; order: default, gates + MUDD + DC, XSA, cached layer, key offset,
# bigram, value embeddings. usage: bash .device_data/s26_single.sh LEASE_S [extra ablations.py flags]
L=${1:?lease}; shift
exec bash .device_data/abl_call.sh 330 "$L" round1 --runs 1 \
  --only with_gates_mudd_dc,no_xsa,no_cache_layer,no_key_offset,no_bigram,no_value_embed "$@"
