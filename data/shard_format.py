"""The token shard format of the speedrun's FineWeb GPT-2 data, read, checked and written in one place.

Layout (modded-nanogpt `data/fineweb.py`, `write_datafile`): a header of 256 little-endian int32,
header[0] = 20240520 (magic), header[1] = 1 (version), header[2] = token count n; then n
little-endian uint16 tokens. So a valid file has exactly 1024 + 2 * n bytes; a full FineWeb shard
holds n = 100,000,000 tokens (200,001,024 bytes). Every document starts with <|endoftext|> = 50256,
which the trainer uses as BOS.

Also here, for every script that writes shards: `check_output_folder`, which refuses an unusable
--out before any long work starts.
"""
import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4  # int32 header
TOKEN_BYTES = 2  # uint16 tokens
BOS = 50256  # <|endoftext|> in the GPT-2 vocabulary (50257 tokens)


def read_shard_header(path):
    """Return the token count of the shard at `path` after checking magic, version and file size.

    Raises ValueError naming the file and what is wrong with it, so a truncated download or a
    file of another format is never mistaken for data.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic number {magic} (expected {SHARD_MAGIC}); not a token shard")
    if version != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION})")
    expected = HEADER_BYTES + TOKEN_BYTES * count
    if count < 0 or size != expected:
        raise ValueError(
            f"{path}: size {size} bytes does not match the header's {count} tokens "
            f"(expected {expected} bytes); the file is truncated or corrupt"
        )
    return count


@contextlib.contextmanager
def staged_file(path):
    """Yield a temporary path next to `path`; on success it atomically replaces `path`.

    The temporary name starts with a dot and ends in `.partial`, so shard globs such as
    `fineweb_train_*.bin` never match it, and it is removed whatever happens (error, Ctrl-C):
    an interrupted write never leaves a file that looks complete.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shard(path, tokens):
    """Write `tokens` (values < 2**16) as a shard at `path`, atomically; returns the token count."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    with staged_file(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    return len(tokens)


def check_output_folder(text, flag="--out"):
    """Return `text` (the value of `flag`) as a Path if it names a folder this process can write shards into,
    or one it can create; otherwise raise ValueError saying what is wrong and what to do.

    Leaves nothing behind: the folder itself is not created, and the write test is a temporary folder,
    removed at once, in the folder or in its nearest existing parent. Checking by writing, not by
    permission bits, also catches read-only mounts, /proc and root's unrestricted bits.
    """
    text = os.fspath(text)
    if not text.strip():  # Path("") is ".": the shards would land wherever the command happened to run
        raise ValueError(f"{flag} is empty; choose the output folder, e.g. {flag} data/mine")
    out = Path(text)
    existing = out
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == out else f" cannot be created: {existing}"
        raise ValueError(f"{flag} {out}{where} is not a folder; choose another {flag}")
    try:
        probe = tempfile.mkdtemp(prefix=".write-test-", dir=existing)
    except OSError as err:
        what = "write in" if existing == out else "create a folder in"
        raise ValueError(f"{flag} {out}: cannot {what} {existing} ({err.strerror}); choose a folder you can "
                         "write to") from None
    os.rmdir(probe)
    return out
