"""README's own-text path, run as written: tokenize a folder of text files, then train the tiny preset
on the shards with the command the tokenizer prints.

The commands run in a scratch copy of the repository's data scripts and trainer, from its root, as a
user would type them (offline: with the vocabulary flags README names). The copy keeps the test's
shards and logs out of the checkout.
"""
import itertools
import random
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import BOS, ROOT

sys.path.insert(0, str(ROOT / "data"))
import shard_format
import tokenize_text

from train_gpt import PRESETS

# The commands README.md shows for your own text (test_readme_shows_these_commands keeps them in step).
TOKENIZE = "python data/tokenize_text.py my/*.txt --out data/mine"
TRAIN = ('python train_gpt.py --preset=tiny --train_files="data/mine/text_train_*.bin" '
         '--val_files="data/mine/text_val_*.bin"')
OFFLINE = "--vocab-bpe data/gpt2/vocab.bpe --encoder-json data/gpt2/encoder.json"
N_FILES = 13
TINY_VAL_TOKENS = PRESETS["tiny"]["flags"]["val_tokens"]  # what README's train command validates on
TINY_VAL_SEQ_LEN = PRESETS["tiny"]["flags"]["val_seq_len"]

WORDS = ["licence", "software", "copy", "distribute", "modify", "terms", "conditions", "warranty", "notice",
         "permission", "granted", "provided", "that", "the", "work", "source", "code", "object", "form", "any",
         "person", "obtaining", "this", "and", "or", "of", "to", "in", "a", "without", "limitation", "rights",
         "use", "merge", "publish", "sublicense", "sell", "copies", "holders", "contributors", "liable",
         "damages", "event", "shall", "be", "included", "all", "substantial", "portions", "files",
         "documentation"]


def licence_like_text(seed, n_words):
    """Deterministic English-like prose of `n_words` words in sentences and paragraphs."""
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18)))
        sentences.append(sentence.capitalize() + ".")
    paragraphs = [" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)]
    return "\n\n".join(paragraphs) + "\n"


def run_shell(command, cwd, timeout):
    """`command` as typed in bash, with this test's interpreter for its leading `python`."""
    assert command.startswith("python "), command
    command = f"{shlex.quote(sys.executable)} {command.removeprefix('python ')}"
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def shard_documents(path):
    count = shard_format.read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=count, offset=shard_format.HEADER_BYTES).tolist()
    starts = [i for i, t in enumerate(tokens) if t == BOS] + [len(tokens)]
    assert starts[0] == 0, f"{path.name} must start with BOS"
    return [tokens[a + 1:b] for a, b in itertools.pairwise(starts)]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A scratch repository with my/*.txt (13 generated files of several KB), after README's tokenize command."""
    repo = tmp_path_factory.mktemp("repo")
    (repo / "data").mkdir()
    for name in ("tokenize_text.py", "shard_format.py"):
        shutil.copy(ROOT / "data" / name, repo / "data" / name)
    shutil.copy(ROOT / "train_gpt.py", repo / "train_gpt.py")
    (repo / "data" / "gpt2").symlink_to(ROOT / "data" / "gpt2")
    (repo / "my").mkdir()
    texts = [licence_like_text(seed, n_words=900 + 100 * seed) for seed in range(N_FILES)]
    for i, text in enumerate(texts):
        (repo / "my" / f"licence{i:02d}.txt").write_text(text)
    result = run_shell(f"{TOKENIZE} {OFFLINE}", repo, timeout=120)
    return {"repo": repo, "texts": texts, "result": result}


def test_readme_shows_these_commands():
    readme = (ROOT / "README.md").read_text()
    for command in (TOKENIZE, TRAIN, f"add {OFFLINE}"):
        assert command in readme, f"README.md no longer shows {command!r}; update this test with it"


def test_readme_tokenize_command_writes_shards_and_prints_the_train_command(tokenized):
    result, mine = tokenized["result"], tokenized["repo"] / "data" / "mine"
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["text_train_000001.bin", "text_val_000000.bin"]
    val, train = (shard_documents(mine / f"text_{split}.bin") for split in ("val_000000", "train_000001"))
    encoding = tokenize_text.load_gpt2_encoding(ROOT / "data/gpt2/vocab.bpe",
                                                ROOT / "data/gpt2/encoder.json")
    assert [encoding.decode(d) for d in val + train] == tokenized["texts"], "one document per file, in order"
    val_tokens = sum(len(d) + 1 for d in val)
    assert len(val[0]) + 1 < TINY_VAL_TOKENS, \
        "negative control: one file is fewer tokens than the tiny preset validates on"
    assert val_tokens >= TINY_VAL_TOKENS > val_tokens - len(val[-1]) - 1, \
        f"the val split must be the fewest leading files holding {TINY_VAL_TOKENS} tokens"
    assert val_tokens + sum(len(d) + 1 for d in train) > 10_000, "the input must be tens of thousands of tokens"
    commands = [line for line in result.stdout.splitlines() if line.startswith("python ")]
    assert commands == [f"{TRAIN} --val_tokens={val_tokens // TINY_VAL_SEQ_LEN * TINY_VAL_SEQ_LEN}"], result.stdout
    assert "multiple of --val_seq_len" in result.stdout, result.stdout


def test_printed_train_command_runs_the_tiny_preset(tokenized):
    """The trainer step of README's path: the printed command, as printed (logs go to the copy's logs/)."""
    assert tokenized["result"].returncode == 0, tokenized["result"].stderr
    command = next(line for line in tokenized["result"].stdout.splitlines() if line.startswith("python "))
    result = run_shell(command, tokenized["repo"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = list((tokenized["repo"] / "logs").glob("*.txt"))
    assert len(logs) == 1 and "val_loss:" in logs[0].read_text(), "a run log with a validation loss"
