"""Block objectives: what the trainer (and TesseraQ's rounding) minimises for one block, as a sum of
registered terms with weights, parsed from `--loss`:

    mse                 OmniQuant's
    mse+nlc             LRQuant's (1:1)
    mse+0.5*token_cos   any weighted sum of terms
    dc                  ABQ-LLM's distribution correction: mse+nlc+attn_kl, each target term against two
                        targets (the FP-chain output and the FP block applied to the quantized input)

A term sees a `LossBatch`: the quantized block's output, the targets (the FP-chain output, and with
--aug_loss or `dc` the FP block on the quantized input), and, for terms that declare
`needs_attention`, the attention maps the quantized block read and those of the FP block on the FP
inputs (recomputed per batch by the block loop, never cached for the whole calibration set).
Target terms are summed over the targets, as OmniQuant sums its aug_loss term.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import LOSS_TERMS, LossSpec
from ..models.blocks import block_output
from ..quant.qmodules import AttentionProbe


@dataclass
class LossBatch:
    out: torch.Tensor                          # the quantized block's output (float32)
    targets: list                              # float32 tensors of out's shape
    attention: list = field(default_factory=list)      # AttentionRead of the quantized block
    fp_attention: list = field(default_factory=list)   # AttentionRead of the FP block on the FP inputs


@dataclass(frozen=True)
class Term:
    fn: Callable[[LossBatch], torch.Tensor]
    needs_attention: bool = False
    doc: str = ""


TERMS: dict[str, Term] = {}


def term(name: str, needs_attention: bool = False):
    def register(fn):
        TERMS[name] = Term(fn, needs_attention, (fn.__doc__ or "").strip().split("\n")[0])
        LOSS_TERMS[name] = needs_attention          # what --loss may name (config.LossSpec)
        return fn
    return register


def _per_target(fn):
    return lambda batch: sum(fn(batch.out, t) for t in batch.targets)


@term("mse")
def mse(batch: LossBatch) -> torch.Tensor:
    """mean squared error (OmniQuant)"""
    return _per_target(F.mse_loss)(batch)


@term("token_rel")
def token_rel(batch: LossBatch) -> torch.Tensor:
    """each token's squared error over its target's squared norm, averaged over tokens.

    Every later reader sees the residual stream through an RMSNorm, so what matters per token is the
    relative error. Under plain MSE, a model with an attention sink (Qwen2.5: the first token holds
    68-93% of the residual stream's energy in blocks 3-18) spends the whole budget on that one token."""
    def rel(out, target):
        err = (out - target).pow(2).sum(-1)
        return (err / target.pow(2).sum(-1).clamp_min(1e-12)).mean()
    return _per_target(rel)(batch)


@term("token_cos")
def token_cos(batch: LossBatch) -> torch.Tensor:
    """each token's 1 - cos(output, target), averaged.

    The error in the direction the next RMSNorm passes on. Bounded by 2 per token, so a token the
    quantized trajectory has pushed far off (a spurious sink) cannot dominate it as it dominates token_rel."""
    return _per_target(lambda out, t: (1 - F.cosine_similarity(out, t, dim=-1, eps=1e-12)).mean())(batch)


@term("nlc")
def nlc(batch: LossBatch) -> torch.Tensor:
    """-log |mean over tokens of cos(output, target)| (LRQuant's negative log cosine).

    As LRQuant computes it: the cosine over the hidden dimension of each (sample, token), averaged over
    all tokens, the absolute value taken after the mean."""
    return _per_target(lambda out, t: -torch.log(F.cosine_similarity(out, t, dim=-1, eps=1e-12).mean().abs()
                                                 .clamp_min(1e-12)))(batch)


@term("attn_kl", needs_attention=True)
def attn_kl(batch: LossBatch) -> torch.Tensor:
    """symmetric KL between the FP and the quantized attention maps (ABQ-LLM).

    KL(P||Q) + KL(Q||P) = sum over keys of (P - Q)(log P - log Q), per head and query, averaged over
    samples, heads and queries, summed over the block's attention calls."""
    if len(batch.attention) != len(batch.fp_attention) or not batch.attention:
        raise RuntimeError(f"attn_kl: {len(batch.attention)} quantized and {len(batch.fp_attention)} FP attention "
                           f"reads recorded; the block's attention did not run through affinequant's attention "
                           f"function")
    total = 0.0
    for quant, fp in zip(batch.attention, batch.fp_attention):
        log_q = quant.log_probs()
        with torch.no_grad():
            log_p = fp.log_probs()
        total = total + ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()
    return total


class BlockObjective(LossSpec):
    """A parsed --loss that computes itself on a LossBatch."""

    def __call__(self, batch: LossBatch) -> torch.Tensor:
        return sum(w * TERMS[name].fn(batch) for name, w in self.terms if w)

    def describe(self) -> str:
        parts = " + ".join(name if w == 1 else f"{w:g}*{name}" for name, w in self.terms)
        return parts + (" (two targets: FP chain and FP block on the quantized input)" if self.two_targets else "")


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The block objective `kind` (a --loss spec without attention terms) against one target."""
    return BlockObjective.parse(kind)(LossBatch(out, [target]))


def objective_on(block: torch.nn.Module, data, batch, objective: BlockObjective) -> torch.Tensor:
    """`objective` of `block` (as it stands) on the samples `batch` of `data` (a stages.BlockData): its output
    against the targets, and, for attention terms, the attention maps it reads against the FP block's on the
    FP inputs, recomputed for this batch only (calibration-set-sized maps would not fit: N x heads x L x L)."""
    device = data.device
    with AttentionProbe(stop=False) if objective.needs_attention else contextlib.nullcontext() as reads:
        out = block_output(block(data.inputs[batch].to(device), **data.kwargs)).float()
    fp_reads = []
    if objective.needs_attention:
        with torch.no_grad(), AttentionProbe(stop=True) as fp_reads:
            data.fp_block(data.fp_inputs[batch].to(device), **data.kwargs)
    return objective(LossBatch(out, [t[batch].to(device).float() for t in data.targets], reads or [], fp_reads))
