"""Perplexity (GPTQ protocol) and label-free agreement with the full-precision model.

ppl = exp(Σ_windows NLL_mean(window) · seqlen / (n_windows · seqlen)) over non-overlapping windows,
the tail dropped; each window's mean NLL is kept too. With a reference model, also the mean
KL(P_fp || P_q) of next-token distributions and top-1 agreement, as llama.cpp's --kl-divergence
reports. The reference is the FP model itself, or its log-probabilities recorded before quantization
(FPReference: a float32 file on disk, so the FP model need not stay in memory beside the quantized one).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
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


class FPReference:
    """The FP model's next-token log-probabilities on the evaluation windows of one set, recorded before
    quantization into a float32 .npy file read window by window: the KL and top-1 comparison then needs no
    second copy of the model in memory (the price: windows x (seqlen - 1) x vocab x 4 bytes of disk), and its
    figures equal those against the FP model bit for bit."""

    def __init__(self, path: str | Path, windows: torch.Tensor):
        self.path, self.windows = Path(path), windows
        self.logprobs = np.load(self.path, mmap_mode="r")

    @staticmethod
    def nbytes(windows: torch.Tensor, vocab: int) -> int:
        return windows.shape[0] * (windows.shape[1] - 1) * vocab * 4

    @classmethod
    @torch.no_grad()
    def record(cls, model, windows: torch.Tensor, device, path: str | Path, desc: str = "FP reference") -> "FPReference":
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = None
        for i in tqdm(range(windows.shape[0]), desc=desc, unit="window"):
            logp = F.log_softmax(model(windows[i][None].to(device), use_cache=False).logits[0, :-1].float(), dim=-1)
            if out is None:
                out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                                shape=(windows.shape[0], *logp.shape))
            out[i] = logp.cpu().numpy()
        out.flush()
        del out
        return cls(path, windows)

    def __call__(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        """The recorded log-probabilities of window `index`, which must be `ids` (the same windows, in order)."""
        if not torch.equal(self.windows[index], ids[0].cpu()):
            raise ValueError(f"{self.path}: window {index} is not the window the FP reference recorded")
        return torch.from_numpy(np.array(self.logprobs[index])).to(ids.device)

    def remove(self) -> None:
        self.logprobs = None
        self.path.unlink(missing_ok=True)


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
            ref_logp = (reference(i, ids) if isinstance(reference, FPReference)
                        else F.log_softmax(reference(ids, use_cache=False).logits[0, :-1].float(), dim=-1))
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
