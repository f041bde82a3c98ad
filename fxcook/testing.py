"""Tiny random models and inputs of every supported HF family, for tests and examples with no download."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fxcook.errors import FxcookError

FAMILIES = ("bert", "gpt2", "t5", "llama", "mixtral", "qwen2_moe")


def tiny_config(family: str, **overrides):
    """A small random-init config of an HF family (hidden 32-64, 2 layers)."""
    import transformers as tf

    base = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    if family == "bert":
        cfg = tf.BertConfig(**base)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    elif family == "t5":
        cfg = tf.T5Config(
            vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
        )
    elif family == "llama":
        cfg = tf.LlamaConfig(**base, num_key_value_heads=2, use_cache=False)
    elif family == "mixtral":
        cfg = tf.MixtralConfig(
            **base, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, use_cache=False
        )
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **base,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            use_cache=False,
        )
    else:
        raise FxcookError(f"unknown family {family!r}; families are {', '.join(FAMILIES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A random-init model of `family` in eval mode (T5 as seq2seq, decoders as causal LMs)."""
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    cls = {
        "bert": tf.BertModel,
        "gpt2": tf.GPT2LMHeadModel,
        "t5": tf.T5ForConditionalGeneration,
        "llama": tf.LlamaForCausalLM,
        "mixtral": tf.MixtralForCausalLM,
        "qwen2_moe": tf.Qwen2MoeForCausalLM,
    }[family]
    torch.manual_seed(seed)
    return cls(cfg).eval()


def tiny_inputs(family: str, batch: int = 2, seq: int = 8, seed: int = 0, pad: int = 0) -> dict[str, torch.Tensor]:
    """Random token inputs for a tiny model; the last `pad` positions of row 0 are padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[0, seq - pad :] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(1, 128, (batch, seq), generator=g)
    return out


def save_tiny_pretrained(path: str | os.PathLike, lines: list[str], seed: int = 0, **overrides) -> Path:
    """A local HF directory holding a tiny random BERT and a word-level tokenizer over `lines`:
    what the command line loads, with no download and in seconds."""
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from transformers import BertTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    split = BertPreTokenizer().pre_tokenize_str
    words = sorted({w for line in lines for w, _ in split(line.lower())})
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(path)
    tiny_model("bert", seed, vocab_size=len(words) + 5, **overrides).save_pretrained(path)
    return path


def _rank_main(rank: int, fn, tmp: str) -> None:
    import json

    import torch.distributed as dist

    from fxcook.training.distributed import exit_distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    try:
        result = fn(rank, tmp)
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        dist.destroy_process_group()
        raise
    exit_distributed(0)


def on_two_ranks(fn, tmp: str | os.PathLike) -> list:
    """Run `fn(rank, tmp)` on 2 gloo CPU processes (a module-level function, so spawn can pickle it) and
    return what each rank returned (JSON-serialisable), in rank order: the FSDP tests' one harness."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(fn, str(tmp)), nprocs=2, join=True)
    return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
