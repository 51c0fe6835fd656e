"""``python -m minifusion.generate`` and ``python -m minifusion.evaluate`` on tiny saved models:
what they print, that they agree with the library calls they wrap, and their error messages."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from minifusion import evaluate, generate
from minifusion.data import TokenFile, prepare_data
from minifusion.model import MiniFusionForCausalLM
from minifusion.tokenizer import load_tokenizer

from .conftest import library_progress_bar_on, write_words_corpus
from .test_model import small_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A prepared corpus (tokenizer + token files) and two model folders saved with it: ours
    and a transformers Llama (a "foreign" model for the commands)."""
    root = tmp_path_factory.mktemp("cli")
    corpus = write_words_corpus(root / "corpus", documents=6, words=300)
    data = prepare_data(root / "data", source=str(corpus / "*.txt"), vocab_size=300,
                        val_fraction=0.34, progress=False)  # fmt: skip
    tokenizer = load_tokenizer(data.tokenizer_dir)
    torch.manual_seed(0)
    ours = MiniFusionForCausalLM(small_config(vocab_size=len(tokenizer), initializer_range=0.3))
    ours.save_pretrained(root / "ours")
    tokenizer.save_pretrained(root / "ours")
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128)
    )  # fmt: skip
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return {"root": root, "corpus": corpus, "data": data, "tokenizer": tokenizer, "model": ours}


def test_generate_greedy_equals_the_library_call(saved, capsys):
    folder = saved["root"] / "ours"
    with library_progress_bar_on():
        assert generate.main(["--model", str(folder), "--prompt", "the", "--greedy",
                              "--max-new-tokens", "12", "--no-stream", "--device", "cpu",
                              "--no-progress"]) == 0  # fmt: skip
    printed, err = capsys.readouterr()
    printed = printed.strip()
    assert "Loading weights" not in err  # transformers' own bar obeys --no-progress
    tokenizer, model = saved["tokenizer"], saved["model"].eval()
    ids = tokenizer("the", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert printed == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert printed.startswith("the")


def test_generate_streams_and_batches_and_is_seeded(saved, capsys, tmp_path):
    folder = str(saved["root"] / "ours")
    common = ["--model", folder, "--max-new-tokens", "8", "--device", "cpu"]
    assert generate.main([*common, "--prompt", "the", "--seed", "3"]) == 0
    streamed = capsys.readouterr().out.strip()
    assert generate.main([*common, "--prompt", "the", "--seed", "3", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip() == streamed  # the same text, streamed or not
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the\n\nand a\n", encoding="utf-8")  # the blank line is skipped
    assert generate.main([*common, "--prompt-file", str(prompts)]) == 0
    out = capsys.readouterr().out
    assert "--- 1/2" in out and "--- 2/2" in out and "\nand a" in out


@pytest.mark.parametrize(
    ("folder", "message"),
    [
        ("missing", "does not exist"),
        ("run", "Did you mean"),
        ("no_tokenizer", "no tokenizer"),
    ],
)
def test_generate_explains_a_folder_it_cannot_use(saved, capsys, tmp_path, folder, message):
    path = tmp_path / folder
    if folder == "run":  # a run folder: the model is in its model/ subfolder
        saved["model"].save_pretrained(path / "model")
    if folder == "no_tokenizer":
        saved["model"].save_pretrained(path)
    with pytest.raises(SystemExit) as stop:
        generate.main(["--model", str(path), "--prompt", "the"])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bogus", "'bogus' is not a device: use auto, cpu, cuda, cuda:N or mps."),
        pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="this machine has CUDA")),
    ],
)
def test_both_commands_name_a_device_they_cannot_use(saved, capsys, device, message):
    for command, extra in ((generate.main, ["--prompt", "the"]), (evaluate.main, ["--data",
                           str(saved["corpus"] / "*.txt")])):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            command(["--model", str(saved["root"] / "ours"), "--device", device, *extra])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="--greedy"):
        generate.SamplingSettings(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        generate.SamplingSettings(top_p=1.5)
    assert (
        generate.SamplingSettings(temperature=0, greedy=True).generate_kwargs()["do_sample"]
        is False
    )


def test_score_stream_equals_a_by_hand_loss(saved):
    tokenizer, model = saved["tokenizer"], saved["model"].eval()
    texts = ["the cat sat on the mat", "a second short text"]
    ids, characters = evaluate.document_stream(tokenizer, texts)
    # by hand: documents and end-of-text tokens in one sequence, every token after the first
    # predicted from all before it (the stream is shorter than one block)
    assert characters == sum(len(t) + 1 for t in texts)
    assert ids.count(tokenizer.eos_token_id) == 2 and ids[-1] == tokenizer.eos_token_id
    stream = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=stream[:, :-1]).logits
    nats = F.cross_entropy(logits[0].float(), stream[0, 1:], reduction="sum").item()
    score = evaluate.score_stream(model, ids, characters, block_size=64, progress=False)
    assert score.tokens == len(ids) - 1
    assert score.nats == pytest.approx(nats, rel=1e-5)
    assert score.bpc == pytest.approx(nats / math.log(2) / characters, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-5)
    # short blocks: still every token after the first exactly once (blocks overlap by one)
    blocked = evaluate.score_stream(model, ids, characters, block_size=3, batch_size=2,
                                    progress=False)  # fmt: skip
    assert blocked.tokens == len(ids) - 1 and blocked.nats > 0


def test_a_preset_style_config_evaluates_the_documents_training_held_out(saved, tmp_path):
    config = tmp_path / "local.yaml"
    config.write_text(
        f"model: {{}}\ndata:\n  source: '{saved['corpus']}/*.txt'\n  val_fraction: 0.34\n"
    )
    texts, description = evaluate.evaluation_documents(str(config))
    # independent of the split code: the validation token file prepare_data wrote for training
    val = TokenFile(saved["data"].val_file)
    expected = saved["tokenizer"].decode(val.tokens.tolist())
    eos = saved["tokenizer"].eos_token
    assert expected == "".join(t + eos for t in texts)
    assert "held-out documents" in description and len(texts) == 2


@pytest.mark.parametrize("model_folder", ["ours", "llama"])
def test_evaluate_prints_loss_perplexity_and_bpc(saved, capsys, tmp_path, model_folder):
    folder = saved["root"] / model_folder
    with library_progress_bar_on():
        assert evaluate.main(["--model", str(folder), "--data", str(saved["corpus"] / "*.txt"),
                              "--block-size", "32", "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert "Loading weights" not in err  # transformers' own bar obeys --no-progress too
    assert "6 document(s)" in out
    bpc = float(out.split("bpc")[1].split()[0])
    loss = float(out.split("loss")[1].split()[0])
    assert bpc > 0 and loss > 0
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(folder), "--data", str(saved["corpus"] / "*.txt"),
                       "--block-size", "4096"])  # fmt: skip
    assert "exceeds the model's 128 positions" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before the model is loaded or a block scored
        evaluate.main(["--model", str(tmp_path / "none"), "--data", "none", "--max-blocks", "0"])
    assert "--max-blocks must be at least 1, not 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # checked before the scoring, not after
        evaluate.main(["--model", str(tmp_path / "none"), "--data", "none", "--per-position",
                       str(tmp_path)])  # fmt: skip
    assert "is a folder; give a CSV file to write" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a corpus folder rather than its files: the fix is named
        evaluate.main(["--model", str(folder), "--data", str(saved["corpus"])])
    assert f"give the files in it, e.g. '{saved['corpus']}/*.txt'" in capsys.readouterr().err


def test_evaluate_names_its_own_flag_for_text_that_is_not_utf8(saved, capsys, tmp_path):
    """A file with a Latin-1 byte: refused with evaluate's flag as the fix (the training
    commands' --set does not exist here), then scored with it."""
    text = tmp_path / "latin1.txt"
    text.write_bytes("the caf\xe9 and the river\n".encode("latin-1") * 20)
    command = ["--model", str(saved["root"] / "ours"), "--data", str(text), "--block-size", "16",
               "--no-progress", "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit):
        evaluate.main(command)
    err = capsys.readouterr().err
    assert f"{text}, line 1: bytes b'\\xe9' are not valid UTF-8" in err
    assert "--encoding-errors replace" in err and "--set" not in err
    assert evaluate.main([*command, "--encoding-errors", "replace"]) == 0
    assert "1 document(s)" in capsys.readouterr().out


def test_evaluate_per_position_writes_the_loss_at_every_position(saved, capsys, tmp_path):
    """The CSV's mean over positions equals the loss the command prints (same blocks: the stream
    splits into whole blocks plus a remainder, and only whole blocks enter the CSV)."""
    folder, out = saved["root"] / "ours", tmp_path / "positions.csv"
    assert evaluate.main(["--model", str(folder), "--data", str(saved["corpus"] / "*.txt"),
                          "--block-size", "16", "--max-blocks", "5", "--no-progress",
                          "--device", "cpu", "--per-position", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    rows = out.read_text().splitlines()
    assert rows[0] == "position,loss_nats" and len(rows) == 17
    losses = [float(row.split(",")[1]) for row in rows[1:]]
    loss = float(printed.split("loss ")[1].split()[0])  # 5 whole blocks of 16: the same tokens
    assert sum(losses) / len(losses) == pytest.approx(loss, abs=1e-4)
    assert "positions      0-1" in printed and "positions     14-15" in printed
