"""Whole-model stages: what runs once after the block loop, on the committed integer codes of every block.

End-to-end refinement (`e2e`, EfficientQAT's E2E-QP): the codes stay frozen and only the quantization step
sizes train, on the whole quantized model against the FP model's next-token distributions on the
calibration samples (KL), or against the calibration text itself (cross-entropy). Block-wise methods minimise
each block's error against its own FP output; the errors they leave add up across blocks, and this is where
they are traded against each other. Each scale is s₀·exp(δ) with δ learned per group (a relative step, so one
learning rate fits every layer and model), rounded to float16 at the end, as every format stores it: what is
trained is what is exported. With `norms`, the gains of every normalisation inside the blocks train too,
each as (offset + g₀)·exp(δ) − offset (the adapter's offset: Gemma's norms scale by 1 + g): a per-channel scale
of the inputs of the linears a norm feeds, which the per-group step sizes of their outputs cannot express. The
gains stay floating point in every export; the final norm is left as it is, since the KL teacher goes through
it.

Memory stays at one block: the forward walks the blocks in order and keeps each one's input (batch x seqlen x
hidden), the head's gradient comes back to the last block's output, and the backward walks the blocks in
reverse, running each again on its stored input with autograd on (activation checkpointing at block
granularity). So the same code serves a model in memory and a streamed one (--stream: each block read from the
store twice per step). A handler is registered under its config's name (REFINERS); the block loop calls
`refine_model` after its last block.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError
from ..models.blocks import block_output, head_logits, non_block_to
from ..quant.packing import PackedLinear, dequantize
from ..quant.qmodules import set_submodule
from ..quant.quantizer import SCALE_FORMAT_KEYS, stored_scale
from ..recipe import StageConfig, register_config
from .trainer import scheduled_lr

log = logging.getLogger("affinequant")

HEAD_CHUNK = 128        # positions per head pass: chunk x vocab logits (and their gradient) instead of a window's


@dataclass
class RefineContext:
    """What a whole-model stage gets from the block loop: the model and its block source (in memory or
    streamed), the calibration token ids, block 0's inputs, the FP model's final hidden states on the same
    samples (the FP trajectory's last block outputs: the KL teacher, without a second model), each block's
    keyword arguments, where to run, and the checkpoint."""
    model: nn.Module
    adapter: object
    blocks: object                     # streaming.InMemoryBlocks or StreamedModel
    samples: torch.Tensor              # (N, L) token ids
    inputs: torch.Tensor               # (N, L, d) block 0's inputs
    fp_final: torch.Tensor             # (N, L, d) the FP model's last block outputs
    block_kwargs: dict
    cfg: object                        # QuantConfig
    device: torch.device
    ctx_factory: object                # autocast context
    grad_scaling: bool = False
    checkpoint: object = None          # CalibrationCheckpoint or None


REFINERS: dict[str, type] = {}


def register_refiner(handler: type) -> type:
    """Class decorator: make a whole-model stage known to recipes under its config's name."""
    config = handler.config_class
    if not config.model_level:
        raise ValueError(f"refiner {config.name!r}: its config must say model_level")
    register_config(config)
    REFINERS[config.name] = handler
    return handler


def refine_model(stages: list, ctx: RefineContext) -> dict:
    """Run the recipe's whole-model stages in order; returns their reports by name."""
    return {config.name: REFINERS[config.name](config).run(ctx) for config in stages}


@dataclass(frozen=True)
class E2EConfig(StageConfig):
    name = "e2e"
    version: ClassVar[int] = 1
    model_level = True
    quantizes_weights = True
    steps: int = 64                    # Adam steps, each on `batch` calibration samples
    lr: float = 2e-3                   # on δ (log-scale): a relative change of the step sizes per step
    batch: int = 1
    loss: str = "kl"                   # "kl": to the FP model's next-token distribution; "ce": the calibration text
    schedule: str = "cosine"           # or "constant"
    save_every: int = 8                # steps between checkpoints of the refinement
    norms: bool = False                # also train the gains of the blocks' norms (floating point, exported as such)

    def __post_init__(self):
        if self.steps < 0 or self.batch < 1 or self.save_every < 1:
            raise ConfigError(f"e2e: steps >= 0, batch >= 1 and save_every >= 1 (got steps {self.steps}, batch "
                              f"{self.batch}, save_every {self.save_every})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"e2e: lr must be a positive number (got {self.lr})")
        if self.loss not in ("kl", "ce"):
            raise ConfigError(f"e2e: loss is 'kl' (to the FP model) or 'ce' (next-token), not {self.loss!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"e2e: schedule is 'cosine' or 'constant', not {self.schedule!r}")


class ScaledCodes(nn.Module):
    """A packed linear while its scales train: the frozen codes and zero points, and scale = s₀·exp(δ) per
    group, δ held by the refiner (not a parameter of the block, so moving the block moves no optimiser
    state). Its weight is `dequantize`, the function every quantized weight goes through."""

    def __init__(self, packed: PackedLinear, codes: torch.Tensor, delta: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.bits, self.group_size, self.zero_offset = packed.bits, packed.group_size, packed.zero_offset
        # buffers, so that moving the block moves them
        self.register_buffer("codes", codes)
        self.register_buffer("zero", packed.zeros())
        self.register_buffer("base", packed.scales.T.float())
        self.register_buffer("bias", None if packed.bias is None else packed.bias.float())
        self.delta = delta

    def scale(self) -> torch.Tensor:
        return self.base * torch.exp(self.delta.to(self.base.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize(self.codes, self.scale(), self.zero, self.group_size, x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def final(self, real_quant: bool, dtype: torch.dtype, scale_format: dict | None = None) -> nn.Module:
        """What the linear becomes: a PackedLinear with the refined scales as the format stores them
        (`scale_format`: quantizer.stored_scale's arguments; default float16) (--real_quant), else an nn.Linear
        whose weight is their dequantized codes."""
        scale = stored_scale(self.scale().detach().cpu(), **(scale_format or {}))
        codes, zero = self.codes.cpu(), self.zero.cpu()
        bias = None if self.bias is None else self.bias.cpu()
        if real_quant:
            return PackedLinear.from_codes(codes, scale, zero, self.bits, self.group_size,
                                           None if bias is None else bias.to(dtype), self.zero_offset)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=dtype)
        linear.weight.data.copy_(dequantize(codes, scale, zero, self.group_size, dtype))
        if bias is not None:
            linear.bias.data.copy_(bias.to(dtype))
        linear.requires_grad_(False)
        return linear


def is_norm(module: nn.Module) -> bool:
    """A normalisation with a per-channel gain: LayerNorm, and the families' RMSNorms (each its own class)."""
    return (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")) and \
        isinstance(getattr(module, "weight", None), torch.Tensor)


class TrainedGain(nn.Module):
    """A norm while its gain trains: the norm's own forward with gain (offset + g₀)·exp(δ) − offset, g₀ the
    stored gain and δ held by the refiner."""

    def __init__(self, norm: nn.Module, delta: torch.Tensor, offset: float):
        super().__init__()
        self.norm, self.delta, self.offset = norm, delta, offset
        self.register_buffer("base", norm.weight.detach().float().clone())

    def gain(self) -> torch.Tensor:
        # g₀ + (offset + g₀)·(exp(δ) − 1): the same value, and exactly g₀ at δ = 0 for any offset
        return self.base + (self.offset + self.base) * torch.expm1(self.delta.to(self.base.device))

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.norm, {"weight": self.gain().to(self.norm.weight.dtype)}, args,
                                          kwargs, strict=False)


@register_refiner
class E2E:
    """End-to-end refinement of the step sizes (module docstring)."""
    config_class = E2EConfig

    def __init__(self, config: E2EConfig):
        self.config = config
        self.deltas: dict[str, torch.Tensor] = {}      # "block.linear" -> δ (out, groups), on the device
        self._codes: dict[str, torch.Tensor] = {}      # unpacked codes, kept for a model held in memory
        self.gains: dict[str, torch.Tensor] = {}       # "block.norm" -> δ of its gain (config.norms)

    # ----- the blocks, with their packed linears in training form --------------------------------------
    def _packed(self, block: nn.Module) -> dict[str, PackedLinear]:
        return {n: m for n, m in block.named_modules() if isinstance(m, PackedLinear)}

    def _norms(self, block: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n, m in block.named_modules() if is_norm(m)} if self.config.norms else {}

    def _open(self, ctx: RefineContext, index: int) -> tuple[nn.Module, dict]:
        """Block `index` on the device in float32, its packed linears replaced by ScaledCodes (and its norms by
        TrainedGain); returns it and the originals (to put back)."""
        block = ctx.blocks.restore(index)
        norms = self._norms(block)
        originals = {**self._packed(block), **norms}
        offset = getattr(ctx.adapter, "norm_weight_offset", 0.0)
        for name, norm in norms.items():
            key = f"{index}.{name}"
            if key not in self.gains:
                self.gains[key] = torch.zeros(norm.weight.shape, device=ctx.device, requires_grad=True)
            set_submodule(block, name, TrainedGain(norm, self.gains[key], offset))
        for name, packed in self._packed(block).items():
            key = f"{index}.{name}"
            codes = self._codes.get(key)
            if codes is None:
                codes = packed.codes().to(torch.uint8 if packed.bits <= 8 else torch.int32)
                if not ctx.blocks.streamed:
                    self._codes[key] = codes
            if key not in self.deltas:
                self.deltas[key] = torch.zeros(packed.scales.T.shape, device=ctx.device, requires_grad=True)
            set_submodule(block, name, ScaledCodes(packed, codes, self.deltas[key]))
        block.to(device=ctx.device, dtype=torch.float32)
        return block, originals

    def _close(self, ctx: RefineContext, index: int, block: nn.Module, originals: dict, dtype: torch.dtype) -> None:
        for name, packed in originals.items():
            set_submodule(block, name, packed)
        block.to(device="cpu", dtype=dtype)
        ctx.blocks.release(index)

    # ----- one step -----------------------------------------------------------------------------------
    def _batch(self, ctx: RefineContext, step: int) -> torch.Tensor:
        """The samples of `step`: a fresh permutation of the calibration set per pass (seeded), so a resumed run
        draws what an uninterrupted one would."""
        n = ctx.samples.shape[0]
        batch = min(self.config.batch, n)
        per_pass = n // batch
        epoch, j = divmod(step, per_pass)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.cfg.seed + 7919 * epoch))
        return perm[j * batch:(j + 1) * batch]

    def _head_loss(self, ctx: RefineContext, idx: torch.Tensor, hidden: torch.Tensor, loss_scale: float) -> float:
        """The loss on the final hidden states `hidden` (a leaf), backpropagated into hidden.grad a chunk of
        positions at a time; returns its value (mean per token)."""
        ids = ctx.samples[idx].to(ctx.device)
        length = ids.shape[1] - (1 if self.config.loss == "ce" else 0)
        tokens = ids.shape[0] * length
        teacher = ctx.fp_final[idx] if self.config.loss == "kl" else None     # one read (a --cache_dir file too)
        total = 0.0
        for start in range(0, length, HEAD_CHUNK):
            stop = min(start + HEAD_CHUNK, length)
            with ctx.ctx_factory():
                logp = F.log_softmax(head_logits(ctx.model, ctx.adapter, ids[:, start:stop],
                                                 hidden[:, start:stop]).float(), dim=-1)
            if self.config.loss == "ce":
                loss = F.nll_loss(logp.flatten(0, 1), ids[:, start + 1:stop + 1].flatten(), reduction="sum")
            else:
                with torch.no_grad(), ctx.ctx_factory():
                    ref = F.log_softmax(head_logits(ctx.model, ctx.adapter, ids[:, start:stop],
                                                    teacher[:, start:stop].to(ctx.device)).float(), dim=-1)
                loss = (ref.exp() * (ref - logp)).sum()
            (loss * (loss_scale / tokens)).backward()
            total += loss.item()
        return total / tokens

    def _step_gradients(self, ctx: RefineContext, idx: torch.Tensor, dtype: torch.dtype, loss_scale: float) -> float:
        """Forward through every block (keeping each one's input), the head's loss, then the backward block by
        block in reverse: δ.grad holds the batch's gradient. Returns the loss."""
        n_blocks = len(ctx.blocks)
        saved = []
        h = ctx.inputs[idx].to(ctx.device, torch.float32)
        with torch.no_grad():
            for index in range(n_blocks):
                saved.append(h)
                block, originals = self._open(ctx, index)
                with ctx.ctx_factory():
                    h = block_output(block(h, **ctx.block_kwargs[index])).float()
                self._close(ctx, index, block, originals, dtype)
        hidden = h.detach().requires_grad_(True)
        loss = self._head_loss(ctx, idx, hidden, loss_scale)
        grad = hidden.grad
        for index in reversed(range(n_blocks)):
            block, originals = self._open(ctx, index)
            x = saved[index].requires_grad_(index > 0)
            with ctx.ctx_factory():
                y = block_output(block(x, **ctx.block_kwargs[index]))
            y.backward(grad.to(y.dtype))
            grad = x.grad if index > 0 else None
            saved[index] = None
            self._close(ctx, index, block, originals, dtype)
        return loss

    # ----- checkpoint ---------------------------------------------------------------------------------
    def _trained(self) -> list[tuple[str, str, torch.Tensor]]:
        """(kind, key, tensor) of everything that trains, in a fixed order: the optimiser's and the file's."""
        return [("delta", k, self.deltas[k]) for k in sorted(self.deltas)] + \
            [("gain", k, self.gains[k]) for k in sorted(self.gains)]

    def _identity(self, ctx: RefineContext) -> dict:
        """What the saved state belongs to: this stage's options and the block loop that made the codes."""
        from ..recipe import recipe_data
        return {"config": self.config.to_dict(), "blocks": recipe_data(ctx.cfg.block_stages()),
                "quant": [ctx.cfg.wbits, ctx.cfg.group_size, ctx.cfg.symmetric, ctx.cfg.seed, ctx.cfg.nsamples,
                          ctx.cfg.seqlen]}

    def _save(self, ctx: RefineContext, optimizer, step: int, report: dict) -> None:
        if not hasattr(ctx.checkpoint, "save_refinement"):      # no checkpoint (or a reference file's)
            return
        tensors = {}
        for kind, key, param in self._trained():
            tensors[f"{kind}.{key}"] = param
            state = optimizer.state.get(param, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state:
                    tensors[f"adam.{name}.{kind}.{key}"] = state[name]
        ctx.checkpoint.save_refinement(self.config.name, tensors, {**self._identity(ctx), "step": step,
                                                                   "report": report})

    def _resume(self, ctx: RefineContext, optimizer) -> tuple[int, dict] | None:
        saved = (ctx.checkpoint.load_refinement(self.config.name) if hasattr(ctx.checkpoint, "load_refinement")
                 else None)
        if saved is None:
            return None
        tensors, state = saved
        if {k: state.get(k) for k in self._identity(ctx)} != json.loads(json.dumps(self._identity(ctx))):
            log.warning("%s: the saved refinement comes from another configuration: starting it again",
                        self.config.name)
            return None
        with torch.no_grad():
            for kind, key, param in self._trained():
                param.copy_(tensors[f"{kind}.{key}"])
                if f"adam.exp_avg.{kind}.{key}" in tensors:
                    optimizer.state[param] = {"step": torch.tensor(float(state["step"])),
                                              "exp_avg": tensors[f"adam.exp_avg.{kind}.{key}"].to(param.device),
                                              "exp_avg_sq": tensors[f"adam.exp_avg_sq.{kind}.{key}"].to(param.device)}
        log.info("%s: resumed at step %d of %d", self.config.name, state["step"], self.config.steps)
        return state["step"], state["report"]

    # ----- the run ------------------------------------------------------------------------------------
    def run(self, ctx: RefineContext) -> dict:
        cfg, config = ctx.cfg, self.config
        t0 = time.time()
        dtype = ctx.model.get_input_embeddings().weight.dtype
        for index in range(len(ctx.blocks)):            # create every δ (and check there is something to refine)
            block, originals = self._open(ctx, index)
            self._close(ctx, index, block, originals, dtype)
        if not self.deltas:
            raise ConfigError(f"{config.name}: the model has no packed linears to refine (no weight was quantized)")
        keys = sorted(self.deltas)
        trained = [param for _, _, param in self._trained()]
        optimizer = torch.optim.Adam(trained, lr=config.lr)
        report = {"losses": [], "skipped_steps": 0, "steps": config.steps}
        start = 0
        resumed = self._resume(ctx, optimizer)
        if resumed is not None:
            start, report = resumed
        loss_scale = 1024.0 if ctx.grad_scaling else 1.0
        ctx.blocks.load_non_block(ctx.samples, head=True)
        non_block_to(ctx.model, ctx.adapter, ctx.device)
        try:
            bar = tqdm(range(start, config.steps), desc=config.name, unit="step", initial=start, total=config.steps)
            for step in bar:
                for group in optimizer.param_groups:
                    group["lr"] = scheduled_lr(config.lr, config.schedule, step, config.steps)
                optimizer.zero_grad(set_to_none=True)
                loss = self._step_gradients(ctx, self._batch(ctx, step), dtype, loss_scale)
                grads = [param.grad for param in trained if param.grad is not None]
                finite = math.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
                if not finite:
                    report["skipped_steps"] += 1
                    log.warning("%s step %d: loss or gradient not finite (%s): step skipped", config.name, step, loss)
                    if report["skipped_steps"] > max(3, config.steps // 4):
                        log.warning("%s: too many non-finite steps; stopping with the scales of step %d",
                                    config.name, step)
                        break
                    continue
                if loss_scale != 1.0:
                    for g in grads:
                        g.div_(loss_scale)
                optimizer.step()
                report["losses"].append(loss)
                bar.set_postfix(loss=f"{loss:.4g}")
                if (step + 1) % config.save_every == 0 and step + 1 < config.steps:
                    self._save(ctx, optimizer, step + 1, report)
        finally:
            non_block_to(ctx.model, ctx.adapter, "cpu")
            ctx.blocks.release_non_block()
        self._save(ctx, optimizer, config.steps, report)
        self._write_back(ctx, dtype)
        deltas = torch.cat([d.detach().flatten().cpu() for d in self.deltas.values()])
        report.update(seconds=time.time() - t0, scale_change_mean_abs=float(deltas.abs().mean()),
                      scale_change_max_abs=float(deltas.abs().max()), linears=len(keys))
        if self.gains:
            gains = torch.cat([g.detach().flatten().cpu() for g in self.gains.values()])
            report.update(gain_change_mean_abs=float(gains.abs().mean()), norms=len(self.gains))
        if report["losses"]:
            log.info("%s: %d steps in %.1fs, loss %.4g -> %.4g (mean |log scale change| %.3g)", config.name,
                     len(report["losses"]), report["seconds"], report["losses"][0], report["losses"][-1],
                     report["scale_change_mean_abs"])
        return report

    @torch.no_grad()
    def _write_back(self, ctx: RefineContext, dtype: torch.dtype) -> None:
        """Each linear becomes its final form with the refined scales; a streamed block is stored again."""
        for index in range(len(ctx.blocks)):
            block = ctx.blocks.restore(index)
            for name, packed in self._packed(block).items():
                key = f"{index}.{name}"
                codes = self._codes.pop(key, None)
                if codes is None:
                    codes = packed.codes()
                trained = ScaledCodes(packed, codes, self.deltas[key].detach())
                grid = ctx.cfg.grid_for(f"{ctx.adapter.layers_path}.{index}.{name}")
                scale_format = {k: grid[k] for k in SCALE_FORMAT_KEYS if k in grid}
                set_submodule(block, name, trained.final(ctx.cfg.real_quant, dtype, scale_format))
            offset = getattr(ctx.adapter, "norm_weight_offset", 0.0)
            for name, norm in self._norms(block).items():
                gain = TrainedGain(norm, self.gains[f"{index}.{name}"].detach(), offset).gain()
                norm.weight.data.copy_(gain.to(norm.weight.device, norm.weight.dtype))
            ctx.blocks.finished(index)
