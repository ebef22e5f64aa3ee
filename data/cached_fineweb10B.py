"""Download the speedrun's FineWeb-10B GPT-2 shards: `python data/cached_fineweb10B.py [N] [--out DIR]`.

The validation shard and the first N training shards (100M tokens each) of the hub dataset
kjj0/fineweb10B-gpt2 into data/fineweb10B/. The default N = 9 (900M tokens) is about what a
small-track record run reads; the repo holds 103. The work is done by hub_shards.py.
"""
import sys

from hub_shards import main

if __name__ == "__main__":
    sys.exit(main(repo_id="kjj0/fineweb10B-gpt2", out_dir_name="fineweb10B", default_n=9, max_n=103))
