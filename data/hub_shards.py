"""Fetch the speedrun's pre-tokenized FineWeb shards from the Hugging Face hub, checked and in place.

The one implementation behind `cached_fineweb10B.py` and `cached_fineweb100B.py`. For each file:

1. If the output folder already holds it and `read_shard_header` accepts it, skip it.
2. Resolve it through the hub cache with `huggingface_hub.hf_hub_download(..., repo_type="dataset")`.
   No `local_dir`: in huggingface_hub 2.4 a `local_dir` download with HF_HUB_OFFLINE=1 only looks in
   that folder (`_hf_hub_download_to_local_dir` gives up when the metadata request fails), while the
   cache path falls back to `refs/main` -> `snapshots/<commit>/<file>`, so offline machines with a
   filled cache (HF_HOME / HF_HUB_CACHE) still work. The hub writes its cache through its own
   temporary `.incomplete` files.
3. Check the cached file's header and size, then hard-link it (or copy it, across file systems) into
   the output folder under a temporary name and rename it into place (`staged_file`). A file under its
   final name is therefore always complete and valid, and a linked shard costs no extra disk.
"""
import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from shard_format import check_output_folder, read_shard_header, staged_file


def shard_names(n_train):
    """`fineweb_val_000000.bin`, then `fineweb_train_000001.bin` ... for `n_train` training shards."""
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_train + 1)]


def place_shard(src, dest):
    """Put a copy of the checked shard `src` at `dest` atomically: a hard link where possible."""
    with staged_file(dest) as tmp:
        try:
            os.link(os.path.realpath(src), tmp)  # the hub cache's snapshot entry is a symlink to a blob
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(src, tmp)


def fetch_shard(repo_id, name, out_dir):
    """Make `out_dir/name` a valid shard; returns (token count, whether it had to be fetched).

    Raises ValueError (a corrupt file in the hub cache) or OSError (the hub's errors, such as
    LocalEntryNotFoundError offline, and disk errors), each naming the file.
    """
    dest = out_dir / name
    if dest.exists():
        try:
            return read_shard_header(dest), False
        except ValueError as err:
            print(f"{name}: replacing invalid file ({err})", file=sys.stderr)
    cached = hf_hub_download(repo_id=repo_id, filename=name, repo_type="dataset")
    try:
        count = read_shard_header(cached)
    except ValueError as err:
        raise ValueError(f"{err}\nThis is the hub cache's copy; delete it and run again to download {name} anew.")
    place_shard(cached, dest)
    return count, True


def main(repo_id, out_dir_name, default_n, max_n, argv=None):
    """Command line: `[N] [--out DIR]`; fetches the val shard and N train shards of `repo_id`.

    `max_n` is the number of training shards the repo holds. Returns the exit status.
    """
    parser = argparse.ArgumentParser(
        description=f"Download the validation shard and the first N training shards (100M GPT-2 tokens "
        f"each) of the Hugging Face dataset {repo_id}. Honors HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE."
    )
    parser.add_argument("n", nargs="?", type=int, default=default_n, metavar="N",
                        help=f"number of training shards, 0 to {max_n} (default {default_n})")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / out_dir_name),
                        help=f"output folder (default: data/{out_dir_name} next to this script)")
    args = parser.parse_args(argv)
    if not 0 <= args.n <= max_n:
        parser.error(f"N must be between 0 and {max_n} ({repo_id} has {max_n} training shards), got {args.n}")

    try:
        out = check_output_folder(args.out)
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as err:  # OSError: the folder changed between the check and mkdir
        print(f"error: {err}", file=sys.stderr)
        return 1
    names = shard_names(args.n)
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        try:
            count, fetched = fetch_shard(repo_id, name, out)
        except (OSError, ValueError) as err:
            offline = f" (HF_HUB_OFFLINE is set: only the cache {constants.HF_HUB_CACHE} was searched)"
            print(f"error: could not fetch {name} from {repo_id}{offline if constants.is_offline_mode() else ''}:"
                  f"\n{type(err).__name__}: {err}", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - t0
        size_mb = (out / name).stat().st_size / 1e6
        how = f"fetched in {seconds:.1f} s ({size_mb / max(seconds, 1e-9):.0f} MB/s)" if fetched else "already present"
        print(f"[{i}/{len(names)}] {name}: {count:,} tokens, {size_mb:.1f} MB, {how}", flush=True)
    print(f"{len(names)} shards ready in {out}")
    return 0
