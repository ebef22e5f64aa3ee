"""Turn your own text into speedrun shards: GPT-2 BPE, BOS before every document, validation shard first.

    python data/tokenize_text.py books/*.txt --out data/books
    python data/tokenize_text.py corpus.jsonl --out data/corpus --text-field content --val-docs 500
    python data/tokenize_text.py notes.txt --format lines --out data/notes \\
        --vocab-bpe gpt2/vocab.bpe --encoder-json gpt2/encoder.json      # offline

Output, in the format of shard_format.py: `<prefix>_val_000000.bin` holding the first documents in input
order, then `<prefix>_train_000001.bin`, ... of --shard-tokens tokens each (the last one shorter); a
document may continue from one shard into the next, as in the FineWeb shards. The trainer reads them
with --train_files="OUT/<prefix>_train_*.bin" --val_files="OUT/<prefix>_val_*.bin".

The val split is the fewest leading documents that hold at least --val-tokens tokens (default 4096, what
the trainer's tiny preset validates on) and number at least --val-docs, or --val-fraction of all documents
(default 0.01, rounded up). Input too small to leave a training document is refused. At the end the script
prints the trainer command to run next (the tiny preset, with --val_tokens set to the val split rounded
down to a multiple of its --val_seq_len, 1024, when the split is below the trainer's default 10,485,760).

Tokenization is that of the FineWeb shards (modded-nanogpt `data/fineweb.py`): tiktoken's "gpt2"
encoding, `encode_ordinary` (an "<|endoftext|>" inside a text is ordinary text), and the id 50256 before
each document.

Documents (--format): `text` is a whole file, or each piece between occurrences of --separator;
`lines` is each line; `jsonl` is the string field --text-field of each JSON object line; `auto` reads
.jsonl/.ndjson files as jsonl and others as text. Blank documents are skipped.

The inputs are read twice: a first pass checks every file (UTF-8, JSON) and counts documents before
anything is written (the leading documents are read once more to size the val split); the second
tokenizes them on --workers processes and writes the results in input order, so the output does not
depend on the number of workers.
"""
import argparse
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import tiktoken
from shard_format import BOS, check_output_folder, read_shard_header, write_shard
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
from tqdm import tqdm

# sha256 of GPT-2's vocab.bpe and encoder.json: the values tiktoken's "gpt2" encoding checks
# (tiktoken_ext/openai_public.py, gpt2()).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_SIZE = 50257
DEFAULT_SHARD_TOKENS = 100_000_000  # as the FineWeb shards (200,001,024 bytes)
# train_gpt.py's validation settings, which the printed next command must satisfy (copied, since importing the
# trainer means importing torch; tests/test_data.py checks them against the trainer): the trainer validates on
# --val_tokens tokens, a multiple of --val_seq_len, and needs the val files to hold them.
TRAINER_VAL_TOKENS = 10_485_760
TRAINER_VAL_SEQ_LEN = 64 * 1024
TINY_VAL_TOKENS = 4096  # the tiny preset's, with its --val_seq_len below
TINY_VAL_SEQ_LEN = 1024
DEFAULT_VAL_TOKENS = TINY_VAL_TOKENS  # enough for README's next step, the tiny preset, and little taken from training
TRAINER = Path(__file__).resolve().parent.parent / "train_gpt.py"
MAX_SHARD_TOKENS = 2**31 - 1  # the header's int32 token count
BATCH_CHARS = 1 << 20  # text per worker task: amortizes the inter-process copy, keeps memory flat
JSONL_SUFFIXES = {".jsonl", ".ndjson"}


class InputError(Exception):
    """Bad input files or options: reported as one message and a non-zero exit status, no traceback."""


# -----------------------------------------------------------------------------
# Tokenizer

def _check_sha256(flag, path, expected):
    if not path.is_file():
        raise InputError(f"{flag} {path}: file not found")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise InputError(f"{flag} {path}: not GPT-2's file (sha256 {digest}, expected {expected})")


def load_gpt2_encoding(vocab_bpe=None, encoder_json=None):
    """tiktoken's GPT-2 encoding, built from local GPT-2 files if given, else tiktoken.get_encoding("gpt2").

    The local build is what tiktoken_ext/openai_public.py's gpt2() does with downloaded files:
    `data_gym_to_mergeable_bpe_ranks(vocab.bpe, encoder.json)` (checked against the same sha256), the
    r50k pattern, and <|endoftext|> = 50256; so both routes give the same ids.
    """
    if vocab_bpe is None and encoder_json is None:
        try:
            return tiktoken.get_encoding("gpt2")
        # Any failure: requests' network errors, a broken cache... all mean the files are unreachable.
        except Exception as err:  # noqa: BLE001
            raise InputError(
                f"could not load tiktoken's 'gpt2' encoding ({type(err).__name__}: {err}). It needs network "
                "access or a tiktoken cache; offline, pass GPT-2's vocabulary files with "
                "--vocab-bpe vocab.bpe --encoder-json encoder.json"
            ) from None
    if vocab_bpe is None or encoder_json is None:
        raise InputError("pass both --vocab-bpe and --encoder-json, or neither to use tiktoken's download")
    _check_sha256("--vocab-bpe", Path(vocab_bpe), GPT2_VOCAB_BPE_SHA256)
    _check_sha256("--encoder-json", Path(encoder_json), GPT2_ENCODER_JSON_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(vocab_bpe), str(encoder_json),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256, encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2", explicit_n_vocab=GPT2_VOCAB_SIZE, pat_str=r50k_pat_str,
        mergeable_ranks=ranks, special_tokens={ENDOFTEXT: BOS},
    )


def tokenize_documents(encoding, docs):
    """[BOS] + encoding.encode_ordinary(doc) for each document, concatenated into one uint16 array."""
    ids = []
    for doc in docs:
        ids.append(BOS)
        ids.extend(encoding.encode_ordinary(doc))
    return np.array(ids, dtype=np.uint16)


_worker_encoding = None  # each worker process's copy, set by _init_worker


def _init_worker(encoding):
    global _worker_encoding
    _worker_encoding = encoding


def _tokenize_task(task):
    split, docs = task
    return split, len(docs), tokenize_documents(_worker_encoding, docs)


# -----------------------------------------------------------------------------
# Documents

def _decode(data, path, offset, errors):
    """UTF-8 text of `data`, read from `path` at byte `offset`; strict errors name the byte offset."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        bad = data[err.start:err.end]
        raise InputError(
            f"{path}: invalid UTF-8 at byte offset {offset + err.start} (byte {bad!r}); convert the file "
            "to UTF-8, or pass --errors replace to substitute U+FFFD"
        ) from None


def _jsonl_text(line, path, lineno, text_field):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise InputError(f"{path}:{lineno}: no {text_field!r} field (--text-field names the field holding the text)")
    text = record[text_field]
    if not isinstance(text, str):
        raise InputError(f"{path}:{lineno}: field {text_field!r} holds a {type(text).__name__}, not a string")
    return text


def iter_documents(path, fmt, text_field, separator, errors):
    """Yield the non-blank documents of one input file, in file order (see the module docstring)."""
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"
    if fmt == "text":
        text = _decode(path.read_bytes(), path, 0, errors)
        yield from (doc for doc in (text.split(separator) if separator else [text]) if doc.strip())
        return
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, offset, errors).removesuffix("\n").removesuffix("\r")
            offset += len(raw)
            if not line.strip():
                continue
            doc = _jsonl_text(line, path, lineno, text_field) if fmt == "jsonl" else line
            if doc.strip():
                yield doc


def count_documents(paths, options):
    """Pass 1: check every file and count its documents; warns about and drops files without any."""
    counts = {}
    for path in tqdm(paths, desc="checking", unit="file", disable=None):
        n = sum(1 for _ in iter_documents(path, **options))
        if n:
            counts[path] = n
        else:
            print(f"warning: {path}: no documents (empty file?), skipped", file=sys.stderr)
    if not counts:
        raise InputError("no documents to tokenize: every input file is empty")
    return counts


def document_batches(paths, n_val, options):
    """Pass 2: yield (split, documents) tasks of about BATCH_CHARS characters, in input order.

    The first `n_val` documents are split "val", the rest "train"; no task mixes the two.
    """
    docs = itertools.chain.from_iterable(iter_documents(path, **options) for path in paths)
    batch, batch_split, chars = [], None, 0
    for i, doc in enumerate(docs):
        split = "val" if i < n_val else "train"
        if batch and (split != batch_split or chars >= BATCH_CHARS):
            yield batch_split, batch
            batch, chars = [], 0
        batch.append(doc)
        batch_split = split
        chars += len(doc)
    if batch:
        yield batch_split, batch


def validation_doc_count(docs, n_docs, encoding, *, val_tokens, val_docs, val_fraction):
    """Documents for the val shard: the fewest leading documents that hold at least `val_tokens` tokens (BOS
    included, as the trainer reads them) and number at least --val-docs, or ceil(--val-fraction * n_docs)
    without --val-docs. Some must remain to train on.

    `docs` yields the documents in input order; only the leading ones are read, and tokenized only until
    the token minimum is met.
    """
    min_docs = val_docs if val_docs is not None else math.ceil(val_fraction * n_docs)
    n_val, n_tokens = 0, 0
    for doc in docs:
        if n_val >= min_docs and n_tokens >= val_tokens:
            break
        if n_tokens < val_tokens:
            n_tokens += 1 + len(encoding.encode_ordinary(doc))
        n_val += 1
    if n_val < n_docs:
        return n_val
    split_hint = ("split the text into more documents (a text file is one document unless you pass --separator or "
                  "--format lines)")
    if min_docs >= n_docs:
        flag = "--val-docs" if val_docs is not None else "--val-fraction"
        raise InputError(f"the validation split takes {min_docs} of the {n_docs} documents ({flag}), leaving none to "
                         f"train on. Lower {flag}, or {split_hint}")
    if n_tokens >= val_tokens:
        problem = f"only all {n_docs} documents together reach it ({n_tokens:,} tokens)"
        fix = f"Give more text, {split_hint}"
    else:
        problem, fix = f"all {n_docs} documents together hold only {n_tokens:,} tokens", "Give more text"
    raise InputError(
        f"the validation split must hold at least {val_tokens:,} tokens (--val-tokens), but {problem}, leaving none "
        f"to train on. {fix}, or lower --val-tokens, though not below {TINY_VAL_SEQ_LEN}: the trainer validates on "
        f"--val_tokens tokens, a multiple of --val_seq_len ({TINY_VAL_SEQ_LEN} in the tiny preset)"
    )


# -----------------------------------------------------------------------------
# Shards

class ShardWriter:
    """Cuts one split's token stream into shards of exactly `shard_tokens` tokens, numbered from `first_index`."""

    def __init__(self, out_dir, prefix, split, first_index, shard_tokens):
        self.out_dir, self.prefix, self.split = out_dir, prefix, split
        self.next_index, self.shard_tokens = first_index, shard_tokens
        self.pending, self.n_pending = [], 0
        self.paths, self.n_tokens = [], 0

    def add(self, tokens):
        self.pending.append(tokens)
        self.n_pending += len(tokens)
        while self.n_pending >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[:self.shard_tokens])
            self.pending, self.n_pending = [stream[self.shard_tokens:]], len(stream) - self.shard_tokens

    def flush(self):
        """Write what is pending as a last, shorter shard (no-op if nothing is)."""
        if self.n_pending:
            self._write(np.concatenate(self.pending))
            self.pending, self.n_pending = [], 0

    def _write(self, tokens):
        path = self.out_dir / f"{self.prefix}_{self.split}_{self.next_index:06d}.bin"
        try:
            write_shard(path, tokens)
        except OSError as err:  # a full disk, say: the shards already written are an incomplete set
            raise InputError(f"writing {path} failed ({err.strerror or err}); remove "
                             f"{self.out_dir}/{self.prefix}_*.bin, free space or choose another --out, and run "
                             "again") from None
        if read_shard_header(path) != len(tokens):  # self-check with the reader the downloads use
            raise RuntimeError(f"{path}: header does not hold the {len(tokens)} tokens just written")
        self.paths.append(path)
        self.n_tokens += len(tokens)
        self.next_index += 1


def tokenize_to_shards(paths, out_dir, encoding, *, prefix, n_val, shard_tokens, workers, options, n_docs):
    """Pass 2: tokenize the documents of `paths` and write the val shards, then the train shards."""
    writers = {"val": ShardWriter(out_dir, prefix, "val", 0, shard_tokens),
               "train": ShardWriter(out_dir, prefix, "train", 1, shard_tokens)}
    tasks = document_batches(paths, n_val, options)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(workers, _init_worker, (encoding,)))
            results = pool.imap(_tokenize_task, tasks)  # imap keeps the input order
        else:
            _init_worker(encoding)  # the same task function, run in this process
            results = map(_tokenize_task, tasks)
        bar = stack.enter_context(tqdm(total=n_docs, desc="tokenizing", unit="doc", disable=None))
        for split, n, tokens in results:
            if split == "train":
                writers["val"].flush()  # validation is complete before any training shard is written
            writers[split].add(tokens)
            bar.update(n)
    writers["val"].flush()
    writers["train"].flush()
    return writers


# -----------------------------------------------------------------------------
# What to run next

def _shown_path(path):
    """`path` relative to the current folder if it lies below it, as a user would type it; else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _shell_flag(name, value):
    """`--name="value"`, as README writes globs; single-quoted whole where double quotes would let bash change it."""
    if any(c in value for c in '"$`\\!'):
        return shlex.quote(f"--{name}={value}")
    return f'--{name}="{value}"'


def next_command_lines(out, prefix, val_tokens):
    """The lines telling what to run on the new shards: a note, then the trainer command with the tiny preset.

    The command adds --val_tokens when the val split holds fewer than the trainer's default: the val split's
    `val_tokens` rounded down to a multiple of the tiny preset's --val_seq_len. None when the val split is
    shorter than one validation sequence, as no --val_tokens would then work.
    """
    n = val_tokens // TINY_VAL_SEQ_LEN * TINY_VAL_SEQ_LEN
    if n == 0:
        return None
    command = ["python", shlex.quote(_shown_path(TRAINER)), "--preset=tiny",
               _shell_flag("train_files", str(out / f"{prefix}_train_*.bin")),
               _shell_flag("val_files", str(out / f"{prefix}_val_*.bin"))]
    if val_tokens < TRAINER_VAL_TOKENS:
        command.append(f"--val_tokens={n}")
        note = (f"next, a short run on CPU. --val_tokens must be a multiple of --val_seq_len ({TINY_VAL_SEQ_LEN} in "
                f"the tiny preset, {TRAINER_VAL_SEQ_LEN:,} without it) and at most the val split's {val_tokens:,} "
                "tokens:")
    else:
        note = (f"next, a short run on CPU (the val split covers the trainer's default "
                f"--val_tokens={TRAINER_VAL_TOKENS:,}):")
    return [note, " ".join(command)]


# -----------------------------------------------------------------------------
# Command line

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Tokenize text files with GPT-2 BPE into FineWeb-format shards for the trainer. The val split is "
        "the fewest leading documents that meet every val split minimum; the rest is the train split.",
        epilog="Example: python data/tokenize_text.py books/*.txt --out data/books",
    )
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="text or JSONL files")
    parser.add_argument("--out", required=True, help="output folder for the shards (created if missing)")
    parser.add_argument("--prefix", default="text", help="shard name prefix: PREFIX_val_000000.bin ... (default text)")
    parser.add_argument("--format", choices=("auto", "text", "lines", "jsonl"), default="auto",
                        help="auto: .jsonl/.ndjson as jsonl, else text (default auto)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default text)")
    parser.add_argument("--separator", help="split text files into documents at this string, e.g. $'\\n\\n\\n'")
    parser.add_argument("--val-tokens", type=int, default=DEFAULT_VAL_TOKENS,
                        help="val split minimum: tokens, BOS included "
                             f"(default {DEFAULT_VAL_TOKENS}, what the trainer's tiny preset validates on)")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-docs", type=int, help="val split minimum: documents (instead of --val-fraction)")
    val.add_argument("--val-fraction", type=float, default=0.01,
                     help="val split minimum: this fraction of the documents, rounded up (default 0.01)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, as FineWeb)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: CPU count)")
    parser.add_argument("--vocab-bpe", type=Path, help="GPT-2 vocab.bpe, to work offline (with --encoder-json)")
    parser.add_argument("--encoder-json", type=Path, help="GPT-2 encoder.json, to work offline (with --vocab-bpe)")
    parser.add_argument("--errors", choices=("strict", "replace"), default="strict",
                        help="invalid UTF-8: strict stops with the file and byte offset (default); replace uses U+FFFD")
    args = parser.parse_args(argv)
    if args.separator is not None and (args.format in ("lines", "jsonl") or args.separator == ""):
        parser.error("--separator must be a non-empty string and applies to --format text/auto only")
    if args.val_tokens < 0:
        parser.error(f"--val-tokens must be >= 0, got {args.val_tokens}")
    if args.val_docs is not None and args.val_docs < 0:
        parser.error(f"--val-docs must be >= 0, got {args.val_docs}")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not 1 <= args.shard_tokens <= MAX_SHARD_TOKENS:
        parser.error(f"--shard-tokens must be in [1, {MAX_SHARD_TOKENS}] (the header's int32 count), "
                     f"got {args.shard_tokens}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    return args


def run(args):
    """Check inputs, tokenize, write shards and report; raises InputError for bad input."""
    for path in args.inputs:
        if path.is_dir():
            raise InputError(f"{path} is a folder; pass its files, e.g. {path}/*.txt")
        if not path.is_file():
            raise InputError(f"{path}: no such file")
    try:
        out = check_output_folder(args.out)  # before the checking pass, which can take long
    except ValueError as err:
        raise InputError(str(err)) from None
    existing = sorted(out.glob(f"{args.prefix}_*.bin"))
    if existing:
        raise InputError(
            f"{out} already holds {len(existing)} {args.prefix}_*.bin shards ({existing[0].name}, ...), which "
            "the trainer's glob would mix with the new ones; remove them or choose another --out or --prefix"
        )
    encoding = load_gpt2_encoding(args.vocab_bpe, args.encoder_json)
    options = {"fmt": args.format, "text_field": args.text_field, "separator": args.separator, "errors": args.errors}
    counts = count_documents(args.inputs, options)
    n_docs = sum(counts.values())
    leading = itertools.chain.from_iterable(iter_documents(path, **options) for path in counts)
    n_val = validation_doc_count(leading, n_docs, encoding, val_tokens=args.val_tokens, val_docs=args.val_docs,
                                 val_fraction=args.val_fraction)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # the folder changed since check_output_folder
        raise InputError(f"--out {out}: {err.strerror}; choose another --out") from None
    writers = tokenize_to_shards(list(counts), out, encoding, prefix=args.prefix, n_val=n_val,
                                 shard_tokens=args.shard_tokens, workers=args.workers, options=options, n_docs=n_docs)
    for split, n in (("val", n_val), ("train", n_docs - n_val)):
        w = writers[split]
        print(f"{split}: {n:,} documents, {w.n_tokens:,} tokens in {len(w.paths)} shards "
              f"({out / f'{args.prefix}_{split}_*.bin'})")
    lines = next_command_lines(out, args.prefix, writers["val"].n_tokens)
    if lines is None:
        print(f"warning: the val split holds {writers['val'].n_tokens:,} tokens, fewer than one validation sequence "
              f"(--val_seq_len={TINY_VAL_SEQ_LEN} in the tiny preset), so the trainer cannot validate on it; run "
              f"again with --val-tokens {TINY_VAL_TOKENS} or more", file=sys.stderr)
    else:
        print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
