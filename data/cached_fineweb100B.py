"""Download the FineWeb-100B GPT-2 shards: `python data/cached_fineweb100B.py [N] [--out DIR]`.

The validation shard and the first N training shards (100M tokens each) of the hub dataset
kjj0/fineweb100B-gpt2 into data/fineweb100B/; the repo holds 1030. The default N = 30 covers the
medium track: the public train_gpt_medium.py runs 5590 steps of 8 x 64 * 1024 tokens, 2.93B tokens.
The work is done by hub_shards.py.
"""
import sys

from hub_shards import main

if __name__ == "__main__":
    sys.exit(main(repo_id="kjj0/fineweb100B-gpt2", out_dir_name="fineweb100B", default_n=30, max_n=1030))
