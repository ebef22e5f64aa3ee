"""The trainer's data path: shard validation, BOS-aligned batches, world-size-independent streams."""

import numpy as np
import pytest
import torch
from conftest import BOS, shared_code_only, synthetic_tokens, write_shard


# Code train_gpt_medium.py shares line for line (tests/test_tracks.py): tested through train_gpt.py.
pytestmark = shared_code_only


@pytest.fixture
def shard_dir(tmp_path):
    write_shard(tmp_path / "t_train_000001.bin", synthetic_tokens(20_000, seed=11))
    write_shard(tmp_path / "t_train_000002.bin", synthetic_tokens(20_000, seed=12))
    return tmp_path


@pytest.mark.parametrize("corruption, words", [
    (dict(magic=12345), ["bad magic 12345"]),
    (dict(version=2), ["unsupported version 2"]),
    (dict(header_count=999), ["size mismatch", "999 tokens"]),
])
def test_corrupt_header_fails_fast_naming_file_and_fault(trainer, tmp_path, corruption, words):
    path = write_shard(tmp_path / "bad.bin", np.arange(100), **corruption)
    with pytest.raises(trainer.DataError) as err:
        trainer.read_shard(str(path), 50257)
    for w in [str(path)] + words:
        assert w in str(err.value)


def test_truncated_file_and_out_of_vocab_tokens_are_rejected(trainer, tmp_path):
    path = write_shard(tmp_path / "short.bin", np.arange(100))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(trainer.DataError, match="truncated header"):
        trainer.read_shard(str(path), 50257)
    path = write_shard(tmp_path / "vocab.bin", np.array([1, 2, 50303, 60000]))
    with pytest.raises(trainer.DataError, match="token id 60000 is not below --tokenizer_vocab=50257"):
        trainer.read_shard(str(path), 50257)


def test_padding_ids_between_the_tokenizer_and_the_padded_vocabulary_are_rejected(trainer, tmp_path):
    """Ids 50257..50303 fit the model's padded 50,304 rows but are no GPT-2 token: such a shard is corrupt,
    and must not train. The check uses the tokenizer's vocabulary; 50256 (BOS) is the largest valid id."""
    hp = trainer.parse_args([])
    assert (hp.tokenizer_vocab, hp.vocab_size) == (50257, 50304)
    path = write_shard(tmp_path / "padding.bin", np.array([BOS, 5, 50257]))
    with pytest.raises(trainer.DataError, match="token id 50257 is not below --tokenizer_vocab=50257"):
        trainer.read_shard(str(path), hp.tokenizer_vocab)
    ok = write_shard(tmp_path / "ok.bin", np.array([BOS, 5, 50256]))
    assert list(trainer.read_shard(str(ok), hp.tokenizer_vocab)) == [BOS, 5, 50256], "negative control"


def test_missing_files_name_the_flag_and_the_download_command(trainer, tmp_path):
    with pytest.raises(trainer.DataError) as err:
        trainer.TrainStream(str(tmp_path / "none_*.bin"), 64, vocab=50257, bos_id=BOS, cycle=False)
    assert "--train_files" in str(err.value) and "cached_fineweb10B.py" in str(err.value)


def test_micro_batches_start_at_bos_and_cross_shards(trainer, shard_dir):
    stream = trainer.TrainStream(str(shard_dir / "t_train_*.bin"), 512, vocab=50257, bos_id=BOS, cycle=False)
    batches = [stream.next_micro_batch() for _ in range(60)]
    assert all(b[0] == BOS and len(b) == 513 for b in batches)
    assert stream.file_index == 1, "60 batches of 512 tokens need the second shard"


def _rank_batches(trainer, hp, rank, world_size, rows, specs):
    """This rank's first `rows` micro-batches, each round of world_size rows shaped by the next (length, clip)."""
    loader = trainer.DistributedTrainLoader(hp, rank, world_size, torch.device("cpu"), specs)
    return [loader.next_batch()[0] for _ in range(rows)]


def test_each_micro_batch_comes_with_the_document_bounds_of_its_inputs(trainer, shard_dir):
    hp = trainer.parse_args(["--preset=tiny", f"--train_files={shard_dir}/t_train_*.bin", "--stage_seq_len=512,512,512"])
    loader = trainer.DistributedTrainLoader(hp, 0, 1, torch.device("cpu"), [(512, 0), (256, 100), (512, 0)])
    for k in range(3):
        inputs, targets, cu, (docs, max_len) = loader.next_batch()
        want_cu, want_docs, want_max = trainer.document_bounds(inputs.numpy(), BOS)
        assert torch.equal(cu, torch.from_numpy(want_cu)) and (docs, max_len) == (want_docs, want_max)
        assert len(inputs) == len(cu) - 1 == (256 if k == 1 else 512), "each row has its own length"
        assert docs > 1, "negative control: rows of these shards hold several documents"


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("clip, tails", [(0, "drop"), (100, "drop"), (100, "split")])
def test_token_stream_is_the_same_for_any_world_size(trainer, shard_dir, world_size, clip, tails):
    """Rank r's k-th micro-batch is global micro-batch k*W + r, so the union over ranks of each
    step's micro-batches is the single-process step's micro-batches, whole, clipped or split documents
    alike, and across a change of row length (a new stage)."""
    hp = trainer.parse_args(["--preset=tiny", f"--train_files={shard_dir}/t_train_*.bin", f"--doc_tails={tails}"])
    lengths = [256] * 12 + [512] * 12
    single = _rank_batches(trainer, hp, 0, 1, 24, [(n, clip) for n in lengths])
    per_rank = [_rank_batches(trainer, hp, r, world_size, 24 // world_size,
                              [(n, clip) for n in lengths[::world_size]]) for r in range(world_size)]
    for k in range(24 // world_size):
        for r in range(world_size):
            assert torch.equal(per_rank[r][k], single[k * world_size + r])


def test_running_out_of_data_is_an_error_unless_cycling(trainer, shard_dir):
    pattern = str(shard_dir / "t_train_*.bin")
    stream = trainer.TrainStream(pattern, 4096, vocab=50257, bos_id=BOS, cycle=False)
    with pytest.raises(trainer.DataError) as err:
        for _ in range(20):
            stream.next_micro_batch()
    assert pattern in str(err.value) and "--cycle_train_data=true" in str(err.value)
    cycling = trainer.TrainStream(pattern, 4096, vocab=50257, bos_id=BOS, cycle=True)
    first = cycling.next_micro_batch().copy()
    seen = [cycling.next_micro_batch() for _ in range(20)]
    assert any(np.array_equal(first, b) for b in seen), "cycling restarts from the first shard"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_scores_exactly_the_first_val_tokens(trainer, tmp_path, world_size):
    tokens = synthetic_tokens(10_000, seed=5)
    write_shard(tmp_path / "v_val_000000.bin", tokens)
    hp = trainer.parse_args(["--preset=tiny", f"--val_files={tmp_path}/v_val_*.bin", "--val_tokens=6144",
                             "--val_seq_len=1024"])
    seen_inputs, seen_targets = [], []
    for r in range(world_size):
        stream = trainer.load_validation_tokens(hp)
        for inputs, targets, cu, (docs, max_len) in trainer.validation_chunks(stream, hp, r, world_size,
                                                                              torch.device("cpu")):
            want_cu, want_docs, want_max = trainer.document_bounds(inputs.numpy(), hp.bos_id)
            assert torch.equal(cu, torch.from_numpy(want_cu)) and (docs, max_len) == (want_docs, want_max), \
                "a validation chunk's document bounds must be those of its inputs"
            seen_inputs.append(inputs)
            seen_targets.append(targets[targets != -100])
    assert sum(t.numel() for t in seen_targets) == 6144 - 1, "val_tokens - 1 predictions within val_tokens"
    all_inputs = torch.sort(torch.cat(seen_inputs)).values
    assert torch.equal(all_inputs, torch.sort(torch.from_numpy(tokens[:6144].astype(np.int64))).values)


def test_too_little_validation_data_is_an_error(trainer, tmp_path):
    write_shard(tmp_path / "v_val_000000.bin", synthetic_tokens(3000, seed=5))
    hp = trainer.parse_args(["--preset=tiny", f"--val_files={tmp_path}/v_val_*.bin", "--val_tokens=4096"])
    with pytest.raises(trainer.DataError, match="hold 3,000 tokens"):
        trainer.load_validation_tokens(hp)


def _one_document_shard(path, length, bos=BOS):
    tokens = np.full(length, 7, dtype=np.int64)
    tokens[0] = bos
    return write_shard(path, tokens)


def test_a_document_longer_than_a_row_is_used_whole_in_row_sized_pieces(trainer, tmp_path):
    """One 10,000-token document, 256-token rows: each row continues where the last ended, so a pass uses
    all but the final partial row (BOS-aligned starts alone would use one row and skip the rest)."""
    _one_document_shard(tmp_path / "long_train_000001.bin", 10_000)
    stream = trainer.TrainStream(str(tmp_path / "long_train_*.bin"), 256, vocab=50257, bos_id=BOS, cycle=False)
    rows = []
    with pytest.raises(trainer.DataError, match="training data exhausted"):
        while True:
            rows.append(stream.next_micro_batch().copy())
    assert len(rows) == (10_000 - 1) // 256, f"{len(rows)} rows of 256 from a 10,000-token document"
    bos = np.flatnonzero(np.fromfile(tmp_path / "long_train_000001.bin", dtype="<u2", offset=1024) == BOS)
    assert trainer.rows_in_shard(bos, 10_000, 256) == len(rows), "the shard's reported yield is what it yields"


def test_a_short_tail_of_a_cut_document_is_skipped_so_rows_start_at_bos(trainer, tmp_path):
    """Documents shorter than a row keep the speedrun's BOS-aligned rows: a row that cuts a document
    leaves its tail (under a row long) and the next row starts at the next BOS."""
    docs = [300, 200, 400, 150, 500]
    tokens = np.concatenate([np.r_[BOS, np.full(n - 1, 9)] for n in docs])
    write_shard(tmp_path / "s_train_000001.bin", tokens)
    stream = trainer.TrainStream(str(tmp_path / "s_train_*.bin"), 256, vocab=50257, bos_id=BOS, cycle=False)
    starts = np.cumsum([0] + docs[:-1])
    first, second = stream.next_micro_batch(), stream.next_micro_batch()
    assert first[0] == BOS and second[0] == BOS
    assert np.array_equal(second, tokens[starts[1]:starts[1] + 257]), "row 2 starts at document 2, not at 256"


def test_exhausted_data_names_the_fixes(trainer, tmp_path):
    _one_document_shard(tmp_path / "x_train_000001.bin", 600)
    stream = trainer.TrainStream(str(tmp_path / "x_train_*.bin"), 256, vocab=50257, bos_id=BOS, cycle=False)
    with pytest.raises(trainer.DataError) as err:
        for _ in range(5):
            stream.next_micro_batch()
    for fix in ("--num_iterations", "--cycle_train_data=true"):
        assert fix in str(err.value), err.value


def test_clipped_rows_pack_document_prefixes_and_start_each_at_bos(trainer, tmp_path):
    """With a document clip, a row is consecutive documents each cut to at most `clip` tokens (the rest of a
    document is dropped), the last cut to fill the row; the next row starts at the next document."""
    docs = [50, 300, 20, 400, 90, 150, 150]
    tokens = np.concatenate([np.r_[BOS, np.full(n - 1, 10 + i)] for i, n in enumerate(docs)])
    write_shard(tmp_path / "c_train_000001.bin", tokens)
    stream = trainer.TrainStream(str(tmp_path / "c_train_*.bin"), 200, vocab=50257, bos_id=BOS, cycle=False)
    row = stream.next_micro_batch(doc_clip=100)
    expected = np.r_[BOS, np.full(49, 10), BOS, np.full(99, 11), BOS, np.full(19, 12), BOS, np.full(30, 13)]
    assert np.array_equal(row, expected), "documents 0-3 cut to 100 tokens, the fourth cut to fill 201"
    second = stream.next_micro_batch(doc_clip=100)
    assert second[0] == BOS and second[1] == 14, "the next row starts at the next document, not inside the cut one"


def _position_coded_documents(lengths):
    """A shard whose documents have the given lengths and whose every other token is distinct (its
    position, BOS excepted), so a row says exactly which tokens of the shard it holds."""
    tokens = np.arange(sum(lengths)) % 50000 + 1
    tokens[np.cumsum([0] + lengths[:-1])] = BOS
    return tokens


def test_split_tails_put_the_rest_of_a_clipped_document_in_pieces_after_an_inserted_bos(trainer, tmp_path):
    """--doc_tails=split: what the clip cuts off a document is not dropped: it follows in pieces of a BOS and
    clip - 1 tokens, and a row that ends inside a piece is continued by the next row, after a BOS."""
    tokens = _position_coded_documents([50, 300, 20, 100])
    write_shard(tmp_path / "p_train_000001.bin", tokens)
    stream = trainer.TrainStream(str(tmp_path / "p_train_*.bin"), 200, vocab=50257, bos_id=BOS, cycle=False,
                                 split_tails=True)
    first, second = stream.next_micro_batch(doc_clip=100), stream.next_micro_batch(doc_clip=100)
    doc1 = tokens[50:350]
    assert np.array_equal(first, np.r_[tokens[:50], doc1[:100], BOS, doc1[100:150]]), \
        "document 0 whole, document 1's first 100 tokens, then a BOS and its next 50 to fill 201"
    assert np.array_equal(second[:154], np.r_[BOS, doc1[150:249], BOS, doc1[249:300], tokens[350:352]]), \
        "the next row goes on inside document 1, each piece a BOS and at most 99 of its tokens"


@pytest.mark.parametrize("tails", ["split", "drop"])
def test_split_tails_train_on_every_token_once_and_drop_nothing(trainer, tmp_path, tails):
    """One pass over a shard with --doc_tails=split serves its tokens in order, each once, in documents of at
    most the clip; the public's clipping (drop, the negative control) skips the tails."""
    lengths = [50, 300, 20, 400, 90, 1000, 150, 7, 260, 130] * 3
    tokens = _position_coded_documents(lengths)
    write_shard(tmp_path / "q_train_000001.bin", tokens)
    stream = trainer.TrainStream(str(tmp_path / "q_train_*.bin"), 128, vocab=50257, bos_id=BOS, cycle=False,
                                 split_tails=tails == "split")
    rows = []
    with pytest.raises(trainer.DataError, match="exhausted"):
        while True:
            rows.append(stream.next_micro_batch(doc_clip=100).copy())
    for row in rows:
        _, _, longest = trainer.document_bounds(row[:-1], BOS)
        assert longest <= 100, f"a document of {longest} tokens in a row clipped at 100"
    served = np.concatenate(rows)
    served, original = served[served != BOS], tokens[tokens != BOS]
    contiguous = np.array_equal(served, original[:len(served)])
    if tails == "split":
        assert contiguous, "split rows hold the shard's tokens in order, none skipped or repeated"
        assert len(original) - len(served) < 128, "all but the last partial row of the shard is used"
    else:
        assert not contiguous and len(original) - len(served) > 1000, "drop skips the tails past the clip"


def test_doc_tails_takes_drop_or_split(trainer):
    with pytest.raises(trainer.ConfigError, match="--doc_tails='keep'"):
        trainer.parse_recipe(trainer.parse_args(["--preset=tiny", "--doc_tails=keep"]))


def test_staging_ring_hands_out_batches_that_outlive_its_buffers(trainer):
    """Rows go to the device through a few reused host buffers (StagingRing): every batch handed out keeps its
    values after its buffer is rewritten, tokens come out int64 whatever the row's dtype, and a row longer
    than the buffers gets a larger one."""
    ring = trainer.StagingRing(2, 64, torch.device("cpu"))
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50257, size=int(n), dtype=np.uint16) for n in rng.integers(1, 65, size=7)]
    bounds = [np.arange(len(r), dtype=np.int32) for r in rows]
    out = [ring.upload(r, c) for r, c in zip(rows, bounds)]
    for (tokens, cu), row, c in zip(out, rows, bounds):
        assert tokens.dtype == torch.int64 and cu.dtype == torch.int32
        assert torch.equal(tokens, torch.from_numpy(row.astype(np.int64))) and torch.equal(cu, torch.from_numpy(c))
    long_row = np.arange(100, dtype=np.uint16)
    tokens, cu = ring.upload(long_row, np.arange(101, dtype=np.int32))
    assert torch.equal(tokens, torch.arange(100)) and torch.equal(cu, torch.arange(101, dtype=torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_staging_ring_rewrites_a_buffer_only_after_its_copy_ran_on_a_gpu(trainer):
    """With one pinned buffer and the GPU held up by a long kernel, each copy is still queued when the next row
    is written: the ring must wait for it (its event), or the earlier batches arrive with later rows' tokens."""
    ring = trainer.StagingRing(1, 4096, torch.device("cuda"))
    torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time, so the copies queue behind it
    rows = [np.full(4096, k, dtype=np.uint16) for k in range(4)]
    out = [ring.upload(r, np.zeros(4096, dtype=np.int32)) for r in rows]
    torch.cuda.synchronize()
    got = [int(t.unique().item()) if t.unique().numel() == 1 else -1 for t, _ in out]
    assert got == [0, 1, 2, 3], f"batches hold rows {got}: a buffer was rewritten before its copy ran"


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_micro_batch_of_joined_rows_holds_its_rows_one_after_another(trainer, shard_dir, world_size):
    """A (length, clip, rows joined) spec (the schedule's, with --micro_batch_tokens) gives each rank the rows it
    would get one per micro-batch, in order: inputs and targets concatenated (each row's targets its own, not
    the next row's first token), the documents of both, one starting at each row."""
    hp = trainer.parse_args(["--preset=tiny", f"--train_files={shard_dir}/t_train_*.bin"])
    for rank in range(world_size):
        one_each = trainer.DistributedTrainLoader(hp, rank, world_size, torch.device("cpu"), [(256, 100)] * 4)
        joined = trainer.DistributedTrainLoader(hp, rank, world_size, torch.device("cpu"), [(256, 100, 2)] * 2)
        alone = [one_each.next_batch() for _ in range(4)]
        for a, b in zip(alone[::2], alone[1::2]):
            inputs, targets, cu, (docs, max_len) = joined.next_batch()
            assert torch.equal(inputs, torch.cat([a[0], b[0]])) and torch.equal(targets, torch.cat([a[1], b[1]]))
            (docs_a, max_a), (docs_b, max_b) = a[3], b[3]
            assert (docs, max_len) == (docs_a + docs_b, max(max_a, max_b))
            assert torch.equal(cu[:docs], torch.cat([a[2][:docs_a], b[2][:docs_b] + 256])) and (cu[docs:] == 512).all()


def test_staging_buffers_are_sized_for_the_schedules_largest_pass(trainer, shard_dir):
    """However large --micro_batch_tokens is, a pass joins at most a rank's rows of one step: the pinned buffers
    hold the schedule's largest joined pass (the tiny preset: 4 rows of 256 + 1 tokens), not the flag's value."""
    for flag, largest in (("0", 513), ("4096", 4 * 257), ("1000000000", 4 * 257)):
        hp = trainer.parse_args(["--preset=tiny", f"--train_files={shard_dir}/t_train_*.bin",
                                 f"--micro_batch_tokens={flag}"])
        loader = trainer.DistributedTrainLoader(hp, 0, 1, torch.device("cpu"), [(256, 0)])
        assert [len(t) for t in loader.ring.tokens] == [largest] * 4, flag
