"""Distillation and continued-pretraining losses over model outputs and tap values.

Every term is a per-token (or per-example) value summed over the batch and divided by a
denominator the caller may pass in. The trainer passes the *global* token count over all ranks and
micro-batches (divided by the world size, since FSDP averages gradients), so a 2-rank run computes
exactly the loss of one process on the same global batch, whatever the padding on each rank.

Terms (weights are per term; 0 disables it):
- `kl`: logit KL(teacher || student) at temperature T, scaled by T^2, over the vocabulary/class dim,
  padding masked.
- `hidden_mse`, `hidden_cos`: between mapped student/teacher hidden states (block outputs, or the
  explicit `student:teacher` tap pairs). When widths differ a learned `Linear(d_s, d_t)` projection
  is created per pair; it lives in this module, so the trainer optimizes (and checkpoints) it.
- `attention`: KL between attention maps softmax(QK^T/sqrt(d)) recomputed from the q/k projection
  taps of mapped blocks (MiniLM). Exact for absolute-position models; pre-rotary for RoPE models.
- `relation`: KL between value relations softmax(VV^T/sqrt(d)) (MiniLM's V-V).
- `lm`: next-token cross-entropy without a teacher (continued pretraining after pruning).
- `task`: cross-entropy of classification logits vs the batch's `labels`, per example
  (`fxcook.training.task`).
- `embedding`: MSE between what enters both models' first blocks (their embedding outputs).
- `pooled`: 1 - cosine between the padding-masked token means of both models' main outputs, per
  example: the sentence embedding a mean-pooling encoder (MiniLM) is used for, distilled directly.
- `normalize`: every other term rescaled to the LM term's magnitude (`fxcook.training.scaling`).

Layer maps: `"uniform"` (student block i -> teacher block round((i+1) n_t / n_s) - 1), `"last_k"`
(the last k blocks of each, `last_k=` or min of the depths), `"taps"` (the pairs recorded by
`Tap("s:t")`), `"origin"` (each block of a layer-dropped student and the teacher block it came
from, `fxcook.training.layermap`), or an explicit list of `"[post]s.path:[post]t.path"` pairs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from fxcook.errors import FxcookError, PreconditionError
from fxcook.taps import parse_spec, run_with_taps, tap_points, teacher_pairs
from fxcook.tracing import main_output
from fxcook.training.layermap import embedding_pair, origin_pairs
from fxcook.training.scaling import normalized
from fxcook.training.task import model_inputs, task_loss_sum

Q_NAMES = ("query", "q_proj", "q", "q_lin", "wq")
K_NAMES = ("key", "k_proj", "k", "k_lin", "wk")
V_NAMES = ("value", "v_proj", "v", "v_lin", "wv")
FUSED_NAMES = ("c_attn", "qkv_proj", "Wqkv", "qkv", "query_key_value")


class DistillConfig(BaseModel):
    """The loss section of a recipe's `train:` block (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    kl: float = 0.0
    hidden_mse: float = 0.0
    hidden_cos: float = 0.0
    attention: float = 0.0
    relation: float = 0.0
    lm: float = 0.0
    task: float = 0.0
    embedding: float = 0.0
    pooled: float = 0.0
    normalize: bool = False  # scale each term to the LM term's size (needs lm > 0)
    temperature: float = 1.0
    layer_map: Literal["uniform", "last_k", "taps", "origin"] | list[str] | None = (
        None  # None: taps if paired, else uniform
    )
    last_k: int | None = None
    heads: int | None = None
    projection: bool = True
    causal: bool = False


def block_paths(model: nn.Module) -> list[str]:
    """Transformer blocks: a CookedModel's block sites, else the children of the largest ModuleList."""
    sites = getattr(model, "sites", None)
    if sites is not None:
        return [s.path for s in sites.find("block")]
    best: list[str] = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > len(best):
            best = [f"{path}.{k}" if path else k for k in mod._modules]
    return best


def _key(tap: str) -> str:
    return re.sub(r"\W", "_", tap)


def _logits(out: Any, who: str) -> torch.Tensor:
    logits = main_output(out, ("logits",))
    if logits is None:
        raise PreconditionError(
            f"the {who} output ({type(out).__name__}) has no logits; "
            f"kl and lm losses need a model with an LM/classification head"
        )
    return logits.float()


def _pooled_cos_loss(s_out: Any, t_out: Any, mask: torch.Tensor) -> torch.Tensor:
    """Per example, 1 - cos of the masked token means of the two main outputs ([batch, seq, dim])."""
    s, t = main_output(s_out), main_output(t_out)
    if s is None or s.dim() != 3 or t is None or s.shape != t.shape:
        shapes = [None if x is None else tuple(x.shape) for x in (s, t)]
        raise PreconditionError(f"pooled: needs equal [batch, seq, dim] main outputs, got student/teacher {shapes}")
    w = mask[..., None]
    pool = lambda h: (h.float() * w).sum(1) / w.sum(1).clamp_min(1.0)  # noqa: E731
    return 1 - F.cosine_similarity(pool(s), pool(t), dim=-1)


def _masked_softmax_logits(
    a: torch.Tensor, b: torch.Tensor, heads: int, mask: torch.Tensor, causal: bool
) -> torch.Tensor:
    """log softmax(a b^T / sqrt(d)) per head: [B, H, S, S], padded keys (and the future if causal) masked."""
    bsz, seq, width = a.shape
    if width % heads:
        raise PreconditionError(f"attention/relation distillation: width {width} is not divisible by heads={heads}")
    d = width // heads
    if b.shape[-1] % d:
        raise PreconditionError(f"attention distillation: key width {b.shape[-1]} is not a multiple of head dim {d}")
    a = a.float().view(bsz, seq, heads, d).transpose(1, 2)
    b = b.float().view(bsz, seq, b.shape[-1] // d, d).transpose(1, 2)
    b = b.repeat_interleave(heads // b.shape[1], dim=1)  # grouped-query attention shares k heads
    scores = a @ b.transpose(-1, -2) / math.sqrt(d)
    keep = mask[:, None, None, :].bool()
    if causal:
        keep = keep & torch.ones(seq, seq, dtype=torch.bool, device=a.device).tril()
    return torch.log_softmax(scores.masked_fill(~keep, torch.finfo(scores.dtype).min), dim=-1)


class DistillLoss(nn.Module):
    """Weighted sum of distillation terms; `bind` resolves taps and creates projections first."""

    def __init__(self, **kwargs):
        super().__init__()
        try:
            self.config = DistillConfig(**kwargs)
        except ValidationError as e:
            raise FxcookError(f"invalid distillation loss config: {e}") from e
        c = self.config
        if not any((c.kl, c.hidden_mse, c.hidden_cos, c.attention, c.relation, c.lm, c.task, c.embedding, c.pooled)):
            raise FxcookError(
                "DistillLoss: every term weight is 0; set at least one of "
                "kl, hidden_mse, hidden_cos, attention, relation, lm, task, embedding, pooled"
            )
        if c.normalize and not c.lm:
            raise FxcookError("DistillLoss: normalize=True scales every term to the LM term's size; set lm > 0")
        if c.temperature <= 0:
            raise FxcookError(f"DistillLoss: temperature must be > 0, got {c.temperature}")
        self.proj = nn.ModuleDict()
        self.hidden_pairs: list[tuple[str, str]] = []
        self.qkv_pairs: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        self.embedding_pair: tuple[str, str] | None = None
        self.heads = c.heads
        self.bound = False

    @property
    def needs_teacher(self) -> bool:
        c = self.config
        return bool(c.kl or c.hidden_mse or c.hidden_cos or c.attention or c.relation or c.embedding or c.pooled)

    # ---- binding: which taps, which projections -------------------------------------------------
    def _block_pairs(self, student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
        c = self.config
        layer_map = c.layer_map
        if layer_map is None:
            layer_map = "taps" if any(tp.pair for tp in tap_points(student).values()) else "uniform"
        if isinstance(layer_map, list):
            pairs = []
            for text in layer_map:
                s, t = parse_spec(text)
                if t is None:
                    raise FxcookError(f"layer_map entry {text!r} needs a 'student:teacher' pair")
                pairs.append((str(s), str(t)))
            return pairs
        if layer_map == "taps":
            pairs = teacher_pairs(student, [p for p, _ in teacher.named_modules() if p])
            if not pairs:
                raise FxcookError("layer_map='taps' but the student has no paired taps (Tap('s:t'))")
            return pairs
        sb, tb = block_paths(student), block_paths(teacher)
        if layer_map == "origin":
            return origin_pairs(sb, teacher)
        if not sb or not tb:
            raise FxcookError(
                f"layer_map={layer_map!r} found no transformer blocks "
                f"(student: {len(sb)}, teacher: {len(tb)}); give explicit pairs"
            )
        if layer_map == "uniform":
            idx = [round((i + 1) * len(tb) / len(sb)) - 1 for i in range(len(sb))]
            return [(f"[post]{s}", f"[post]{tb[j]}") for s, j in zip(sb, idx)]
        k = c.last_k or min(len(sb), len(tb))
        if k > min(len(sb), len(tb)):
            raise FxcookError(f"last_k={k} exceeds the depth of the student ({len(sb)}) or teacher ({len(tb)})")
        return [(f"[post]{s}", f"[post]{t}") for s, t in zip(sb[-k:], tb[-k:])]

    @staticmethod
    def _qkv(model: nn.Module, tap: str) -> tuple[str, ...]:
        """The q, k, v (or one fused qkv) projection taps inside the block named by `tap`."""
        block = tap.split("]", 1)[1]
        inside = [p for p, _ in model.named_modules() if p.startswith(block + ".")]
        last = {p.rsplit(".", 1)[1]: p for p in inside}
        found = [next((last[n] for n in names if n in last), None) for names in (Q_NAMES, K_NAMES, V_NAMES)]
        if all(found):
            return tuple(f"[post]{p}" for p in found)
        fused = next((last[n] for n in FUSED_NAMES if n in last), None)
        if fused:
            return (f"[post]{fused}",)
        raise PreconditionError(
            f"attention/relation distillation: no q/k/v projections found under {block} "
            f"(looked for {Q_NAMES}, {K_NAMES}, {V_NAMES} or fused {FUSED_NAMES})"
        )

    def student_taps(self) -> list[str]:
        emb = {self.embedding_pair[0]} if self.embedding_pair else set()
        return sorted({s for s, _ in self.hidden_pairs} | {t for s, _ in self.qkv_pairs for t in s} | emb)

    def teacher_taps(self) -> list[str]:
        emb = {self.embedding_pair[1]} if self.embedding_pair else set()
        return sorted({t for _, t in self.hidden_pairs} | {x for _, t in self.qkv_pairs for x in t} | emb)

    def bind(self, student: nn.Module, teacher: nn.Module | None, batch: dict) -> DistillLoss:
        """Resolve layer pairs and taps and size the projections; `student` is not changed (taps without
        a TapPoint are collected through forward hooks, as on the teacher).

        Runs one forward of each model on `batch` (before any sharding) to learn tap widths.
        """
        c = self.config
        if not self.needs_teacher:
            self.bound = True
            return self
        if teacher is None:
            raise FxcookError(
                "these loss terms (kl/hidden/attention/relation) need a teacher; "
                "pass teacher= or use lm= alone for continued pretraining"
            )
        if self.heads is None and (c.attention or c.relation):
            cfg = getattr(teacher, "config", None)
            self.heads = getattr(cfg, "num_attention_heads", None)
            if self.heads is None:
                raise FxcookError("attention/relation distillation needs heads= (the teacher has no config)")
        pairs = (
            self._block_pairs(student, teacher) if (c.hidden_mse or c.hidden_cos or c.attention or c.relation) else []
        )
        self.hidden_pairs = pairs if (c.hidden_mse or c.hidden_cos) else []
        self.qkv_pairs = (
            [(self._qkv(student, s), self._qkv(teacher, t)) for s, t in pairs] if (c.attention or c.relation) else []
        )
        if c.embedding:
            self.embedding_pair = embedding_pair(block_paths(student), block_paths(teacher))
        was = student.training, teacher.training
        with torch.no_grad():
            _, st = run_with_taps(student, **model_inputs(batch), specs=self.student_taps())
            _, tt = run_with_taps(teacher, **model_inputs(batch), specs=self.teacher_taps())
        student.train(was[0]), teacher.train(was[1])
        for s, t in self.hidden_pairs:
            ds, dt = st[s].shape[-1], tt[t].shape[-1]
            if st[s].shape[:-1] != tt[t].shape[:-1]:
                raise PreconditionError(
                    f"taps {s} {tuple(st[s].shape)} and {t} {tuple(tt[t].shape)} differ in more than the hidden width"
                )
            if ds != dt:
                if not c.projection:
                    raise PreconditionError(
                        f"tap {s} has width {ds} but teacher tap {t} has {dt}; "
                        f"enable projection=True to learn a Linear({ds}, {dt})"
                    )
                self.proj[_key(s)] = nn.Linear(ds, dt, bias=False)
        self.bound = True
        return self

    # ---- the loss -------------------------------------------------------------------------------
    def counts(self, batch: dict) -> dict[str, float]:
        """Per-kind denominators of this batch: real tokens, next-token targets, examples."""
        mask = self._mask(batch)
        return {"tok": float(mask.sum()), "lm": float(self._lm_mask(batch).sum()), "ex": float(mask.shape[0])}

    @staticmethod
    def _mask(batch: dict) -> torch.Tensor:
        ids = batch.get("input_ids")
        mask = batch.get("attention_mask")
        if mask is None:
            if ids is None:
                raise FxcookError("the batch has neither attention_mask nor input_ids")
            mask = torch.ones_like(ids)
        return mask.float()

    def _lm_mask(self, batch: dict) -> torch.Tensor:
        mask = self._mask(batch)[:, 1:]
        labels = batch.get("labels")
        if labels is not None and labels.dim() == 2:  # token labels; 1-D ones are class labels (task)
            mask = mask * (labels[:, 1:] != -100).float()
        return mask

    def forward(
        self,
        batch: dict,
        s_out: Any,
        s_taps: dict,
        t_out: Any = None,
        t_taps: dict | None = None,
        denom: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(total loss, {term: value}) for one (micro-)batch; `denom` defaults to this batch's counts."""
        if not self.bound:
            raise FxcookError("DistillLoss.bind(student, teacher, batch) must run before the loss is used")
        c, mask = self.config, self._mask(batch)
        denom = denom or self.counts(batch)
        sums: dict[str, tuple[torch.Tensor, str]] = {}
        if c.kl:
            s, t = _logits(s_out, "student"), _logits(t_out, "teacher")
            if s.shape != t.shape:
                raise PreconditionError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ")
            T = c.temperature
            lt = torch.log_softmax(t / T, -1)
            per = (lt.exp() * (lt - torch.log_softmax(s / T, -1))).sum(-1) * T * T
            sums["kl"] = ((per * mask).sum(), "tok") if per.dim() == 2 else (per.sum(), "ex")
        if c.hidden_mse or c.hidden_cos:
            mse = cos = 0.0
            for s, t in self.hidden_pairs:
                hs, ht = s_taps[s].float(), t_taps[t].float()
                if _key(s) in self.proj:
                    hs = self.proj[_key(s)](hs)
                elif hs.shape != ht.shape:
                    raise PreconditionError(
                        f"tap {s} {tuple(hs.shape)} vs teacher {t} {tuple(ht.shape)}: shapes differ"
                    )
                mse = mse + (hs - ht).pow(2).mean(-1)
                cos = cos + 1 - F.cosine_similarity(hs, ht, dim=-1)
            n = len(self.hidden_pairs)
            if c.hidden_mse:
                sums["hidden_mse"] = ((mse / n * mask).sum(), "tok")
            if c.hidden_cos:
                sums["hidden_cos"] = ((cos / n * mask).sum(), "tok")
        for term, pick in (("attention", (0, 1)), ("relation", (2, 2))):
            if not getattr(c, term):
                continue
            acc = 0.0
            for s_names, t_names in self.qkv_pairs:
                ls = _masked_softmax_logits(*self._split(s_taps, s_names, pick), self.heads, mask, c.causal)
                lt = _masked_softmax_logits(*self._split(t_taps, t_names, pick), self.heads, mask, c.causal)
                kl = (lt.exp() * (lt - ls)).masked_fill(mask[:, None, None, :] == 0, 0).sum(-1)
                acc = acc + kl.mean(1)
            sums[term] = ((acc / len(self.qkv_pairs) * mask).sum(), "tok")
        if c.embedding:
            s, t = self.embedding_pair
            sums["embedding"] = (((s_taps[s].float() - t_taps[t].float()).pow(2).mean(-1) * mask).sum(), "tok")
        if c.pooled:
            sums["pooled"] = (_pooled_cos_loss(s_out, t_out, mask).sum(), "ex")
        if c.lm:
            logits = _logits(s_out, "student")[:, :-1]
            target = batch.get("labels", batch["input_ids"])[:, 1:]
            lm_mask = self._lm_mask(batch)
            ce = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1).clamp_min(0), reduction="none"
            )
            sums["lm"] = ((ce.view_as(lm_mask) * lm_mask).sum(), "lm")
        if c.task:
            sums["task"] = (task_loss_sum(s_out, batch), "ex")
        values = {name: value / max(denom[kind], 1.0) for name, (value, kind) in sums.items()}
        scaled = normalized(values) if c.normalize else values
        total = sum(getattr(c, name) * v for name, v in scaled.items())
        return total, {name: float(v.detach()) for name, v in values.items()}

    @staticmethod
    def _split(taps: dict, names: Sequence[str], pick: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = list(taps[names[0]].chunk(3, -1)) if len(names) == 1 else [taps[n] for n in names]
        return parts[pick[0]], parts[pick[1]]
