"""``python -m bench.long_context --quick``: both checks run end to end on tiny sizes."""

import torch

from bench import long_context
from minifusion.data import prepare_data
from minifusion.model import MiniFusionForCausalLM
from minifusion.tokenizer import load_tokenizer

from .conftest import write_words_corpus
from .test_model import small_config


def test_the_quick_run_scores_every_model_at_every_length_and_reads_a_saved_model(
    tmp_path, monkeypatch
):
    # a saved model and its training settings, as `make train` leaves them in runs/<preset>/
    run = tmp_path / "run"
    torch.manual_seed(0)
    corpus = write_words_corpus(tmp_path / "corpus", documents=4, words=200)
    data = prepare_data(tmp_path / "data", source=str(corpus / "*.txt"), vocab_size=300,
                        val_fraction=0.5, progress=False)  # fmt: skip
    tokenizer = load_tokenizer(data.tokenizer_dir)
    model = MiniFusionForCausalLM(small_config(vocab_size=len(tokenizer)))
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    (run / "config.yaml").write_text("train:\n  block_size: 16\n")
    monkeypatch.setattr(long_context, "evaluation_texts",
                        lambda: ([p.read_text() for p in sorted(corpus.glob("*.txt"))], "local"))  # fmt: skip

    results = long_context.run(quick=True, model_dir=run / "model")
    lengths = results["settings"]["lengths"]
    for runs in results["passkey"]["runs"].values():
        assert len(runs) == 1 and len(runs[0]["accuracy"]) == len(lengths)
        assert all(0 <= a <= 1 for a in runs[0]["accuracy"])
    positions = results["positions"]
    assert positions["training_block"] == 16 and positions["block"] == 64
    assert len(positions["loss"]) == 64 and len(positions["before_after"]) == 2
    table = long_context.markdown(results)
    assert "| attention |" in table and "within the training length (16)" in table
    missing = long_context.run_positions(tmp_path / "nowhere", 4, quick=True)
    assert missing is None
