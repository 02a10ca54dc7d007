"""The block-wise pipeline: capture the inputs of block 0, then for each block compute the
full-precision target, run the recipe's stages on it (prepare, train, merge, round), checkpoint
what they learned, and propagate the quantized trajectory to the next block.

The algorithms are stages (affinequant.stages), built from the run's recipe; this module walks
blocks, owns the activations, and calls the stages' hooks. It names no algorithm.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..models.activations import mean_squared_error
from ..models.blocks import capture_block_arguments, run_block
from ..models.adapters import Adapter
from ..config import ConfigError, QuantConfig
from ..stages.losses import BlockObjective, objective_on
from ..models.moe import expert_report, reset_expert_counts, unpack_experts
from ..quant.packing import PackedLinear, dequantize
from ..quant.qmodules import install_quantizers, set_submodule, use_quantized_attention
from ..quant.quantizer import WeightQuantizer
from ..stages import STAGES, BlockContext, BlockData
from .refine import RefineContext, refine_model
from .trainer import train_block
from ..utils import round_to_half_

log = logging.getLogger("affinequant")


@dataclass
class BlockReport:
    index: int
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    final_mse: float = float("nan")
    nan_events: int = 0
    fell_back_to_rtn: bool = False
    divergence_events: int = 0
    restored: bool = False                          # rebuilt from a checkpoint, not trained in this run
    experts: dict | None = None                     # MoE: tokens routed to each expert (moe.expert_report)
    stages: dict = field(default_factory=dict)      # each stage's report, by stage name


class BlockQuantizer:
    """One decoder block under a recipe: every linear becomes a QuantLinear with the run's weight and
    activation quantizers, then each stage of the recipe attaches itself in order. The hooks below
    fan out to the stages; `finalize` merges them and has the rounder commit the integer codes."""

    def __init__(self, block: nn.Module, adapter: Adapter, model_config, cfg: QuantConfig,
                 act_scales: dict | None, act_shifts: dict | None, stages: list | None = None, index: int = 0):
        self.block, self.adapter, self.cfg = block, adapter, cfg
        self.linears = install_quantizers(block, adapter, cfg.abits, cfg.symmetric, lambda name, w: (
            WeightQuantizer(tuple(w.shape), **cfg.grid_for(f"{adapter.layers_path}.{index}.{name}"),
                            reference=cfg.reference_compat, balanced=cfg.bit_balance)
            if cfg.wbits < 16 else None), reference=cfg.reference_compat, q_bits=cfg.q_width, kv_bits=cfg.kv_width)
        ctx = BlockContext(block, adapter, model_config, cfg, self.linears, act_scales, act_shifts, index)
        self.stages = [STAGES[c.name](c, ctx) for c in (stages if stages is not None else cfg.block_stages())]
        self.objective = BlockObjective.parse(cfg.loss)
        # packed layers hold the committed codes: for --real_quant, and for a whole-model stage that refines them
        self.keeps_codes = cfg.real_quant or bool(cfg.model_stages())
        self.round_to_nearest: set[str] = set()     # linears with no calibration data (unrouted MoE experts)
        self.train_forward = None                   # the training steps' forward (trainer.CompiledForward), or the block
        for p in block.parameters():
            p.requires_grad_(False)

    @property
    def let(self):
        """The LET / AffineQuant transform module, when the recipe has one (tests and diagnostics)."""
        return next((s.let for s in self.stages if hasattr(s, "let")), None)

    def param_groups(self) -> list[dict]:
        return [g for s in self.stages for g in s.param_groups()]

    def trainable(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups() for p in g["params"]]

    def prepare(self, data: BlockData) -> None:
        for stage in self.stages:
            stage.prepare(self, data)

    def refresh(self) -> None:
        """Recompute the transformed weights from the stored weights and the current parameters (once per
        step): each stage in recipe order rewrites the temp weights of the linears it transforms, starting
        from what the stages before it left."""
        for linear in self.linears.values():
            linear.temp_weight = linear.temp_bias = None
        for stage in self.stages:
            stage.refresh()

    def loss(self, data: BlockData, batch) -> torch.Tensor:
        """The block objective (--loss) on the samples `batch` (a slice or indices) of `data`: refresh the
        transforms, then `objective_on`. Call inside the autocast context."""
        self.refresh()
        return objective_on(self.train_forward or self.block, data, batch, self.objective)

    def start_epoch(self, epoch: int) -> dict:
        """Every stage's schedule hook; returns what they report (AffineQuant: the matrices' health)."""
        return {s.config.name: h for s in self.stages if (h := s.start_epoch(epoch, self.cfg.epochs))}

    def state(self) -> dict[str, torch.Tensor]:
        """Everything learned in this block: what a checkpoint stores to rebuild it exactly."""
        return {k: v for s in self.stages for k, v in s.state().items()}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore every stage. A rounder's keys (its learned rounding, e.g. TesseraQ's codes) are optional:
        without them it rounds anew, and another rounder's are ignored (a rebuild with --epochs 0 may round
        another way)."""
        rounders = {name for name, cls in STAGES.items() if cls.config_class.is_rounder}
        own_rounder = self.stages[-1].config.name
        rounder_state = {k: v for k, v in state.items() if k.split(".", 1)[0] == own_rounder}
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in rounders}
        if rounder_state:
            self.stages[-1].load_state(rounder_state)
        expected = {k for s in self.stages[:-1] for k in s.state()}
        if set(state) != expected:
            raise ValueError(f"checkpointed block does not match this configuration: "
                             f"missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}")
        for stage in self.stages[:-1]:
            own = set(stage.state())
            stage.load_state({k: v for k, v in state.items() if k in own})

    def report(self) -> dict:
        return {s.config.name: r for s in self.stages if (r := s.report())}

    @torch.no_grad()
    def finalize(self, data: BlockData | None = None) -> None:
        """Merge every stage (with the mask training ended on), have the rounder commit each linear's
        integer codes, then replace each linear by what it has become: a packed layer (--real_quant),
        a plain nn.Linear (weight-only), or a QuantLinear that keeps its activation quantizer.
        `data` is the block's calibration data, for rounders that need it (GPTQ)."""
        for stage in self.stages:
            stage.merge()
        for linear in self.linears.values():
            linear.temp_weight = linear.temp_bias = None
        committed: dict[str, tuple] = {}

        def commit(name: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
            # The weight is rebuilt by the same `dequantize` a packed layer uses, from the rounder's scales
            # (fp16 values, as every deployment format stores them, except under --reference_compat without
            # --real_quant): fake-quant and packed agree bit for bit.
            qlinear = self.linears[name]
            wq = qlinear.weight_quantizer
            if self.cfg.real_quant and (int(zero.min()) < 0 or int(zero.max()) > wq.qmax):
                raise ConfigError(f"{name}: a group's zero point lies outside the {wq.bits}-bit grid (the reference "
                                  f"code's range convention, --reference_compat), which the GPTQ layout cannot "
                                  f"store: drop --real_quant or --reference_compat")
            qlinear.weight.data.copy_(dequantize(codes, scale, zero, wq.group_size, qlinear.weight.dtype))
            qlinear.weight_quantizer = None
            committed[name] = (codes, scale, zero, wq)

        for name in sorted(self.round_to_nearest):      # no data to learn from: plain min-max grid, nearest codes
            wq = self.linears[name].weight_quantizer
            if wq is not None:
                plain = WeightQuantizer(wq.shape, wq.bits, wq.group_size, wq.symmetric, reference=wq.reference,
                                        balanced=wq.balanced, **wq.scale_format)
                commit(name, *plain.rounded_to_nearest(self.linears[name].weight.float()))
        rounder = self.stages[-1]
        rounder.round(self, data, commit)
        missing = [n for n, q in self.linears.items() if q.weight_quantizer is not None]
        if missing:
            raise RuntimeError(f"rounder {rounder.config.name} left {missing} unrounded")
        for name, qlinear in self.linears.items():
            if name in committed and self.keeps_codes:
                codes, scale, zero, wq = committed[name]
                bias = None if qlinear.bias is None else qlinear.bias.detach()
                set_submodule(self.block, name, PackedLinear.from_codes(
                    codes, scale, zero, wq.storage_bits, wq.group_size, bias, zero_offset=0 if int(zero.min()) < 1 else 1))
            elif qlinear.act_quantizer is None and qlinear.online is None:  # weight-only: a plain nn.Linear
                set_submodule(self.block, name, qlinear.to_linear())


def amp_active(device: torch.device, cfg: QuantConfig, dtype: torch.dtype) -> bool:
    """Autocast during calibration: on CUDA unless --deactive_amp (float16, or bfloat16 with --dtype bfloat16),
    and on the CPU with bfloat16 (--dtype bfloat16), so the path GPU users run is the path CI tests."""
    return not cfg.deactive_amp and (device.type == "cuda" or dtype == torch.bfloat16)


def amp_context(device: torch.device, cfg: QuantConfig, dtype: torch.dtype):
    if amp_active(device, cfg, dtype):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def quantize_blocks(model: nn.Module, adapter: Adapter, samples: torch.Tensor, cfg: QuantConfig,
                    device: torch.device, act_scales: dict | None = None,
                    act_shifts: dict | None = None, amp_dtype: torch.dtype = torch.float16,
                    checkpoint=None, blocks=None, cache_dir=None, compile_block: bool = False) -> list[BlockReport]:
    """Quantize `model` in place, block by block, on `device`; the model itself stays on the CPU.
    With a CalibrationCheckpoint, each block's learned parameters are saved once it is done, and
    blocks already in it are rebuilt from their parameters instead of trained. `blocks`: where the blocks
    come from and go (streaming.StreamedModel: read from the checkpoint, written out when done); default
    the model's own. `cache_dir`: the activation caches live in files there (activations.py). `compile_block`:
    the training steps run each block through torch.compile (trainer.CompiledForward)."""
    from .streaming import InMemoryBlocks
    blocks = blocks or InMemoryBlocks(model, adapter)
    cfg.validate()
    model.config.use_cache = False
    prepare_attention(model, cfg)
    if cfg.reference_compat:
        round_to_half_(model)       # the reference loads its model in float16 (and calibrates in float32)
    data_parallel = distributed.active()
    if data_parallel:
        check_data_parallel(cfg)
        samples = samples[distributed.shard(samples.shape[0], cfg.batch_size)]
        log.info("data-parallel calibration: rank %d of %d, %d samples", distributed.rank(), distributed.world(),
                 samples.shape[0])
    runner = BlockRunner(model.config, adapter, cfg, device, amp_dtype, act_scales, act_shifts,
                         data_parallel=data_parallel, compile_block=compile_block)
    with blocks.non_block(samples):
        q_inps, block_kwargs = capture_block_arguments(model, adapter, samples, device, runner.cache_dtype,
                                                       cache_dir=cache_dir)
    fp_inps = q_inps.clone()
    model_stages = cfg.model_stages()
    first_inputs = q_inps.clone() if model_stages else None
    reports = CalibrationReports()
    log.info("recipe: %s", " -> ".join(s.name for s in runner.stages))
    bar = tqdm(range(len(blocks)), desc="blocks", unit="block")
    for index in bar:
        report, q_inps, fp_inps = runner.quantize(blocks.block(index), index, q_inps, fp_inps, block_kwargs[index],
                                                  checkpoint)
        blocks.finished(index)
        reports.append(report)
        bar.set_postfix(mse=f"{report.final_mse:.3g}")
    if model_stages:
        del q_inps
        reports.refinement = refine_model(model_stages, RefineContext(
            model, adapter, blocks, samples, first_inputs, fp_inps, block_kwargs, cfg, device, runner.ctx,
            runner.grad_scaling, checkpoint))
    if cfg.reference_compat:
        round_to_half_(model)       # the reference's model.half() after the last block
    return reports


class CalibrationReports(list):
    """The blocks' reports in order, and what the whole-model stages reported (by stage name)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.refinement: dict = {}


def check_data_parallel(cfg: QuantConfig) -> None:
    """What data-parallel calibration (distributed.py) needs: a global batch that splits over the ranks."""
    world = distributed.world()
    model_stages = cfg.model_stages()
    if model_stages:
        raise ConfigError(f"{model_stages[0].name} runs on one process: drop it from the recipe for a "
                          f"data-parallel calibration, or calibrate on one device")
    if cfg.batch_size % world:
        raise ConfigError(f"--batch_size {cfg.batch_size} does not split over {world} ranks: give a multiple of "
                          f"{world} (each rank takes batch_size / {world} samples per step)")


def prepare_attention(model: nn.Module, cfg: QuantConfig) -> None:
    """Route attention through our function where the run quantizes q/k/v or a loss term reads the maps."""
    if min(cfg.abits, cfg.q_width, cfg.kv_width) < 16 or cfg.loss_spec.needs_attention:
        use_quantized_attention(model)


class BlockRunner:
    """Quantizes one block at a time under a run's configuration: the FP targets, the recipe's stages
    (prepare, train, merge, round), the checkpoint, and the outputs that are the next block's inputs.
    The block loop walks the model with it; test-time adaptation (tta.py) reruns it on the last blocks."""

    def __init__(self, model_config, adapter: Adapter, cfg: QuantConfig, device: torch.device,
                 amp_dtype: torch.dtype = torch.float16, act_scales: dict | None = None,
                 act_shifts: dict | None = None, data_parallel: bool = False, compile_block: bool = False):
        self.model_config, self.adapter, self.cfg, self.device = model_config, adapter, cfg, device
        self.data_parallel, self.compile_block = data_parallel, compile_block
        self.step_batch = cfg.batch_size // distributed.world() if data_parallel else cfg.batch_size
        self.act_scales, self.act_shifts = act_scales, act_shifts
        self.stages, self.trains, self.objective = cfg.block_stages(), cfg.trains, BlockObjective.parse(cfg.loss)
        self.cache_dtype = amp_dtype if amp_active(device, cfg, amp_dtype) else torch.float32
        # float16's range ends at 6e-8: its gradients need a loss scale (as the reference's NativeScalerWithGradNormCount)
        self.grad_scaling = self.cache_dtype == torch.float16
        self.ctx = lambda: amp_context(device, cfg, amp_dtype)  # noqa: E731

    def quantize(self, block: nn.Module, index: int, q_inps: torch.Tensor, fp_inps: torch.Tensor, kwargs: dict,
                 checkpoint=None, desc: str = "block") -> tuple[BlockReport, torch.Tensor, torch.Tensor]:
        """Quantize `block` (index `index` in the model) in place on its quantized-trajectory inputs `q_inps`
        against the FP block on `fp_inps`; returns its report and both trajectories' outputs."""
        cfg, device, ctx, trains = self.cfg, self.device, self.ctx, self.trains
        t0 = time.time()
        orig_dtype = next(block.parameters()).dtype
        block.to(device=device, dtype=torch.float32)
        unpack_experts(block, self.adapter)
        reset_expert_counts(block)
        fp_outs = run_block(block, fp_inps, kwargs, cfg.batch_size, device, ctx)
        if self.data_parallel:             # every rank decides on the tokens all ranks routed
            distributed.all_reduce_sum_([m.tokens_seen for m in block.modules() if hasattr(m, "tokens_seen")])
        experts = expert_report(block)     # routing on the FP trajectory: which experts calibration reaches
        aug = run_block(block, q_inps, kwargs, cfg.batch_size, device, ctx) if cfg.two_targets and trains else None
        # the FP block, for the FP attention maps of attention terms (one block's weights more)
        fp_block = copy.deepcopy(block) if self.objective.needs_attention else None
        prefix = f"{self.adapter.layers_path}.{index}."
        bq = BlockQuantizer(block, self.adapter, self.model_config, cfg, _block_stats(self.act_scales, prefix),
                            _block_stats(self.act_shifts, prefix), self.stages, index)
        if experts and experts["unseen"]:
            bq.round_to_nearest = set(experts["unseen_linears"])
            log.warning("%s %d: experts %s saw none of the calibration tokens (tokens per expert: %s): their "
                        "linears are rounded to nearest", desc, index, experts["unseen"], experts["tokens_per_expert"])
        # the inputs a block learns on: the quantized trajectory (OmniQuant), or the FP one (FlatQuant)
        inputs = fp_inps if cfg.train_inputs == "fp" else q_inps
        data = BlockData(inputs, [t for t in (fp_outs, aug) if t is not None], kwargs, device, ctx,
                         self.step_batch, trains, fp_inps, fp_block, self.data_parallel, self.grad_scaling)
        report = BlockReport(index, experts={k: v for k, v in experts.items() if k != "unseen_linears"}
                             if experts else None)
        if checkpoint is not None and checkpoint.done(index):
            state, saved = checkpoint.load(index)
            bq.load_state({k: v.to(device) for k, v in state.items()})
            report.losses, report.nan_events = saved.get("losses", []), saved.get("nan_events", 0)
            report.fell_back_to_rtn = saved.get("fell_back_to_rtn", False)
            report.stages = saved.get("stages", {})
            report.divergence_events = saved.get("divergence_events", 0)
            report.restored = True
            log.info("block %d: parameters restored from %s", index, checkpoint.path(index))
        else:
            bq.prepare(data)
            if trains:
                train_block(bq, data, cfg, report, f"{desc} {index}", compile_block=self.compile_block)
        bq.finalize(data)
        if not report.restored:
            # saved after the rounding, so that a rounder that learns (TesseraQ) is saved too; a kill
            # before this line retrains the block on resume
            report.stages = bq.report()
            if checkpoint is not None:     # rank 0 writes; the others' checkpoint only records the index
                checkpoint.save(index, bq.state(), {"losses": report.losses, "nan_events": report.nan_events,
                                                    "divergence_events": report.divergence_events,
                                                    "fell_back_to_rtn": report.fell_back_to_rtn,
                                                    "stages": report.stages})
        q_outs = run_block(block, q_inps, kwargs, cfg.batch_size, device, ctx)
        report.final_mse = mean_squared_error(q_outs, fp_outs)
        if self.data_parallel:
            report.final_mse = distributed.mean(report.final_mse)
        block.to(device="cpu", dtype=orig_dtype)
        report.seconds = time.time() - t0
        log.info("%s %d done in %.1fs: output MSE vs full precision %.6g", desc, index, report.seconds,
                 report.final_mse)
        del bq, data, aug, fp_block
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return report, q_outs, fp_outs


def _block_stats(stats: dict | None, prefix: str) -> dict | None:
    if stats is None:
        return None
    return {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}
