"""sample.py: text from a checkpoint through the trainer's own model and GPT-2's tokenizer (offline files)."""
import pytest
import torch
import train_gpt
from conftest import ROOT, load_script, one_torch_thread

sample = load_script("sample.py", "sample")
GPT2 = ROOT / "data/gpt2"
OFFLINE = ["--vocab-bpe", str(GPT2 / "vocab.bpe"), "--encoder-json", str(GPT2 / "encoder.json")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_corpus, tmp_path_factory):
    """The end of a short tiny run (small vocabulary: GPT-2's ids 0-255, its single bytes)."""
    log_dir = tmp_path_factory.mktemp("sample")
    args = ["--preset=tiny", *tiny_corpus["flags"], f"--log_dir={log_dir}", "--run_id=r", "--num_iterations=4",
            "--extension_steps=0", "--val_loss_every=0", "--save_checkpoint=true"]
    with one_torch_thread():
        assert train_gpt.main(args) == 0
    return log_dir / "r" / "step_4"


def test_sampling_scores_are_the_logits_the_loss_was_trained_on(checkpoint, tiny_corpus):
    """Cross-entropy of sample.logits on a validation chunk equals the trainer's own loss of that chunk."""
    model, hp, meta = sample.load_model(train_gpt, str(checkpoint), torch.device("cpu"))
    windows, scale = sample.attention_inputs(train_gpt, model, hp, meta["step"])
    tokens = torch.from_numpy(train_gpt.load_validation_tokens(hp)[:1000])
    scores = sample.logits(train_gpt, model, hp, tokens, windows, scale)
    ce = torch.nn.functional.cross_entropy(scores[:-1], tokens[1:], reduction="sum")
    targets = torch.cat([tokens[1:], torch.tensor([-100])])
    with torch.no_grad():
        cu, docs, max_len = train_gpt.document_bounds(tokens.numpy(), hp.bos_id)
        width = len(train_gpt.plan_step(0, hp, train_gpt.derive(hp, 1)).loss_weights)  # MTP and prefix slots
        next_token_only = torch.tensor([1.0] + [0.0] * (width - 1))
        loss = model(tokens, targets, torch.from_numpy(cu), train_gpt.attention_meta(docs, max_len, windows), scale,
                     next_token_only)
    torch.testing.assert_close(ce, loss, rtol=1e-5, atol=1e-4, msg=lambda m: f"sampling scores != training logits\n{m}")


def test_generation_prints_the_prompt_and_its_continuation(checkpoint, capsys):
    assert sample.main([str(checkpoint), "--prompt", "a", "--tokens", "4", *OFFLINE]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("a") and len(out) > 2, out
    assert err.startswith(f"# {checkpoint}: step 4/4, cpu"), err


def test_greedy_sampling_ignores_the_seed_and_drawing_repeats_with_it(checkpoint):
    model, hp, meta = sample.load_model(train_gpt, str(checkpoint), torch.device("cpu"))

    def ids(temperature, top_k, seed):
        return sample.generate(train_gpt, model, hp, meta["step"], [64], 6, temperature, top_k, seed)
    assert ids(0, 0, 0) == ids(0, 0, 1), "temperature 0 takes the likeliest token whatever the seed"
    drawn = [ids(2.0, 0, s) for s in (3, 3, 4)]
    assert drawn[0] == drawn[1], "same seed, same tokens"
    assert drawn[0] != drawn[2], "negative control: another seed draws other tokens"
    assert all(t < hp.tokenizer_vocab for t in drawn[0] + drawn[2]), "padding ids are never drawn"


def test_top_k_restricts_the_draw_to_the_likeliest_tokens():
    scores = torch.tensor([0.0, 5.0, 4.0, -1.0])
    draws = {sample.next_token(scores, 10.0, 2, torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {1, 2}, f"top_k=2 at a high temperature draws only ids 1 and 2, got {draws}"
    assert sample.next_token(scores, 0.0, 0, torch.Generator()) == 1


@pytest.mark.parametrize("case", ["prompt outside the vocabulary", "no checkpoint"])
def test_unusable_input_is_one_error_line(checkpoint, tmp_path, capsys, case):
    path, prompt = (checkpoint, "Hello") if case.startswith("prompt") else (tmp_path / "none", "a")
    assert sample.main([str(path), "--prompt", prompt, *OFFLINE]) == 2
    err = capsys.readouterr().err
    expected = "not below the model's --tokenizer_vocab=256" if case.startswith("prompt") else "no such checkpoint"
    assert err.startswith("error: ") and expected in err and "Traceback" not in err, err
