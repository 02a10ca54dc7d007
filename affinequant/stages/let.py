"""OmniQuant's learnable equivalent transformation (LET), and AffineQuant's matrices as its options:
`ln_matrix` (d×d matrices after the norms, runtime inverse) and `qk_matrix` (per-head q ↔ k matrix,
a complex scale per RoPE pair for RoPE models); either makes v → o a per-head matrix, all under the
gradual mask. The math is in transforms.LET; this is its life in the block loop."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import LET_INITS, QK_INITS, ConfigError, default_sf
from ..quant.qmodules import TransformedNorm, set_submodule
from .transforms import LET as LETModule, qk_transform_exists
from .base import Stage, StageConfig, probe_loss, register

log = logging.getLogger("affinequant")


@dataclass(frozen=True)
class LETConfig(StageConfig):
    name = "let"
    learns = True
    needs_statistics = True
    lr: float = 5e-3
    alpha: float = 0.5                  # SmoothQuant migration strength of the initialisation
    init: str = "smoothquant"           # scale start: "smoothquant" (max|x|^α / max|W|^(1-α)) or "log" (LRQuant)
    qk_init: str = "stats"              # q <-> k scale start: "stats" (SmoothAttention) or "ones" (OmniQuant)
    ln_matrix: bool = False             # AffineQuant --use_ln_matrix
    qk_matrix: bool = False             # AffineQuant --use_matrix
    sf: float | None = None             # gradual mask's stability factor; None: 1e-2 weight-only, 0.1 with activations
    out_matrix: bool | None = None      # v -> o as per-head matrices; None: with either matrix option, and always
                                        # under --reference_compat (AffineQuant); False: OmniQuant's vector

    def __post_init__(self):
        if self.init not in LET_INITS:
            raise ConfigError(f"let: init {self.init!r} is not known: use one of {', '.join(LET_INITS)}")
        if self.qk_init not in QK_INITS:
            raise ConfigError(f"let: qk_init {self.qk_init!r} is not known: use one of {', '.join(QK_INITS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"let: alpha must lie in [0, 1] (got {self.alpha})")
        if self.sf is not None and not 0.0 < self.sf <= 1.0:
            raise ConfigError(f"let: sf must lie in (0, 1] (got {self.sf}); AffineQuant uses 1e-2 weight-only, "
                              f"0.1 for W4A4")

    def stability_factor(self, abits: int) -> float:
        """sf, or AffineQuant's README value for the run's activation bits."""
        return self.sf if self.sf is not None else default_sf(abits)


@register
class LET(Stage):
    config_class = LETConfig

    def __init__(self, config: LETConfig, ctx):
        super().__init__(config, ctx)
        cfg, adapter, block = ctx.cfg, ctx.adapter, ctx.block
        if ctx.act_scales is None:
            raise ConfigError("LET needs activation statistics (act_scales): compute them with "
                              "affinequant.pipeline.stats.collect_act_stats or generate_act_scale_shift.py")
        for norm_name, _ in adapter.norm_groups:
            set_submodule(block, norm_name, TransformedNorm(block.get_submodule(norm_name)))
        self.reference = cfg.reference_compat
        # as OmniQuant: shifts only where a norm bias absorbs them; the reference AffineQuant trains them everywhere
        use_shift = self.reference or (adapter.norm_has_bias and cfg.abits < 16)
        sf = config.stability_factor(cfg.abits)
        affine = config.out_matrix if config.out_matrix is not None else (
            config.ln_matrix or config.qk_matrix or self.reference)
        if config.qk_matrix and not qk_transform_exists(adapter, ctx.model_config):
            raise ConfigError(f"{ctx.model_config.model_type}: q and k pass through their own norms (q_norm, k_norm) "
                              f"or a partial RoPE, so no q <-> k transform preserves the block: drop --use_matrix "
                              f"(qk_matrix); the other transforms apply")
        if (config.ln_matrix or config.qk_matrix) and not affine:
            raise ConfigError("let: out_matrix false with ln_matrix or qk_matrix: AffineQuant's matrices come with a "
                              "v -> o matrix; drop out_matrix")
        self.let = LETModule(block, adapter, ctx.model_config, config.alpha, ctx.act_scales, ctx.act_shifts,
                             use_shift, ln_matrix=config.ln_matrix, affine=affine, qk_matrix=config.qk_matrix,
                             sf=sf, qk_from_stats=config.qk_init == "stats", reference=self.reference,
                             scale_init=config.init)
        self.init = ""
        self.matrix_health: list[dict] = []

    def prepare(self, bq, data) -> None:
        if data.trains and not self.reference:      # the reference always starts from SmoothQuant's scales
            self.init = self.choose_init(bq, data)
            if self.init == "identity":
                log.info("LET starts from the identity (lower block loss than the %s initialisation)", self.config.init)

    @torch.no_grad()
    def choose_init(self, bq, data, probe: int = 4) -> str:
        """Start from the statistics' initialisation (SmoothQuant's, or LRQuant's) or from the identity, whichever gives the lower
        block loss on the first `probe` samples (a guard in the spirit of AWQ's scale search: with
        outlier-heavy blocks and short budgets the migration can start worse than no transform)."""
        smooth_state = {k: v.clone() for k, v in self.let.state_dict().items()}
        smooth = probe_loss(bq, data, probe)
        self.let.reset_to_identity()
        identity = probe_loss(bq, data, probe)
        if smooth <= identity:
            self.let.load_state_dict(smooth_state)
            return self.config.init
        return "identity"

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.let.parameters()), "lr": self.config.lr}]

    def start_epoch(self, epoch: int, epochs: int) -> dict:
        health = self.let.set_epoch(epoch, epochs)
        if health:
            self.matrix_health.append(health)
        return health

    def refresh(self) -> None:
        if self.reference:
            self.let.truncate()
        self.let.apply(self.ctx.block, merge=False)

    @torch.no_grad()
    def merge(self) -> None:
        if self.reference:
            self.let.truncate()
        self.let.apply(self.ctx.block, merge=True)
        for norm_name, _ in self.ctx.adapter.norm_groups:
            wrapper = self.ctx.block.get_submodule(norm_name)
            if not wrapper.holds_runtime_ops:          # folded into the norm: back to the stock module
                set_submodule(self.ctx.block, norm_name, wrapper.norm)

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"let.{k}": v for k, v in self.let.state_dict().items()}, **self.let.mask_state()}

    @torch.no_grad()
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.let.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("let.")})
        self.let.restore_mask(state)

    def report(self) -> dict:
        out = {"init": self.init} if self.init else {}
        if self.matrix_health:
            out["matrix_health"] = self.matrix_health
        return out
