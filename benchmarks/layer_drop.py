"""Layer dropping + continued pretraining at small scale (Jha et al. 2023), and MiniLM 6 -> 4 / 3.

Part 1 (decoder): pretrain a small Llama-style decoder on the Shakespeare plays (byte-level BPE
trained on them; cached under the fxcook cache dir so later runs reuse it), then remove half its
blocks and train every arm on the same token budget: the five placements of the paper's Figure 1 and
ShortGPT block influence with continued pretraining (LM loss); all-at-once vs incremental (one block
every K steps); continued pretraining vs the three distillation baselines (logit KD, MiniLM relations
on the last block, per-layer "homotopic"); a lambda sweep on the KL term; and a model of the pruned
size trained from scratch on (a) the arm budget and (b) the whole budget (pretraining + arm).
Metrics: held-out perplexity and next-token accuracy; wall-clock and training FLOPs per arm
(6 N T for the student, + 2 N_teacher T for a teacher forward; N = non-embedding parameters + head).

Part 2 (encoder): all-MiniLM-L6-v2 from 6 to 4 and 3 blocks by each placement, one-shot and after a
short distillation (last block vs the original's, on Shakespeare lines): sentence-embedding fidelity
vs the original, and ONNX Runtime speed vs the 6-block model (paired rounds, median ratio).

    python benchmarks/layer_drop.py [--quick] [--pretrain-steps N] [--arm-steps N] [--skip-minilm]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import fxcook  # noqa: E402
from fxcook.data import cache_dir, shakespeare_lines  # noqa: E402
from fxcook.passes import DropLayers  # noqa: E402
from fxcook.tracing import main_output  # noqa: E402
from fxcook.training.baselines import baseline  # noqa: E402

PRETRAIN_LR, ARM_LR = 3e-3, 1e-3  # AdamW, warmup 5% then cosine; the pruned arms continue from trained weights
PLACEMENTS = ("max-gap", "input", "output", "middle", "both", "block-influence")
SIZES = {  # the setting that fits about 75 minutes on one CPU thread, and one that fits a CI smoke run
    "full": dict(layers=12, hidden=256, seq=128, batch=8, vocab=4096, pretrain=1400, arm=100),
    "quick": dict(layers=8, hidden=128, seq=64, batch=16, vocab=2048, pretrain=300, arm=60),
}


# ---- data ---------------------------------------------------------------------------------------
def tokenizer_for(lines: list[str], vocab: int) -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE over the training lines, cached by vocabulary size."""
    from tokenizers import ByteLevelBPETokenizer

    path = cache_dir() / "layer_drop" / f"bpe-{vocab}.json"
    if not path.is_file():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(lines, vocab_size=vocab, special_tokens=["<pad>", "<eos>"])
        path.parent.mkdir(parents=True, exist_ok=True)
        bpe.save(str(path))
    return tf.PreTrainedTokenizerFast(tokenizer_file=str(path), pad_token="<pad>", eos_token="<eos>")


def packed(tok, lines: list[str], seq: int) -> dict[str, torch.Tensor]:
    """The lines as one token stream (eos between lines) cut into rows of `seq`."""
    ids = [i for enc in tok(lines)["input_ids"] for i in (*enc, tok.eos_token_id)]
    rows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows)}


# ---- models -------------------------------------------------------------------------------------
def llama_config(s: dict, layers: int) -> tf.LlamaConfig:
    return tf.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["hidden"] * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=max(s["hidden"] // 64, 2), max_position_embeddings=s["seq"],
        tie_word_embeddings=True, use_cache=False, pad_token_id=0,
    )  # fmt: skip


def train_flops(model, tokens: int, teacher=None) -> float:
    """6 N T (+ 2 N_t T): N counts the tied embedding once, as the head's matmul (the lookup is free)."""
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return 6 * n(model) * tokens + (2 * n(teacher) * tokens if teacher is not None else 0)


@torch.no_grad()
def evaluate(model, rows: dict[str, torch.Tensor], batch: int = 32) -> dict[str, float]:
    """Held-out perplexity and next-token accuracy over packed rows."""
    model.eval()
    nll = correct = count = 0.0
    for i in range(0, len(rows["input_ids"]), batch):
        ids = rows["input_ids"][i : i + batch]
        logits = main_output(model(input_ids=ids, attention_mask=torch.ones_like(ids)), ("logits",))
        logits, target = logits[:, :-1].float(), ids[:, 1:]
        nll += float(
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        )
        correct += float((logits.argmax(-1) == target).sum())
        count += target.numel()
    return {"ppl": math.exp(nll / count), "acc": correct / count}


def fit(cooked, data, steps: int, s: dict, teacher=None, loss=None, lr: float = 1e-3, seed: int = 0, **kw) -> float:
    """Train `cooked` for `steps` and return the wall-clock seconds (`kw`: callback/eval_every)."""
    t0 = time.perf_counter()
    fxcook.train(
        cooked, teacher=teacher, data=data, loss=loss or baseline("continued"), steps=steps, seed=seed,
        batch_size=s["batch"], lr=lr, warmup=max(steps // 20, 1), max_length=s["seq"], progress=False, **kw,
    )  # fmt: skip
    return time.perf_counter() - t0


def flatness(curve: list[dict]) -> float:
    """Relative held-out perplexity gain over the last 20% of steps: (ppl at 80% - final) / ppl at 80%."""
    last = curve[-1]
    mark = min(curve, key=lambda r: abs(r["step"] - 0.8 * last["step"]))
    return (mark["ppl"] - last["ppl"]) / mark["ppl"]


def pretrained(s: dict, data, heldout, probe) -> tuple[tf.LlamaForCausalLM, dict]:
    """The pretrained full-depth decoder: from the cache, or trained now and cached."""
    key = "-".join(f"{k}{v}" for k, v in sorted(s.items()) if k != "arm")
    where = cache_dir() / "layer_drop" / f"llama-{key}"
    if (where / "config.json").is_file():
        meta = json.loads((where / "fxcook_pretrain.json").read_text())
        return tf.LlamaForCausalLM.from_pretrained(where).eval(), meta
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(llama_config(s, s["layers"])).eval()
    cooked = fxcook.capture(copy.deepcopy(model), probe)
    curve, t0 = [], time.perf_counter()

    def probe_heldout(step, m):
        curve.append({"step": step, "sec": time.perf_counter() - t0, **evaluate(m, heldout)})
        m.train()
        print("pretrain", curve[-1], flush=True)

    every = max(s["pretrain"] // 12, 1)
    sec = fit(cooked, data, s["pretrain"], s, lr=PRETRAIN_LR, callback=probe_heldout, eval_every=every)
    model.load_state_dict(cooked.state_dict())
    meta = {"seconds": sec, **evaluate(model, heldout), "curve": curve}
    model.save_pretrained(where)
    (where / "fxcook_pretrain.json").write_text(json.dumps(meta))
    return model.eval(), meta


# ---- part 1 -------------------------------------------------------------------------------------
def decoder_arms(s: dict, args) -> list[dict]:
    lines = shakespeare_lines(seed=0)
    held_lines, train_lines = lines[: args.heldout], lines[600:]  # training never sees the first 600
    tok = tokenizer_for(train_lines, s["vocab"])
    data, heldout = packed(tok, train_lines, s["seq"]), packed(tok, held_lines, s["seq"])
    probe = {k: v[:2] for k, v in data.items()}
    teacher, meta = pretrained(s, data, heldout, probe)
    drop, arm = s["layers"] // 2, s["arm"]
    calib = [{k: v[i : i + 8] for k, v in data.items()} for i in range(0, 64, 8)]
    rows = [{"arm": f"teacher ({s['layers']} blocks, pretrained {s['pretrain']} steps)", "ppl": meta["ppl"], "acc": meta["acc"],
             "sec": meta["seconds"], "flops": train_flops(teacher, s["pretrain"] * s["batch"] * s["seq"])}]  # fmt: skip
    report(rows, s, args, curve=meta.get("curve"))

    def student(placement="max-gap", every=0):
        cooked = fxcook.capture(copy.deepcopy(teacher), probe)
        calibration = calib if placement == "block-influence" else None
        return fxcook.apply(cooked, [DropLayers(count=drop, placement=placement, every=every, calibration=calibration)])

    def run(name, cooked, loss=None, with_teacher=False, steps=arm, lr=ARM_LR, seed=0):
        if args.only and args.only not in name:
            return
        before = evaluate(cooked, heldout)
        sec = fit(cooked, data, steps, s, teacher=teacher if with_teacher else None, loss=loss, lr=lr, seed=seed)
        after = evaluate(cooked, heldout)
        flops = train_flops(cooked, steps * s["batch"] * s["seq"], teacher if with_teacher else None)
        rows.append({"arm": name, "one_shot_ppl": before["ppl"], **after, "sec": sec, "flops": flops})
        report(rows, s, args, curve=meta.get("curve"))
        print(rows[-1], flush=True)

    for placement in PLACEMENTS:
        c = student(placement)
        run(f"{placement}: {[int(p.rpartition('.')[2]) for p in c.pass_entries[-1]['record']['dropped']]} + LM", c)
    run("max-gap + LM, data order seed 1 (noise floor)", student(), seed=1)
    run(
        f"max-gap incremental (one block every {max(arm // (2 * drop), 1)} steps) + LM",
        student(every=max(arm // (2 * drop), 1)),
    )
    for name in ("kd", "minilm", "homotopic"):
        run(f"max-gap + {name} (lambda 1)", student(), baseline(name, lam=1.0, causal=True), with_teacher=True)
    c = student()
    matched = round(arm * train_flops(c, 1, teacher) / train_flops(c, 1))  # a distillation arm's FLOPs, LM only
    run(f"max-gap + LM, {matched} steps (the distillation arms' FLOPs)", c, steps=matched)
    for lam in (0.25, 4.0):
        run(f"max-gap + kd (lambda {lam})", student(), baseline("kd", lam=lam, causal=True), with_teacher=True)
    half = tf.LlamaForCausalLM(llama_config(s, s["layers"] - drop)).eval()
    run("from scratch, arm budget", fxcook.capture(copy.deepcopy(half), probe), lr=PRETRAIN_LR)
    run(
        "from scratch, full budget",
        fxcook.capture(copy.deepcopy(half), probe),
        steps=s["pretrain"] + arm,
        lr=PRETRAIN_LR,
    )
    return rows, meta.get("curve")


# ---- part 2 -------------------------------------------------------------------------------------
def minilm_arms(args) -> list[dict]:
    from fxcook.evaluate import embed, fidelity
    from fxcook.models import load_model
    from fxcook.runtime.onnx import export
    from fxcook.runtime.onnx.session import OrtModel

    model, tok = load_model("minilm")
    lines = shakespeare_lines(seed=1)
    held, train = lines[: args.minilm_heldout], lines[128:2128]
    enc = lambda texts: dict(tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))  # noqa: E731
    probe = enc(held[:2])
    ref = embed(model, tok, held)
    calib = [enc(train[i : i + 16]) for i in range(0, 64, 16)]
    out, timed = [], {}
    for keep in (4, 3):
        for placement in PLACEMENTS:
            cooked = fxcook.apply(
                fxcook.capture(model, probe),
                [
                    DropLayers(
                        keep=keep, placement=placement, calibration=calib if placement == "block-influence" else None
                    )
                ],
            )
            kept = [int(b.rpartition(".")[2]) for b in cooked.sites.blocks]
            row = {"keep": keep, "placement": placement, "kept": kept, **fidelity(ref, embed(cooked, tok, held))}
            if placement == "max-gap":
                teacher = copy.deepcopy(model)
                loss = fxcook.DistillLoss(hidden_mse=1.0, layer_map="last_k", last_k=1)
                fxcook.train(cooked, teacher=teacher, data=train, tokenizer=tok, loss=loss, steps=args.minilm_steps,
                             batch_size=16, lr=5e-5, max_length=64, progress=False)  # fmt: skip
                row["distilled"] = fidelity(ref, embed(cooked.eval(), tok, held))
                timed[keep] = cooked
            out.append(row)
            print(row, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        x = enc(held[:8])
        full = OrtModel(export(fxcook.capture(model, probe), Path(tmp) / "6.onnx", x))
        ort = {k: OrtModel(export(c, Path(tmp) / f"{k}.onnx", x)) for k, c in timed.items()}
        ratios = {k: [] for k in ort}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            full(**x)
            base = time.perf_counter() - t0
            for k, m in ort.items():
                t0 = time.perf_counter()
                m(**x)
                ratios[k].append(base / (time.perf_counter() - t0))
    for row in out:
        if row["placement"] == "max-gap":
            row["ort_speedup"] = statistics.median(ratios[row["keep"]])
    return out


# ---- report -------------------------------------------------------------------------------------
def report(rows: list[dict], s: dict, args, minilm: list[dict] | None = None, curve: list[dict] | None = None) -> None:
    lines = [
        "# Layer dropping + continued pretraining (small-scale reproduction)",
        "",
        f"Command: `python benchmarks/layer_drop.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: 2 CPU cores shared with one other single-threaded job; torch threads {args.threads} "
        "(wall-clock is indicative only).",
    ]
    if rows:
        lines += [
            "",
            f"Decoder: Llama-style, {s['layers']} blocks, hidden {s['hidden']}, byte-level BPE vocabulary {s['vocab']}, "
            f"rows of {s['seq']} tokens, batch {s['batch']}; pretrained {s['pretrain']} steps; every arm trains "
            f"{s['arm']} steps ({s['arm'] * s['batch'] * s['seq']:,} tokens) after removing {s['layers'] // 2} blocks. "
            f"Held-out: {args.heldout} Shakespeare lines not trained on. FLOPs: 6 N T (+ 2 N_teacher T with a teacher).",
            "",
            "| arm | one-shot ppl | ppl | next-token acc | wall s | train FLOPs |",
            "|---|---:|---:|---:|---:|---:|",
        ]
    for r in rows:
        one = f"{r['one_shot_ppl']:.1f}" if "one_shot_ppl" in r else ""
        lines.append(f"| {r['arm']} | {one} | {r['ppl']:.2f} | {r['acc']:.4f} | {r['sec']:.0f} | {r['flops']:.2e} |")
    if curve:
        lines += ["", "## Pretraining curve (held-out)", "",
                  f"Relative perplexity gain over the last 20% of steps: {flatness(curve):.1%}.", "",
                  "| step | wall s | ppl | next-token acc |", "|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {r['step']} | {r['sec']:.0f} | {r['ppl']:.2f} | {r['acc']:.4f} |" for r in curve]
    if minilm:
        lines += [
            "",
            "## MiniLM (all-MiniLM-L6-v2) 6 -> 4 and 3 blocks",
            "",
            f"Fidelity: cosine of mean-pooled embeddings vs the 6-block original on {args.minilm_heldout} held-out Shakespeare lines. "
            f"Distilled: {args.minilm_steps} steps of last-block hidden MSE against the original (batch 16, lr 5e-5). "
            f"ORT speed-up: batch 8 x up to 64 tokens, 2 threads, median of {args.rounds} paired rounds vs the 6-block ONNX.",
            "",
            "| blocks | placement | kept | one-shot min / mean cos | distilled min / mean cos | ORT speed-up |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for r in minilm:
            dist = f"{r['distilled']['min_cos']:.3f} / {r['distilled']['mean_cos']:.3f}" if "distilled" in r else ""
            speed = f"{r['ort_speedup']:.2f}x" if "ort_speedup" in r else ""
            lines.append(
                f"| {r['keep']} | {r['placement']} | {r['kept']} | {r['min_cos']:.3f} / {r['mean_cos']:.3f} | {dist} | {speed} |"
            )
    Path(args.out).write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized decoder (8 blocks, hidden 128)")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--arm-steps", type=int)
    for size in ("layers", "hidden", "seq", "batch"):
        ap.add_argument(f"--{size}", type=int, help=f"decoder {size} (default: by --quick)")
    ap.add_argument("--heldout", type=int, default=600, help="held-out lines for perplexity (at most 600)")
    ap.add_argument("--only", help="run only the decoder arms whose name contains this text")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-decoder", action="store_true")
    ap.add_argument("--minilm-steps", type=int, default=100)
    ap.add_argument("--minilm-heldout", type=int, default=128, help="held-out lines for MiniLM fidelity (at most 128)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/layer_drop.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = dict(SIZES["quick" if args.quick else "full"])
    s["pretrain"] = args.pretrain_steps or s["pretrain"]
    s["arm"] = args.arm_steps or s["arm"]
    s.update({k: getattr(args, k) for k in ("layers", "hidden", "seq", "batch") if getattr(args, k)})
    rows, curve = ([], None) if args.skip_decoder else decoder_arms(s, args)
    minilm = None if args.skip_minilm else minilm_arms(args)
    report(rows, s, args, minilm, curve)
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
