"""Shared test fixtures: tiny shard files in the FineWeb format, made in the test (no downloads)."""
import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BOS = 50256
# End-to-end CPU runs use a small vocabulary: with GPT-2's 50,304-wide embedding and head, the tiny model's
# time goes almost all into them. Shards of synthetic_tokens(..., bos=SMALL_BOS) hold ids below SMALL_VOCAB.
SMALL_VOCAB, SMALL_BOS = 256, 255
# Its "tokenizer" for the prefix-token loss: ids 0-15 one byte (a-p), 16-143 two, 144-254 three (each the
# two-byte token's text and one of x, y, z), 255 <|endoftext|>; each longer token's prefix is a token.
SMALL_VOCAB_ENCODER = ROOT / "tests/data/small_vocab_encoder.json"
SMALL_VOCAB_FLAGS = [f"--vocab_size={SMALL_VOCAB}", f"--tokenizer_vocab={SMALL_VOCAB}", f"--bos_id={SMALL_BOS}",
                     f"--prefix_vocab={SMALL_VOCAB_ENCODER}"]
SHARD_MAGIC = 20240520
SHARD_VERSION = 1

# The trainer modules the shared tests run against (each is a standalone single file).
TRAINER_MODULES = [name for name in ("train_gpt", "train_gpt_medium") if (ROOT / f"{name}.py").exists()]
# Code the two files share line for line (tests/test_tracks.py checks it) is tested through train_gpt.py
# alone: kernels, orthogonalization, optimizers, model, loader, the distributed and determinism runs.
SHARED_CODE_MODULES = TRAINER_MODULES[:1]
# Marks a test, or as `pytestmark` a whole test module, of that shared code: train_gpt.py only.
shared_code_only = pytest.mark.parametrize("trainer", SHARED_CODE_MODULES, indirect=True)


def fix_triton_interpreter_index(monkeypatch=None):
    """triton <= 3.6's interpreter turns 1-element arrays into ints with int(), which numpy >= 2.4
    rejects (triton-lang/triton#9171, fixed upstream by #9172): any `range(0, K, BLOCK)` in a kernel fails
    with "only 0-dimensional arrays can be converted to Python scalars". Wraps the interpreter's tensor
    patch so __index__ takes the element explicitly (harmless where it is not needed); through
    `monkeypatch` when given, else for the rest of the process."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    (monkeypatch.setattr if monkeypatch else setattr)(interpreter, "_patch_lang_tensor", patched)


# What run_interpreted puts before a script: the repository and tests/ on the path, the interpreter mended.
class KernelLaunches(list):
    """The launches of a module's Triton kernels, as (kernel name, grid) in order. watch(module, *names) wraps each
    named kernel so that a launch is recorded and then runs: an interpreted-kernel test checks with it that the
    kernel, not a torch fallback, computed what it compares (else it would compare torch with itself)."""

    def watch(self, module, *names):
        for name in names:
            setattr(module, name, _RecordedKernel(self, name, getattr(module, name)))
        return self


class _RecordedKernel:
    def __init__(self, record, name, kernel):
        self.record, self.name, self.kernel = record, name, kernel

    def __getitem__(self, grid):
        self.record.append((self.name, grid))
        return self.kernel[grid]


_INTERPRETER_PRELUDE = """
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
from conftest import fix_triton_interpreter_index
fix_triton_interpreter_index()
"""


def run_interpreted(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `script` in a new Python process whose Triton kernels run in the interpreter: TRITON_INTERPRET=1
    must be set before anything imports triton, which this pytest process may already have done."""
    return subprocess.run([sys.executable, "-c", _INTERPRETER_PRELUDE + script, str(ROOT)],
                          env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=timeout)


def write_shard(path, tokens, magic=SHARD_MAGIC, version=SHARD_VERSION, header_count=None):
    """Write `tokens` as a FineWeb shard: 256 little-endian int32 header, then uint16 tokens."""
    tokens = np.asarray(tokens)
    header = np.zeros(256, dtype="<i4")
    header[0], header[1] = magic, version
    header[2] = len(tokens) if header_count is None else header_count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    return Path(path)


def synthetic_tokens(n_tokens, seed, alphabet=96, bos=BOS):
    """A learnable token stream: `bos`-prefixed documents drawn from a fixed random bigram chain over
    the ids 100 .. 100 + alphabet - 1."""
    rng = np.random.default_rng(seed)
    chain = np.random.default_rng(1234).integers(0, alphabet, size=(alphabet, 4))  # same chain for every split
    out = np.empty(n_tokens, dtype=np.int64)
    i = 0
    while i < n_tokens:
        doc_len = int(rng.integers(16, 300))
        out[i] = bos
        tok = int(rng.integers(0, alphabet))
        for j in range(i + 1, min(i + doc_len, n_tokens)):
            tok = int(chain[tok, rng.integers(0, 4)])
            out[j] = tok + 100  # keep away from special ids
        i += doc_len
    return out


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside: the same kernels and float results run to run (end-to-end CPU runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """one_torch_thread for a whole test (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Train and val shards for CPU runs in the small vocabulary: 400k train tokens in two shards, 32k val
    tokens. "flags" are the trainer flags that point a run at them (files and vocabulary)."""
    d = tmp_path_factory.mktemp("corpus")
    write_shard(d / "tiny_train_000001.bin", synthetic_tokens(200_000, seed=1, bos=SMALL_BOS))
    write_shard(d / "tiny_train_000002.bin", synthetic_tokens(200_000, seed=2, bos=SMALL_BOS))
    write_shard(d / "tiny_val_000000.bin", synthetic_tokens(32_768, seed=3, bos=SMALL_BOS))
    train, val = str(d / "tiny_train_*.bin"), str(d / "tiny_val_*.bin")
    return {"dir": d, "train": train, "val": val,
            "flags": [f"--train_files={train}", f"--val_files={val}", *SMALL_VOCAB_FLAGS]}


def load_script(relative_path: str, name: str):
    """The repository's script at `relative_path` (records/, benchmarks/: folders of scripts, not
    packages) as module `name`, loaded once per session and registered in sys.modules (dataclasses
    look their module up there)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(params=TRAINER_MODULES)
def trainer(request):
    """Each trainer module in turn, so one test specifies both tracks."""
    return importlib.import_module(request.param)


# One gloo rank of `run_gloo_ranks`: calls tests/<module>.<function>(rank, world_size, *args) inside an
# initialized process group and saves what it returns.
_GLOO_WORKER = r"""
import datetime, gc, importlib, sys
import torch, torch.distributed as dist
root, tests, target, rank, world_size, store, out, *args = sys.argv[1:]
rank, world_size = int(rank), int(world_size)
sys.path[:0] = [root, tests]
torch.set_num_threads(1)
module, function = target.split(":")
work = getattr(importlib.import_module(module), function)
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world_size,
                        timeout=datetime.timedelta(seconds=60))
result = work(rank, world_size, *args)
gc.collect()  # as the trainer does: collective tensors freed during interpreter exit can abort the process
dist.destroy_process_group()
torch.save(result, out)
"""


def run_gloo_ranks(target: str, world_size: int, tmp_path, *args: str, timeout: float = 180) -> list:
    """Run `target` ("test_module:function") on `world_size` gloo ranks, one process each; returns
    each rank's result. A rank that fails or hangs fails the test with its output."""
    procs, logs = [], []
    for rank in range(world_size):
        log = open(tmp_path / f"rank{rank}.log", "w")
        argv = [str(ROOT), str(ROOT / "tests"), target, str(rank), str(world_size), str(tmp_path / "store"),
                str(tmp_path / f"rank{rank}.pt"), *args]
        procs.append(subprocess.Popen([sys.executable, "-c", _GLOO_WORKER, *argv], cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        logs.append(log)
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        report = "\n".join(f"--- rank {r} (exit {code}):\n{(tmp_path / f'rank{r}.log').read_text()[-3000:]}"
                           for r, code in failed)
        pytest.fail(f"gloo workers of {target} failed on {world_size} ranks:\n{report}")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
