"""The block-wise pipeline: capture the inputs of block 0, then for each block compute the
full-precision target, learn the block's LWC/LET parameters against it, merge them, quantize
the weights and propagate the quantized trajectory to the next block.

What is learned inside a block lives in `BlockQuantizer`; this module only walks blocks and
moves activations, so other algorithms can run inside the same loop.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .config import QuantConfig
from .qmodules import TransformedNorm, install_quantizers, set_submodule, use_quantized_attention
from .packing import PackedLinear, dequantize
from .quantizer import WeightQuantizer
from .transforms import LET
from .utils import memory_report

log = logging.getLogger("affinequant")


class _StopForward(Exception):
    pass


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The block objective. "mse" is OmniQuant's. "token_rel" is each token's squared error divided by
    its target's squared norm, averaged over tokens: every later reader sees the residual stream
    through an RMSNorm, so what matters per token is the relative error. Under plain MSE, a model
    with an attention sink (Qwen2.5: the first token holds 68-93% of the residual stream's energy
    in blocks 3-18) spends the whole budget on that one token.
    "token_cos" is each token's 1 - cos(output, target), averaged: the error in the direction the next
    RMSNorm passes on. It is bounded by 2 per token, so a token the quantized trajectory has pushed far
    off (a spurious sink, relative error ~1e3) cannot dominate it as it dominates token_rel."""
    if kind == "mse":
        return F.mse_loss(out, target)
    if kind == "token_cos":
        return (1 - F.cosine_similarity(out, target, dim=-1, eps=1e-12)).mean()
    err = (out - target).pow(2).sum(-1)
    return (err / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


def non_block_to(model: nn.Module, adapter: Adapter, device) -> None:
    """Move everything except the decoder blocks (embeddings, final norm, rotary tables, head)."""
    prefix = adapter.layers_path + "."
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(prefix):
            tensor.data = tensor.data.to(device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: Adapter, samples: torch.Tensor, device,
                         cache_dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """Run the model up to block 0 for every sample; return its inputs (N, L, d) and the
    keyword arguments the model passes to its blocks (mask, position embeddings...)."""
    layers = adapter.layers(model)
    inputs = []
    block_kwargs: dict = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(hidden.detach().to(cache_dtype))
        if not block_kwargs:
            block_kwargs.update({k: v for k, v in kwargs.items()
                                 if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    non_block_to(model, adapter, device)
    try:
        for sample in samples:
            try:
                model(sample[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        non_block_to(model, adapter, "cpu")
    return torch.cat(inputs), block_kwargs


@dataclass
class BlockReport:
    index: int
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    final_mse: float = float("nan")
    nan_events: int = 0
    let_init: str = ""
    matrix_health: list[dict] = field(default_factory=list)
    fell_back_to_rtn: bool = False


class BlockQuantizer:
    """Quantizes one decoder block in place: LWC on every linear's weight, LET between the
    producers and consumers the adapter declares, per-token activation quantizers."""

    def __init__(self, block: nn.Module, adapter: Adapter, model_config, cfg: QuantConfig,
                 act_scales: dict | None, act_shifts: dict | None):
        self.block, self.adapter, self.cfg = block, adapter, cfg
        self.linears = install_quantizers(block, adapter, cfg.abits, cfg.symmetric, lambda w: (
            WeightQuantizer(tuple(w.shape), cfg.wbits, cfg.group_size, cfg.symmetric, cfg.lwc) if cfg.wbits < 16 else None))
        self.let = None
        if cfg.let:
            for norm_name, _ in adapter.norm_groups:
                set_submodule(block, norm_name, TransformedNorm(block.get_submodule(norm_name)))
            use_shift = adapter.norm_has_bias and cfg.abits < 16   # as OmniQuant: shifts only where a norm bias absorbs them
            self.let = LET(block, adapter, model_config, cfg.alpha, act_scales, act_shifts, use_shift,
                           ln_matrix=cfg.use_ln_matrix, affine=cfg.affine, qk_matrix=cfg.use_matrix, sf=cfg.stability_factor,
                           qk_from_stats=cfg.qk_init == "stats")
        for p in block.parameters():
            p.requires_grad_(False)

    def let_parameters(self) -> list[nn.Parameter]:
        return list(self.let.parameters()) if self.let is not None else []

    def lwc_parameters(self) -> list[nn.Parameter]:
        return [p for q in self.linears.values() if q.weight_quantizer is not None
                for p in (q.weight_quantizer.upbound_factor, q.weight_quantizer.lowbound_factor) if p is not None]

    def trainable(self) -> list[nn.Parameter]:
        return self.let_parameters() + self.lwc_parameters()

    def refresh(self) -> None:
        """Recompute the transformed weights from the current parameters (once per step)."""
        if self.let is not None:
            self.let.apply(self.block, merge=False)

    def loss(self, inputs, targets: list, kwargs, device) -> torch.Tensor:
        """The block objective on one batch: refresh the transforms, run the quantized block on
        `inputs`, and sum block_loss against each of `targets` (the FP outputs, and with --aug_loss
        the FP block applied to the quantized inputs). Call inside the autocast context."""
        self.refresh()
        out = _block_output(self.block(inputs.to(device), **kwargs)).float()
        return sum(block_loss(out, t.to(device).float(), self.cfg.loss) for t in targets)

    @torch.no_grad()
    def choose_let_init(self, inputs, targets, kwargs, device, ctx_factory, probe: int = 4) -> str:
        """Start LET from the SmoothQuant initialisation or from the identity, whichever gives the lower
        block loss on the first `probe` samples (a guard in the spirit of AWQ's scale search: with
        outlier-heavy blocks and short budgets the migration can start worse than no transform at all)."""
        def loss() -> float:
            total = 0.0
            for i in range(min(probe, inputs.shape[0])):
                with ctx_factory():
                    total += self.loss(inputs[i:i + 1], [targets[i:i + 1]], kwargs, device).item()
            return total
        smooth_state = {k: v.clone() for k, v in self.let.state_dict().items()}
        smooth = loss()
        self.let.reset_to_identity()
        identity = loss()
        if smooth <= identity:
            self.let.load_state_dict(smooth_state)
            return "smoothquant"
        return "identity"

    def start_epoch(self, epoch: int) -> dict:
        """Unlock this epoch's bands of the AffineQuant masks; returns the matrices' health."""
        return self.let.set_epoch(epoch, self.cfg.epochs) if self.let is not None else {}

    def state(self) -> dict[str, torch.Tensor]:
        """Everything learned in this block: what a checkpoint stores to rebuild it exactly."""
        out = {f"lwc.{name}.{side}": getattr(q.weight_quantizer, side) for name, q in self.linears.items()
               if q.weight_quantizer is not None for side in ("upbound_factor", "lowbound_factor")
               if getattr(q.weight_quantizer, side) is not None}
        if self.let is not None:
            out.update({f"let.{k}": v for k, v in self.let.state_dict().items()})
            out.update(self.let.mask_state())
        return out

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state())
        if set(state) != expected:
            raise ValueError(f"checkpointed block does not match this configuration: "
                             f"missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}")
        for key, value in state.items():
            if key.startswith("lwc."):
                name, side = key[4:].rsplit(".", 1)
                getattr(self.linears[name].weight_quantizer, side).copy_(value)
        if self.let is not None:
            self.let.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("let.")})
            self.let.restore_mask(state)

    @torch.no_grad()
    def finalize(self) -> None:
        """Merge the transforms (with the mask training ended on), store fake-quantized weights,
        drop what training needed."""
        if self.let is not None:
            self.let.apply(self.block, merge=True)
            for norm_name, _ in self.adapter.norm_groups:
                wrapper = self.block.get_submodule(norm_name)
                if wrapper.inverse is None:          # folded into the norm: back to the stock module
                    set_submodule(self.block, norm_name, wrapper.norm)
        for name, qlinear in self.linears.items():
            wq = qlinear.weight_quantizer
            qlinear.weight_quantizer = None
            if wq is not None:
                # Scales are rounded to fp16, as every deployment format stores them, and the weight is
                # rebuilt by the same `dequantize` a packed layer uses: fake-quant and packed agree bit for bit.
                codes, scale, zero = wq.integer_codes(qlinear.weight.float())
                scale = scale.half().float()
                if self.cfg.real_quant:
                    bias = None if qlinear.bias is None else qlinear.bias.detach()
                    packed = PackedLinear.from_codes(codes, scale, zero, wq.bits, wq.group_size, bias,
                                                     zero_offset=0 if int(zero.min()) < 1 else 1)
                    set_submodule(self.block, name, packed)
                    continue
                qlinear.weight.data.copy_(dequantize(codes, scale, zero, wq.group_size, qlinear.weight.dtype))
            if qlinear.act_quantizer is None:     # weight-only: a plain nn.Linear, loadable by anything
                set_submodule(self.block, name, qlinear.to_linear())


def amp_context(device: torch.device, cfg: QuantConfig, dtype: torch.dtype):
    if device.type == "cuda" and not cfg.deactive_amp:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def run_block(block, inputs: torch.Tensor, kwargs: dict, batch_size: int, device, ctx_factory) -> torch.Tensor:
    outs = torch.empty_like(inputs)
    for i in range(0, inputs.shape[0], batch_size):
        with ctx_factory():
            x = inputs[i:i + batch_size].to(device)
            outs[i:i + batch_size] = _block_output(block(x, **kwargs)).to(outs.dtype)
    return outs


def train_block(bq: BlockQuantizer, q_inps, targets, aug_targets, kwargs, cfg: QuantConfig, device,
                ctx_factory, report: BlockReport, progress_desc: str) -> None:
    params = [{"params": bq.let_parameters(), "lr": cfg.let_lr}, {"params": bq.lwc_parameters(), "lr": cfg.lwc_lr}]
    params = [g for g in params if g["params"]]
    for g in params:
        for p in g["params"]:
            p.requires_grad_(True)
    initial = [p.detach().clone() for g in params for p in g["params"]]
    lr_scale = 1.0
    use_scaler = device.type == "cuda" and not cfg.deactive_amp
    n = q_inps.shape[0]
    epoch = 0

    def make_optimizer():  # a fresh one per block, and after each NaN rollback at the lowered LR
        return torch.optim.AdamW([{**g, "lr": g["lr"] * lr_scale} for g in params], weight_decay=cfg.wd)

    optimizer = make_optimizer()
    while epoch < cfg.epochs:
        health = bq.start_epoch(epoch)
        if health:
            report.matrix_health.append(health)
            log.info("%s epoch %d: bands %d/%d, sf %s, %s", progress_desc, epoch, health["ln_bands"],
                     health["head_bands"], health["sf"],
                     ", ".join(f"{k} dominance {v['dominance']:.3g} cond {v['cond']:.3g}"
                               for k, v in health.items() if isinstance(v, dict)))
        good = [p.detach().clone() for g in params for p in g["params"]]
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        t0, total, finite = time.time(), 0.0, True
        for i in range(0, n, cfg.batch_size):
            batch = slice(i, i + cfg.batch_size)
            with ctx_factory():
                loss = bq.loss(q_inps[batch], [t[batch] for t in (targets, aug_targets) if t is not None],
                               kwargs, device)
            if not torch.isfinite(loss):
                finite = False
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item()
        if not finite:
            report.nan_events += 1
            _restore(params, good)
            if report.nan_events > cfg.max_nan_retries:
                _restore(params, initial)
                report.fell_back_to_rtn = True
                log.warning("%s: loss is NaN/Inf again after %d retries: keeping the block's initial parameters "
                            "(round-to-nearest weights, and the initial LET scales when --let)",
                            progress_desc, cfg.max_nan_retries)
                break
            lr_scale *= 0.5
            optimizer = make_optimizer()
            log.warning("%s epoch %d: loss is NaN/Inf; rolled back to the epoch's start, learning rates x%.3g, retrying",
                        progress_desc, epoch, lr_scale)
            continue
        steps = math.ceil(n / cfg.batch_size)
        report.losses.append(total / steps)
        log.info("%s epoch %d/%d  loss %.6g  %.1fs  %s", progress_desc, epoch + 1, cfg.epochs,
                 total / steps, time.time() - t0, memory_report(device))
        epoch += 1
    for g in params:
        for p in g["params"]:
            p.requires_grad_(False)


def _restore(params, values) -> None:
    with torch.no_grad():
        for p, v in zip((p for g in params for p in g["params"]), values):
            p.copy_(v)


def quantize_blocks(model: nn.Module, adapter: Adapter, samples: torch.Tensor, cfg: QuantConfig,
                    device: torch.device, act_scales: dict | None = None,
                    act_shifts: dict | None = None, amp_dtype: torch.dtype = torch.float16,
                    checkpoint=None) -> list[BlockReport]:
    """Quantize `model` in place, block by block, on `device`; the model itself stays on the CPU.
    With a CalibrationCheckpoint, each block's learned parameters are saved once it is done, and
    blocks already in it are rebuilt from their parameters instead of trained."""
    cfg.validate()
    cache_dtype = amp_dtype if device.type == "cuda" and not cfg.deactive_amp else torch.float32
    model.config.use_cache = False
    if cfg.abits < 16:
        use_quantized_attention(model)
    q_inps, kwargs = capture_block_inputs(model, adapter, samples, device, cache_dtype)
    fp_inps = q_inps.clone()
    ctx = lambda: amp_context(device, cfg, amp_dtype)  # noqa: E731
    layers = adapter.layers(model)
    reports = []
    bar = tqdm(range(len(layers)), desc="blocks", unit="block")
    for index in bar:
        t0 = time.time()
        block = layers[index]
        orig_dtype = next(block.parameters()).dtype
        block.to(device=device, dtype=torch.float32)
        fp_outs = run_block(block, fp_inps, kwargs, cfg.batch_size, device, ctx)
        aug = run_block(block, q_inps, kwargs, cfg.batch_size, device, ctx) if cfg.aug_loss and cfg.trains else None
        prefix = f"{adapter.layers_path}.{index}."
        bq = BlockQuantizer(block, adapter, model.config, cfg,
                            _block_stats(act_scales, prefix), _block_stats(act_shifts, prefix))
        report = BlockReport(index)
        if checkpoint is not None and checkpoint.done(index):
            state, saved = checkpoint.load(index)
            bq.load_state({k: v.to(device) for k, v in state.items()})
            report.losses, report.nan_events = saved.get("losses", []), saved.get("nan_events", 0)
            report.fell_back_to_rtn = saved.get("fell_back_to_rtn", False)
            log.info("block %d: parameters restored from %s", index, checkpoint.path(index))
        else:
            if cfg.trains:
                if bq.let is not None:
                    report.let_init = bq.choose_let_init(q_inps, fp_outs, kwargs, device, ctx)
                    if report.let_init == "identity":
                        log.info("block %d: LET starts from the identity (lower block loss than the SmoothQuant "
                                 "initialisation)", index)
                train_block(bq, q_inps, fp_outs, aug, kwargs, cfg, device, ctx, report, f"block {index}")
            if checkpoint is not None:
                checkpoint.save(index, bq.state(), {"losses": report.losses, "nan_events": report.nan_events,
                                                    "fell_back_to_rtn": report.fell_back_to_rtn})
        bq.finalize()
        q_inps = run_block(block, q_inps, kwargs, cfg.batch_size, device, ctx)
        report.final_mse = F.mse_loss(q_inps.float(), fp_outs.float()).item()
        fp_inps = fp_outs
        block.to(device="cpu", dtype=orig_dtype)
        report.seconds = time.time() - t0
        reports.append(report)
        bar.set_postfix(mse=f"{report.final_mse:.3g}")
        log.info("block %d done in %.1fs: output MSE vs full precision %.6g", index, report.seconds, report.final_mse)
        del bq, fp_outs, aug
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return reports


def _block_stats(stats: dict | None, prefix: str) -> dict | None:
    if stats is None:
        return None
    return {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}
