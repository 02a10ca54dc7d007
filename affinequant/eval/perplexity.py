"""Perplexity (GPTQ protocol) and label-free agreement with the full-precision model.

ppl = exp(Σ_windows NLL_mean(window) · seqlen / (n_windows · seqlen)) over non-overlapping windows,
the tail dropped; each window's mean NLL is kept too. With a reference model, also the mean
KL(P_fp || P_q) of next-token distributions and top-1 agreement, as llama.cpp's --kl-divergence
reports. The reference is the FP model itself, or its log-probabilities recorded before quantization
(FPReference: a float32 file on disk, so the FP model need not stay in memory beside the quantized one).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.blocks import capture_block_arguments, head_logits, non_block_to, run_block

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


class WindowScores:
    """What a perplexity evaluation adds up, window by window: the NLL, and against a reference the KL of the
    next-token distributions and the top-1 agreement."""

    def __init__(self, seqlen: int):
        self.seqlen = seqlen
        self.nll_sum = self.ref_nll_sum = self.kl_sum = 0.0
        self.window_nll = []       # per window, so that two runs can be compared window by window (paired)
        self.agree = self.positions = 0
        self.with_reference = False

    def add(self, logp: torch.Tensor, target: torch.Tensor, ref_logp: torch.Tensor | None = None) -> None:
        """logp, ref_logp: (positions, vocab) log-probabilities of the next token; target: (positions,)."""
        self.add_window([(logp, target, ref_logp)])

    def add_window(self, chunks) -> None:
        """One window given as consecutive chunks of positions (logp, target, ref_logp or None): the same
        figures as the whole window at once, with only a chunk's logits alive at a time."""
        nll, ref_nll, kl, agree = [], [], [], 0
        for logp, target, ref_logp in chunks:
            nll.append(-logp.gather(1, target[:, None])[:, 0])
            if ref_logp is not None:
                ref_nll.append(-ref_logp.gather(1, target[:, None])[:, 0])
                kl.append(self._kl_rows(logp, ref_logp))
                agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        nll = torch.cat(nll)
        self.window_nll.append(nll.mean().item())
        self.nll_sum += self.window_nll[-1] * self.seqlen
        if ref_nll:
            self.with_reference = True
            self.ref_nll_sum += torch.cat(ref_nll).mean().item() * self.seqlen
            self.kl_sum += torch.cat(kl).sum().item()
            self.agree += agree
            self.positions += nll.numel()

    @staticmethod
    def _kl_rows(logp: torch.Tensor, ref_logp: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """KL(P_ref || P) of each position, a few positions at a time: the temporaries stay chunk x vocab
        (at a 150k vocabulary and 2048 positions, whole-window temporaries would be 1.2 GB each)."""
        return torch.cat([(r.exp() * (r - q)).sum(-1) for q, r in zip(logp.split(chunk), ref_logp.split(chunk))])

    def result(self, windows_total: int, seconds: float) -> dict:
        used = len(self.window_nll)
        result = {"ppl": math.exp(self.nll_sum / (used * self.seqlen)), "windows": used,
                  "windows_total": windows_total, "seqlen": self.seqlen, "seconds": seconds,
                  "window_nll": self.window_nll}
        if self.with_reference:
            result.update(fp_ppl=math.exp(self.ref_nll_sum / (used * self.seqlen)), kl=self.kl_sum / self.positions,
                          top1_agreement=self.agree / self.positions)
        return result


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(1, L, vocab) logits -> (L - 1, vocab) float32 log-probabilities of each next token."""
    return F.log_softmax(logits[0, :-1].float(), dim=-1)


def _windows_of(tokens: torch.Tensor, seqlen: int, limit: int | None, desc: str) -> tuple[torch.Tensor, int]:
    windows = eval_windows(tokens, seqlen, limit)
    n_windows = tokens.numel() // seqlen
    if windows.shape[0] < n_windows:
        log.info("%s: --limit %d evaluates the first %d of %d windows", desc, limit, windows.shape[0], n_windows)
    return windows, n_windows


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, device, limit: int | None = None,
               reference=None, desc: str = "ppl") -> dict:
    windows, n_windows = _windows_of(tokens, seqlen, limit, desc)
    scores = WindowScores(seqlen)
    t0 = time.time()
    for i in tqdm(range(windows.shape[0]), desc=desc, unit="window"):
        ids = windows[i][None].to(device)
        logp = _log_probs(model(ids, use_cache=False).logits)
        ref_logp = None
        if reference is not None:
            ref_logp = (reference(i, ids) if isinstance(reference, FPReference)
                        else _log_probs(reference(ids, use_cache=False).logits))
        scores.add(logp, ids[0, 1:], ref_logp)
    return scores.result(n_windows, time.time() - t0)


@torch.no_grad()
def _streamed_hidden(model, adapter, windows: torch.Tensor, device, load, release, dtype, desc: str) -> torch.Tensor:
    """The last block's outputs for every window (windows, L, d), walking the blocks one at a time: `load(i)`
    gives block i, `release(i)` drops it. Each window runs alone, as in `perplexity`: the same sums."""
    import contextlib
    hidden, kwargs = capture_block_arguments(model, adapter, windows, device, dtype)
    for index in tqdm(range(len(adapter.layers(model))), desc=desc, unit="block"):
        block = load(index)
        block.to(device)
        hidden = run_block(block, hidden, kwargs[index], 1, device, contextlib.nullcontext)
        block.to("cpu")
        release(index)
    return hidden


HEAD_CHUNK = 128     # positions per head evaluation: 128 x vocab logits (78 MB at Qwen's 152k) instead of a window's


@torch.no_grad()
def _head_log_probs(model, adapter, ids: torch.Tensor, hidden: torch.Tensor, chunk: int):
    """The model's own head (final norm, output embedding, soft-capping...) on stored final hidden states, a
    chunk of positions at a time: yields the log-probabilities of the next token at positions [c, c + chunk)
    (the window's last position predicts nothing)."""
    last = ids.shape[1] - 1
    for start in range(0, last, chunk):
        stop = min(start + chunk, last)
        logits = head_logits(model, adapter, ids[:, start:stop], hidden[:, start:stop])
        yield F.log_softmax(logits[0].float(), dim=-1)


@torch.no_grad()
def streamed_perplexity(blocks, adapter, tokens: torch.Tensor, seqlen: int, device, limit: int | None = None,
                        with_reference: bool = False, desc: str = "ppl") -> dict:
    """`perplexity` of a streamed model (streaming.StreamedModel), block by block over all windows: the
    quantized blocks are read back from the store one at a time; with `with_reference`, the FP blocks from the
    checkpoint too (the KL reference re-read from disk, never a second model in memory). Equal to `perplexity`
    of the same model held in memory, bit for bit on the CPU."""
    windows, n_windows = _windows_of(tokens, seqlen, limit, desc)
    t0 = time.time()
    model = blocks.model
    blocks.load_non_block(windows)          # the embedding rows of these windows; no head yet
    try:
        final = _streamed_hidden(model, adapter, windows, device, blocks.restore, blocks.release, blocks.dtype, desc)
        ref_final = None
        if with_reference:
            ref_final = _streamed_hidden(blocks.fp_model, adapter, windows, device, blocks.fp_block, blocks.release_fp,
                                         blocks.dtype, f"{desc} (FP)")
        blocks.load_non_block(windows, head=True)
        non_block_to(model, adapter, device)
        scores = WindowScores(seqlen)
        for i in range(windows.shape[0]):
            ids = windows[i][None].to(device)
            heads = _head_log_probs(model, adapter, ids, final[i:i + 1].to(device), HEAD_CHUNK)
            ref_heads = (_head_log_probs(model, adapter, ids, ref_final[i:i + 1].to(device), HEAD_CHUNK)
                         if ref_final is not None else itertools.repeat(None))
            targets = ids[0, 1:].split(HEAD_CHUNK)
            scores.add_window((logp, target, ref_logp) for logp, target, ref_logp in zip(heads, targets, ref_heads))
    finally:
        non_block_to(model, adapter, "cpu")
        blocks.release_non_block()
    return scores.result(n_windows, time.time() - t0)
