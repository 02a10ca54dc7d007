"""Perplexity (GPTQ protocol) and label-free agreement with the full-precision model.

ppl = exp(Σ_windows NLL_mean(window) · seqlen / (n_windows · seqlen)) over non-overlapping windows,
the tail dropped; each window's mean NLL is kept too. With a reference model, also the mean
KL(P_fp || P_q) of next-token distributions and top-1 agreement, as llama.cpp's --kl-divergence
reports.
"""
from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger("affinequant")


def eval_windows(tokens: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """The windows a perplexity evaluates: (windows, seqlen), non-overlapping, the tail dropped, the first
    `limit` of them."""
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    used = min(n_windows, limit) if limit else n_windows
    return tokens[: used * seqlen].reshape(used, seqlen)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, device, limit: int | None = None,
               reference=None, desc: str = "ppl") -> dict:
    windows = eval_windows(tokens, seqlen, limit)
    n_windows, used = tokens.numel() // seqlen, windows.shape[0]
    if used < n_windows:
        log.info("%s: --limit %d evaluates the first %d of %d windows", desc, limit, used, n_windows)
    nll_sum = ref_nll_sum = kl_sum = 0.0
    window_nll = []        # per window, so that two runs can be compared window by window (paired)
    agree = positions = 0
    t0 = time.time()
    for i in tqdm(range(used), desc=desc, unit="window"):
        ids = windows[i][None].to(device)
        logp = F.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        target = ids[0, 1:]
        window_nll.append(-logp.gather(1, target[:, None]).mean().item())
        nll_sum += window_nll[-1] * seqlen
        if reference is not None:
            ref_logp = F.log_softmax(reference(ids, use_cache=False).logits[0, :-1].float(), dim=-1)
            ref_nll_sum += -ref_logp.gather(1, target[:, None]).mean().item() * seqlen
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum(-1).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            positions += target.numel()
    result = {"ppl": math.exp(nll_sum / (used * seqlen)), "windows": used, "windows_total": n_windows,
              "seqlen": seqlen, "seconds": time.time() - t0, "window_nll": window_nll}
    if reference is not None:
        result.update(fp_ppl=math.exp(ref_nll_sum / (used * seqlen)), kl=kl_sum / positions,
                      top1_agreement=agree / positions)
    return result
