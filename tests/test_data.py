"""Specifications of data/: the shard format, the hub downloaders (run offline against a hub cache laid
out here) and the text tokenizer (run with GPT-2's vocabulary files shipped in data/gpt2/)."""
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BOS, ROOT, write_shard

sys.path.insert(0, str(ROOT / "data"))
import hub_shards
import shard_format
import tokenize_text

VOCAB_BPE = ROOT / "data" / "gpt2" / "vocab.bpe"
ENCODER_JSON = ROOT / "data" / "gpt2" / "encoder.json"


def shard_tokens(path):
    """The tokens of a shard that passes read_shard_header, as a list."""
    count = shard_format.read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=count, offset=shard_format.HEADER_BYTES).tolist()


def documents_of(tokens):
    """Split a BOS-prefixed token stream into its documents (token lists without the BOS)."""
    assert tokens[0] == BOS, f"stream must start with BOS {BOS}, starts with {tokens[:5]}"
    starts = [i for i, t in enumerate(tokens) if t == BOS] + [len(tokens)]
    return [tokens[a + 1:b] for a, b in itertools.pairwise(starts)]


@pytest.fixture(scope="module")
def gpt2():
    return tokenize_text.load_gpt2_encoding(VOCAB_BPE, ENCODER_JSON)


# -----------------------------------------------------------------------------
# Shard format

def test_read_shard_header_returns_token_count_of_valid_shard(tmp_path):
    path = write_shard(tmp_path / "ok.bin", [BOS, 1, 2, 3])
    assert shard_format.read_shard_header(path) == 4


@pytest.mark.parametrize("defect, reason", [
    ({"magic": 12345}, "bad magic"),
    ({"version": 2}, "version"),
    ({"header_count": 5}, "does not match"),
    ("truncated", "does not match"),
    ("short", "shorter than"),
])
def test_read_shard_header_rejects_bad_files_naming_file_and_reason(tmp_path, defect, reason):
    path = tmp_path / "fineweb_train_000001.bin"
    if defect == "truncated":
        write_shard(path, range(100))
        path.write_bytes(path.read_bytes()[:-1])
    elif defect == "short":
        path.write_bytes(b"\0" * 10)
    else:
        write_shard(path, range(4), **defect)
    with pytest.raises(ValueError) as info:
        shard_format.read_shard_header(path)
    assert path.name in str(info.value) and reason in str(info.value), f"unhelpful error: {info.value}"


def test_write_shard_matches_the_reference_layout(tmp_path):
    """Byte-identical to conftest.write_shard: 256 int32 header [20240520, 1, n], then uint16 tokens."""
    tokens = [BOS, 0, 65535, 15496, 995]
    ours = tmp_path / "ours.bin"
    assert shard_format.write_shard(ours, tokens) == len(tokens)
    assert ours.read_bytes() == write_shard(tmp_path / "ref.bin", tokens).read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["ours.bin", "ref.bin"], "no temporary file may be left"


def test_staged_file_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "fineweb_val_000000.bin"
    with pytest.raises(RuntimeError), shard_format.staged_file(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == [], "an interrupted write must leave no file, complete-looking or temporary"


# -----------------------------------------------------------------------------
# Hub downloads, offline against a local hub cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_10B = "kjj0/fineweb10B-gpt2"


def fill_hub_cache(hf_home, repo_id, files):
    """Lay out `files` ({name: writer(path)}) as huggingface_hub 2.4 caches a dataset repo.

    hub/datasets--OWNER--NAME/refs/main holds the commit hash (no newline: hf_hub_download reads the
    file verbatim and, offline, resolves snapshots/<commit>/<name>), and each snapshot entry is a
    relative symlink to its blob, named here by a hash as the hub names blobs by etag.
    """
    repo_dir = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for name, write in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        write(blob)
        (snapshot / name).symlink_to(os.path.join("..", "..", "blobs", blob.name))


def valid(tokens):
    return lambda path: write_shard(path, tokens)


def run_download(script, hf_home, out, *args):
    """The real script in a fresh interpreter, so huggingface_hub reads HF_HUB_OFFLINE at import."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"))
    return subprocess.run([sys.executable, str(ROOT / "data" / script), *map(str, args), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("script, repo_id", [("cached_fineweb10B.py", REPO_10B),
                                             ("cached_fineweb100B.py", "kjj0/fineweb100B-gpt2")])
def test_download_copies_valid_cached_shards_into_out(tmp_path, script, repo_id):
    names = ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    fill_hub_cache(tmp_path / "hf", repo_id, {n: valid([BOS, i, i + 1]) for i, n in enumerate(names)})
    out = tmp_path / "out"
    result = run_download(script, tmp_path / "hf", out, 2)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == sorted(names), "exactly the val shard and N=2 train shards"
    for i, name in enumerate(names):
        assert shard_tokens(out / name) == [BOS, i, i + 1]
        assert f"[{i + 1}/3] {name}: 3 tokens" in result.stdout, f"no progress line for {name}:\n{result.stdout}"


def test_download_rerun_skips_present_shards_without_the_hub(tmp_path):
    names = ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]
    fill_hub_cache(tmp_path / "hf", REPO_10B, {n: valid([BOS, 7]) for n in names})
    out = tmp_path / "out"
    assert run_download("cached_fineweb10B.py", tmp_path / "hf", out, 1).returncode == 0
    shutil.rmtree(tmp_path / "hf")  # a rerun must not need the cache (or the network)
    result = run_download("cached_fineweb10B.py", tmp_path / "hf", out, 1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("already present") == 2, result.stdout


@pytest.mark.parametrize("corrupt, reason", [({"magic": 999}, "bad magic"),
                                             ({"header_count": 50}, "does not match")])
def test_download_rejects_corrupt_cached_shard_and_leaves_no_complete_file(tmp_path, corrupt, reason):
    fill_hub_cache(tmp_path / "hf", REPO_10B, {
        "fineweb_val_000000.bin": valid([BOS, 1]),
        "fineweb_train_000001.bin": lambda path: write_shard(path, [BOS, 1, 2], **corrupt),
    })
    out = tmp_path / "out"
    result = run_download("cached_fineweb10B.py", tmp_path / "hf", out, 1)
    assert result.returncode != 0
    assert "fineweb_train_000001.bin" in result.stderr and reason in result.stderr, result.stderr
    assert os.listdir(out) == ["fineweb_val_000000.bin"], "the corrupt shard (or a temp file) was left in out"


def test_download_of_file_missing_offline_fails_naming_it(tmp_path):
    fill_hub_cache(tmp_path / "hf", REPO_10B, {"fineweb_val_000000.bin": valid([BOS, 1])})
    out = tmp_path / "out"
    result = run_download("cached_fineweb10B.py", tmp_path / "hf", out, 1)
    assert result.returncode != 0
    assert "fineweb_train_000001.bin" in result.stderr and "HF_HUB_OFFLINE" in result.stderr, result.stderr
    assert os.listdir(out) == ["fineweb_val_000000.bin"]


def test_download_replaces_an_invalid_file_already_in_out(tmp_path):
    fill_hub_cache(tmp_path / "hf", REPO_10B, {"fineweb_val_000000.bin": valid([BOS, 5, 6])})
    out = tmp_path / "out"
    out.mkdir()
    (out / "fineweb_val_000000.bin").write_bytes(b"\0" * 2000)  # e.g. left by another tool's broken download
    result = run_download("cached_fineweb10B.py", tmp_path / "hf", out, 0)
    assert result.returncode == 0, result.stderr
    assert "replacing invalid file" in result.stderr
    assert shard_tokens(out / "fineweb_val_000000.bin") == [BOS, 5, 6]


def test_download_refuses_more_shards_than_the_repo_has(capsys):
    with pytest.raises(SystemExit) as info:
        hub_shards.main(REPO_10B, "fineweb10B", default_n=9, max_n=103, argv=["104"])
    assert info.value.code == 2
    assert "between 0 and 103" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Tokenizer

def tokenize(*args, workers=1):
    """tokenize_text's command line, in process, with the shipped GPT-2 files; returns the exit status."""
    argv = [str(a) for a in args] + ["--vocab-bpe", str(VOCAB_BPE), "--encoder-json", str(ENCODER_JSON)]
    return tokenize_text.main(argv + ["--workers", str(workers)])


def write_texts(folder, texts, suffix=".txt"):
    folder.mkdir(exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        paths.append(folder / f"doc{i:02d}{suffix}")
        paths[-1].write_bytes(text.encode() if isinstance(text, str) else text)
    return paths


DOCS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "Zürich → 東京 🚀\nline two\n",
        "  leading spaces and <|endoftext|> as plain text", "last one"]


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    (" Hello world", [18435, 995]),
    ("The quick brown fox jumps over the lazy dog.", [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]),
])
def test_local_vocab_files_give_the_gpt2_ids(gpt2, text, ids):
    """Known GPT-2 encodings (the reference GPT-2 tokenizer); the build uses only local files."""
    assert gpt2.encode_ordinary(text) == ids
    assert gpt2.n_vocab == 50257 and gpt2.eot_token == BOS


def test_text_files_become_bos_prefixed_documents_that_decode_back(tmp_path, gpt2):
    inputs = write_texts(tmp_path / "in", DOCS)
    out = tmp_path / "out"
    assert tokenize(*inputs, "--out", out, "--val-docs", 2, "--val-tokens", 0) == 0
    assert sorted(os.listdir(out)) == ["text_train_000001.bin", "text_val_000000.bin"]
    val = documents_of(shard_tokens(out / "text_val_000000.bin"))
    train = documents_of(shard_tokens(out / "text_train_000001.bin"))
    assert [gpt2.decode(d) for d in val] == DOCS[:2], "the val shard holds the first documents, in order"
    assert [gpt2.decode(d) for d in train] == DOCS[2:]
    assert val[0] == [15496, 995]
    assert BOS not in itertools.chain(*train), "<|endoftext|> inside a text must be encoded as ordinary text"


def test_val_shards_are_written_before_train_shards(tmp_path, monkeypatch):
    written = []
    real_write = tokenize_text.write_shard

    def recording_write(path, tokens):
        written.append(path.name)
        return real_write(path, tokens)

    monkeypatch.setattr(tokenize_text, "write_shard", recording_write)
    inputs = write_texts(tmp_path / "in", DOCS)
    assert tokenize(*inputs, "--out", tmp_path / "out", "--val-docs", 3, "--val-tokens", 0, "--shard-tokens", 8) == 0
    val = [n for n in written if "_val_" in n]
    assert written[:len(val)] == val == [f"text_val_{i:06d}.bin" for i in range(len(val))], written
    assert written[len(val)] == "text_train_000001.bin", written
    assert len(val) >= 2, "the test needs more than one val shard"


def test_shards_hold_exactly_shard_tokens_and_concatenate_to_the_stream(tmp_path, gpt2):
    inputs = write_texts(tmp_path / "in", DOCS)
    out = tmp_path / "out"
    assert tokenize(*inputs, "--out", out, "--val-docs", 1, "--val-tokens", 0, "--shard-tokens", 7) == 0
    train_paths = sorted(out.glob("text_train_*.bin"))
    sizes = [shard_format.read_shard_header(p) for p in train_paths]
    assert sizes[:-1] == [7] * (len(sizes) - 1) and 1 <= sizes[-1] <= 7, sizes
    stream = [t for p in train_paths for t in shard_tokens(p)]
    assert stream == tokenize_text.tokenize_documents(gpt2, DOCS[1:]).tolist()


@pytest.mark.parametrize("fmt, suffix, content, extra, expected", [
    ("lines", ".txt", "first line\n\nsecond line\r\n  \nthird", [], ["first line", "second line", "third"]),
    ("auto", ".jsonl", '{"content": "a doc"}\n\n{"content": "b doc", "id": 2}\n{"content": ""}\n',
     ["--text-field", "content"], ["a doc", "b doc"]),
    ("text", ".txt", "one\n===\ntwo\n===\n\n===\nthree", ["--separator", "\n===\n"], ["one", "two", "three"]),
])
def test_formats_split_documents(tmp_path, gpt2, fmt, suffix, content, extra, expected):
    """Blank lines and blank documents are skipped; the rest are documents, in file order."""
    inputs = write_texts(tmp_path / "in", [content], suffix=suffix)
    out = tmp_path / "out"
    assert tokenize(*inputs, "--out", out, "--format", fmt, "--val-docs", 1, "--val-tokens", 0, *extra) == 0
    docs = documents_of(shard_tokens(out / "text_val_000000.bin") + shard_tokens(out / "text_train_000001.bin"))
    assert [gpt2.decode(d) for d in docs] == expected


def test_multiple_workers_write_the_same_shards_as_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize_text, "BATCH_CHARS", 50)  # many small tasks, so order could go wrong
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "über", "naïve", "42", "\n"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(200)]
    inputs = write_texts(tmp_path / "in", ["\n".join(texts[:120]), "\n".join(texts[120:])])
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        assert tokenize(*inputs, "--out", out, "--format", "lines", "--shard-tokens", 500, workers=workers) == 0
        outputs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len(outputs[1]) > 3
    assert outputs[2] == outputs[1], "the output must not depend on --workers"


def test_script_runs_from_the_command_line(tmp_path):
    inputs = write_texts(tmp_path / "in", DOCS)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "data" / "tokenize_text.py"), *map(str, inputs),
                             "--out", str(out), "--prefix", "mine", "--val-docs", "1", "--val-tokens", "0",
                             "--workers", "2",
                             "--vocab-bpe", str(VOCAB_BPE), "--encoder-json", str(ENCODER_JSON)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["mine_train_000001.bin", "mine_val_000000.bin"]
    assert "train: 4 documents" in result.stdout, result.stdout


# -----------------------------------------------------------------------------
# Tokenizer: bad input gives a clear message and a non-zero exit

def test_empty_files_are_skipped_with_a_warning(tmp_path, capsys):
    inputs = write_texts(tmp_path / "in", ["first", "", "second"])
    assert tokenize(*inputs, "--out", tmp_path / "out", "--val-docs", 1, "--val-tokens", 0) == 0
    assert f"{inputs[1]}: no documents" in capsys.readouterr().err


def test_only_empty_files_is_an_error(tmp_path, capsys):
    inputs = write_texts(tmp_path / "in", ["", " \n"])
    assert tokenize(*inputs, "--out", tmp_path / "out") == 1
    assert "no documents to tokenize" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "nothing may be written for bad input"


@pytest.mark.parametrize("fmt", ["text", "lines"])
def test_invalid_utf8_names_file_and_byte_offset(tmp_path, capsys, fmt):
    inputs = write_texts(tmp_path / "in", ["fine", b"ok line\nbad \xff byte\n"])
    assert tokenize(*inputs, "--out", tmp_path / "out", "--format", fmt) == 1
    err = capsys.readouterr().err
    assert f"{inputs[1]}: invalid UTF-8 at byte offset 12" in err and "--errors replace" in err, err
    assert not (tmp_path / "out").exists()


def test_errors_replace_substitutes_the_replacement_character(tmp_path, gpt2):
    inputs = write_texts(tmp_path / "in", ["fine", b"bad \xff byte"])
    out = tmp_path / "out"
    assert tokenize(*inputs, "--out", out, "--val-docs", 1, "--val-tokens", 0, "--errors", "replace") == 0
    assert gpt2.decode(documents_of(shard_tokens(out / "text_train_000001.bin"))[0]) == "bad \ufffd byte"


@pytest.mark.parametrize("line, message", [
    ("{not json", "data.jsonl:2: not valid JSON"),
    ('{"body": "no text field"}', "data.jsonl:2: no 'text' field"),
    ('{"text": 42}', "data.jsonl:2: field 'text' holds a int"),
    ('["a list"]', "data.jsonl:2: no 'text' field"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, capsys, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "good"}) + "\n" + line + "\n")
    assert tokenize(path, "--out", tmp_path / "out") == 1
    assert message in capsys.readouterr().err


def test_missing_or_wrong_vocab_files_are_errors(tmp_path, capsys):
    inputs = write_texts(tmp_path / "in", ["a", "b"])
    argv = [*map(str, inputs), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert tokenize_text.main(argv + ["--vocab-bpe", str(tmp_path / "nope.bpe"), "--encoder-json",
                                      str(ENCODER_JSON)]) == 1
    assert f"--vocab-bpe {tmp_path / 'nope.bpe'}: file not found" in capsys.readouterr().err
    assert tokenize_text.main(argv + ["--vocab-bpe", str(ENCODER_JSON), "--encoder-json", str(ENCODER_JSON)]) == 1
    assert "not GPT-2's file" in capsys.readouterr().err
    assert tokenize_text.main(argv + ["--vocab-bpe", str(VOCAB_BPE)]) == 1
    assert "pass both --vocab-bpe and --encoder-json" in capsys.readouterr().err


def test_failed_tiktoken_download_says_to_pass_vocab_files(tmp_path, capsys, monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tokenize_text.tiktoken, "get_encoding", offline)
    inputs = write_texts(tmp_path / "in", ["a", "b"])
    assert tokenize_text.main([*map(str, inputs), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "no network" in err and "--vocab-bpe vocab.bpe --encoder-json encoder.json" in err, err


def test_existing_shards_in_out_are_refused(tmp_path, capsys):
    inputs = write_texts(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    write_shard(out / "text_train_000007.bin", [BOS, 1])  # stale: the glob would mix it in
    assert tokenize(*inputs, "--out", out) == 1
    assert "already holds 1 text_*.bin" in capsys.readouterr().err


def test_validation_split_leaving_nothing_to_train_is_an_error(tmp_path, capsys):
    inputs = write_texts(tmp_path / "in", ["one whole book as one document"])
    assert tokenize(*inputs, "--out", tmp_path / "out") == 1
    assert "leaving none to train on" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Output folder: an unusable --out is one `error:` line, found before any long work

def unusable_out(tmp_path, case):
    """The --out text for each way an output folder can be unusable."""
    (tmp_path / "afile").write_text("not a folder")
    return {"file": str(tmp_path / "afile"), "under_file": str(tmp_path / "afile" / "sub"),
            "proc": "/proc/x", "empty": ""}[case]


OUT_CASES = ["file", "under_file", pytest.param("proc", marks=pytest.mark.skipif(
    not os.path.isdir("/proc"), reason="needs Linux's /proc, where no folder can be created")), "empty"]
OUT_REASONS = {"file": "not a folder", "under_file": "not a folder", "proc": "cannot create", "empty": "is empty"}


@pytest.mark.parametrize("case", OUT_CASES)
def test_tokenizer_refuses_an_unusable_out_before_the_checking_pass(tmp_path, capsys, monkeypatch, case):
    def checking_pass(*args, **kwargs):
        raise AssertionError("the checking pass ran before --out was checked")
    monkeypatch.setattr(tokenize_text, "count_documents", checking_pass)
    monkeypatch.chdir(tmp_path)  # an empty --out must not mean "here"
    inputs = write_texts(tmp_path / "in", DOCS)
    assert tokenize(*inputs, "--out", unusable_out(tmp_path, case)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and OUT_REASONS[case] in err and "choose" in err, err
    assert not list(tmp_path.glob("text_*.bin")), "nothing may be written"


@pytest.mark.parametrize("case", OUT_CASES)
def test_download_refuses_an_unusable_out_before_fetching(tmp_path, case):
    fill_hub_cache(tmp_path / "hf", REPO_10B, {"fineweb_val_000000.bin": valid([BOS, 1])})
    out = unusable_out(tmp_path, case)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    result = subprocess.run([sys.executable, str(ROOT / "data" / "cached_fineweb10B.py"), "0", "--out", out],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out") and OUT_REASONS[case] in lines[0], result.stderr
    assert "fineweb_val_000000.bin" not in os.listdir(tmp_path), "an empty --out must not mean the current folder"


def test_tokenizer_script_reports_an_unusable_out_in_one_line(tmp_path):
    """The command line as a user runs it: no traceback, one line, exit status 1."""
    inputs = write_texts(tmp_path / "in", DOCS)
    result = subprocess.run([sys.executable, str(ROOT / "data" / "tokenize_text.py"), *map(str, inputs),
                             "--out", unusable_out(tmp_path, "under_file"), "--workers", "1",
                             "--vocab-bpe", str(VOCAB_BPE), "--encoder-json", str(ENCODER_JSON)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: --out"), result.stderr


def test_a_failed_shard_write_is_one_error_line_naming_the_leftovers(tmp_path, capsys, monkeypatch):
    def full_disk(path, tokens):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tokenize_text, "write_shard", full_disk)
    inputs = write_texts(tmp_path / "in", DOCS)
    assert tokenize(*inputs, "--out", tmp_path / "out", "--val-docs", 1, "--val-tokens", 0) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "No space left on device" in err and "text_*.bin" in err, err



# -----------------------------------------------------------------------------
# Validation split: sized for the trainer, and the next command printed

def words(n):
    """A document of exactly n GPT-2 tokens ("word" then n - 1 times " word"), n + 1 with its BOS."""
    return " ".join(["word"] * n)


def val_and_train_docs(out):
    return [len(documents_of(shard_tokens(p))) for p in (out / "text_val_000000.bin", out / "text_train_000001.bin")]


def printed_command(stdout):
    commands = [line for line in stdout.splitlines() if line.startswith("python ")]
    assert len(commands) == 1, f"expected one command line to copy:\n{stdout}"
    return commands[0]


def test_default_val_split_is_the_fewest_leading_documents_holding_the_tiny_presets_val_tokens(tmp_path, gpt2):
    inputs = write_texts(tmp_path / "in", [words(1500)] * 13)  # 1501 tokens each with BOS
    out = tmp_path / "out"
    assert tokenize(*inputs, "--out", out) == 0
    n_val, n_train = val_and_train_docs(out)
    one_doc = len(tokenize_text.tokenize_documents(gpt2, [words(1500)]))
    assert math.ceil(0.01 * 13) == 1 and one_doc == 1501 < tokenize_text.TINY_VAL_TOKENS, \
        "negative control: the 1% rule alone takes one document, too few tokens"
    assert (n_val, n_train) == (3, 10), "3 x 1501 tokens is the first count of documents reaching 4096"
    assert shard_format.read_shard_header(out / "text_val_000000.bin") == 3 * 1501


@pytest.mark.parametrize("extra, n_val", [
    (["--val-docs", "5"], 5),                        # more documents than the token minimum needs
    (["--val-docs", "1"], 3),                        # the token minimum needs more than --val-docs
    (["--val-fraction", "0.5"], 7),                  # ceil(0.5 * 13)
    (["--val-tokens", "0", "--val-docs", "2"], 2),   # exactly --val-docs documents
    (["--val-tokens", "1502"], 2),                   # 2 x 1501 tokens >= 1502 > 1501
])
def test_val_split_is_the_fewest_leading_documents_meeting_every_minimum(tmp_path, extra, n_val):
    inputs = write_texts(tmp_path / "in", [words(1500)] * 13)
    out = tmp_path / "out"
    assert tokenize(*inputs, "--out", out, *extra) == 0
    assert val_and_train_docs(out) == [n_val, 13 - n_val]


def test_input_too_small_for_the_val_split_is_refused_naming_the_flag(tmp_path, capsys):
    inputs = write_texts(tmp_path / "in", [words(1000)] * 4)  # 4004 tokens: under 4096 even all together
    assert tokenize(*inputs, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "4,004 tokens" in err and "leaving none to train on" in err and "--val-tokens" in err, err
    assert "--val_seq_len" in err, f"the error must say what a smaller --val-tokens must still allow:\n{err}"
    assert not (tmp_path / "out").exists(), "nothing may be written"


def test_next_command_uses_the_val_split_rounded_down_to_the_tiny_val_seq_len(tmp_path, capsys):
    inputs = write_texts(tmp_path / "in", [words(1500)] * 13)
    out = tmp_path / "out"
    assert tokenize(*inputs, "--out", out) == 0
    stdout = capsys.readouterr().out
    assert printed_command(stdout).endswith(
        f'train_gpt.py --preset=tiny --train_files="{out}/text_train_*.bin" --val_files="{out}/text_val_*.bin" '
        "--val_tokens=4096"), stdout  # 4503 val tokens, rounded down to a multiple of 1024
    assert "multiple of --val_seq_len" in stdout, stdout


@pytest.mark.parametrize("val_tokens, flag", [(4503, " --val_tokens=4096"), (10_485_759, " --val_tokens=10484736"),
                                              (10_485_760, ""), (50_000_000, "")])
def test_next_command_adds_val_tokens_only_below_the_trainer_default(val_tokens, flag):
    lines = tokenize_text.next_command_lines(Path("data/mine"), "text", val_tokens)
    command = printed_command("\n".join(lines))
    assert command.endswith('--val_files="data/mine/text_val_*.bin"' + flag), command


def test_val_split_too_small_to_validate_warns_and_prints_no_command(tmp_path, capsys):
    inputs = write_texts(tmp_path / "in", DOCS)
    assert tokenize(*inputs, "--out", tmp_path / "out", "--val-tokens", 0, "--val-docs", 1, "--val-tokens", 0) == 0
    captured = capsys.readouterr()
    assert "python " not in captured.out, "no command the trainer would refuse"
    assert "warning: the val split holds 3 tokens" in captured.err and "--val-tokens" in captured.err, captured.err


def test_next_command_quotes_paths_the_shell_would_change(tmp_path):
    lines = tokenize_text.next_command_lines(Path("my data/$HOME"), "text", 5000)
    assert "'--train_files=my data/$HOME/text_train_*.bin'" in printed_command("\n".join(lines))


def test_trainer_settings_the_next_command_relies_on_match_train_gpt():
    """tokenize_text cannot import the trainer (torch, CUDA setup); its copies of these values must agree."""
    import train_gpt
    defaults, tiny = train_gpt.Hyperparameters(), train_gpt.PRESETS["tiny"]["flags"]
    assert tokenize_text.TRAINER_VAL_TOKENS == defaults.val_tokens
    assert tokenize_text.TRAINER_VAL_SEQ_LEN == defaults.val_seq_len
    assert tokenize_text.TINY_VAL_TOKENS == tiny["val_tokens"]
    assert tokenize_text.TINY_VAL_SEQ_LEN == tiny["val_seq_len"]


# -----------------------------------------------------------------------------
# Size errors name the flag, the allowed values and the value given

@pytest.mark.parametrize("args, message", [
    (["--val-docs", "-1"], "--val-docs must be >= 0, got -1"),
    (["--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1.0"),
    (["--val-tokens", "-5"], "--val-tokens must be >= 0, got -5"),
    (["--shard-tokens", "0"], "--shard-tokens must be in [1, 2147483647] (the header's int32 count), got 0"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
])
def test_tokenizer_size_errors_name_flag_range_and_value(tmp_path, capsys, args, message):
    inputs = write_texts(tmp_path / "in", DOCS)
    with pytest.raises(SystemExit) as info:
        tokenize_text.main([*map(str, inputs), "--out", str(tmp_path / "out"), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
