"""The shipped layer-dropping recipes end to end: drop_minilm by name through `fxcook train` (artifact
keeps the original block paths and reloads), drop_decoder's passes and train section on a 12-block Llama."""

import json

import torch

import fxcook
from fxcook.recipe import load_recipe
from fxcook.testing import tiny_model
from fxcook.tracing import main_output
from fxcook.training.losses import DistillLoss


def test_drop_minilm_recipe_by_name_through_fxcook_train(tmp_path):
    from fxcook.cli import main
    from fxcook.data import shakespeare_lines
    from fxcook.testing import save_tiny_pretrained

    torch.set_num_threads(1)
    lines = shakespeare_lines(n=80, seed=3)
    model = save_tiny_pretrained(tmp_path / "m", lines, num_hidden_layers=6)
    (tmp_path / "lines.txt").write_text("\n".join(lines))
    args = [
        *("train", "--model", str(model), "--recipe", "drop_minilm", "--data", str(tmp_path / "lines.txt")),
        *("--out", str(tmp_path / "o"), "--steps", "2", "--batch-size", "4", "--max-length", "32", "--eval-lines", "8"),
    ]
    assert main(args) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["steps"] == 2
    assert (tmp_path / "o" / "model" / "drop_minilm.yaml").is_file()  # the shipped recipe travels with the model
    loaded = fxcook.load(tmp_path / "o" / "model")
    assert list(loaded.sites.blocks) == [f"encoder.layer.{i}" for i in (0, 2, 3, 5)]  # max-gap, paths kept


def test_drop_decoder_recipe_halves_a_12_block_llama_and_trains_it_with_the_lm_loss(tmp_path):
    torch.set_num_threads(1)
    recipe = load_recipe("drop_decoder")
    settings = recipe.train.settings()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (16, 24), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    probe = {k: v[:2] for k, v in data.items()}
    cooked = fxcook.compile(tiny_model("llama", num_hidden_layers=12), recipe.build([probe]), example_inputs=probe)
    assert list(cooked.sites.blocks) == [f"model.layers.{i}" for i in (0, 2, 4, 7, 9, 11)]  # docs' 12 -> 6 table
    loss = DistillLoss(**settings["loss"])
    c = loss.config
    assert c.lm == 1.0 and c.kl == 0 and c.hidden_mse == 0  # continued pretraining: no teacher term
    result = fxcook.train(
        cooked, data=data, loss=loss, steps=4, batch_size=4, lr=settings["lr"], max_length=24, progress=False
    )
    assert result.step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    fxcook.save(cooked, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(
            main_output(fxcook.load(tmp_path / "a")(**probe)), main_output(cooked(**probe)), rtol=1e-5, atol=1e-5
        )


def test_drop_decoder_recipe_by_name_through_fxcook_train_keeps_the_lm_head(tmp_path):
    """A directory saved from a causal LM loads with its head, so the recipe's LM loss has logits."""
    import transformers as tf
    from tokenizers import ByteLevelBPETokenizer

    from fxcook.cli import main
    from fxcook.data import shakespeare_lines

    torch.set_num_threads(1)
    lines = shakespeare_lines(n=200, seed=3)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=300, special_tokens=["<pad>", "<eos>"])
    bpe.save(str(tmp_path / "bpe.json"))
    tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "bpe.json"), pad_token="<pad>", eos_token="<eos>")
    tiny_model("llama", num_hidden_layers=12, vocab_size=len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "lines.txt").write_text("\n".join(lines))
    args = [
        *("train", "--model", str(tmp_path / "m"), "--recipe", "drop_decoder", "--data", str(tmp_path / "lines.txt")),
        *("--out", str(tmp_path / "o"), "--steps", "2", "--batch-size", "4", "--max-length", "32", "--eval-lines", "8"),
    ]
    assert main(args) == 0
    result = json.loads((tmp_path / "o" / "results.json").read_text())
    assert result["steps"] == 2 and torch.isfinite(torch.tensor(result["final_loss"]))
    loaded = fxcook.load(tmp_path / "o" / "model")
    assert list(loaded.sites.blocks) == [f"model.layers.{i}" for i in (0, 2, 4, 7, 9, 11)]
    ids = torch.tensor([tok("To be, or not to be")["input_ids"]])
    assert main_output(loaded(input_ids=ids, attention_mask=torch.ones_like(ids))).shape[-1] == len(tok)  # logits
