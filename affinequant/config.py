"""Typed configuration of one quantization run: what the CLI fills in and the library consumes."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from .errors import ConfigError
from .recipe import block_stages, learns, model_stages, needs_statistics, recipe_data, resolve

__all__ = ["QuantConfig", "ConfigError", "LossSpec", "LOSS_TERMS", "LOSS_PRESETS", "effective_bits", "default_sf"]

VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


TRAIN_INPUTS = ("quantized", "fp")             # a block learns on the quantized trajectory (OmniQuant) or the FP one (FlatQuant)
QK_INITS = ("stats", "ones")                    # where the LET q <-> k scale starts: transforms.LET
LET_INITS = ("smoothquant", "log")              # where the LET scales start: SmoothQuant's, or LRQuant's log-activation


def effective_bits(bits: int, balanced: bool = False) -> float:
    """Bits of information per weight: `bits`, or log2(2^bits + 1) under bit balance (W2*: 5 levels, 2.32)."""
    return math.log2(2**bits + 1) if balanced else float(bits)


# --loss: the grammar of a block objective, as data. Each term's name and whether it reads attention maps;
# stages.losses implements the terms and registers them here (as stages register their configs in recipe).
LOSS_TERMS: dict[str, bool] = {}                # term -> needs_attention
LOSS_PRESETS = {"dc": "mse+nlc+attn_kl"}        # names that expand to terms, and imply two targets
TWO_TARGET_PRESETS = {"dc"}
_LOSS_PART = re.compile(r"^\s*(?:(\d+(?:\.\d*)?(?:e-?\d+)?)\s*\*\s*)?([a-z_]+)\s*$")


@dataclass(frozen=True)
class LossSpec:
    """A parsed --loss: weighted terms, and whether they need the second target or attention maps."""
    spec: str = "mse"
    terms: tuple = (("mse", 1.0),)
    two_targets: bool = False
    needs_attention: bool = False

    @classmethod
    def parse(cls, spec: str):
        known = ", ".join(list(LOSS_TERMS) + list(LOSS_PRESETS))
        terms: list[tuple[str, float]] = []
        two_targets = False
        for part in spec.split("+"):
            m = _LOSS_PART.match(part)
            if not m or (m.group(2) not in LOSS_TERMS and m.group(2) not in LOSS_PRESETS):
                raise ConfigError(f"--loss {spec!r}: {part.strip()!r} is not a loss term; write terms joined by '+', "
                                  f"each optionally weighted ('mse+0.5*nlc'), from: {known}")
            weight, name = float(m.group(1)) if m.group(1) else 1.0, m.group(2)
            if name in LOSS_PRESETS:
                two_targets |= name in TWO_TARGET_PRESETS
                terms += [(n, weight) for n in LOSS_PRESETS[name].split("+")]
            else:
                terms.append((name, weight))
        merged: dict[str, float] = {}
        for name, weight in terms:
            merged[name] = merged.get(name, 0.0) + weight
        if not any(w > 0 for w in merged.values()):
            raise ConfigError(f"--loss {spec!r} has no term with a positive weight")
        return cls(spec, tuple(merged.items()), two_targets, any(LOSS_TERMS[n] for n in merged))


def default_sf(abits: int) -> float:
    """AffineQuant's README value of the gradual mask's stability factor: 1e-2 weight-only, 0.1 with
    activation quantization."""
    return 1e-2 if abits >= 16 else 0.1


@dataclass
class QuantConfig:
    wbits: int = 4
    abits: int = 16
    kv_bits: int | None = None         # k and v as attention reads them (the KV cache); None: as abits, 16: not quantized
    q_bits: int | None = None          # q as attention reads it; None: as kv_bits (OmniQuant quantizes q, k, v alike)
    group_size: int | None = None      # None: one group per output channel
    symmetric: bool = False
    bit_balance: bool = False          # ABQ-LLM: 2-bit asymmetric weights on 5 levels (about 2.32 bits; "W2*")
    scale_bits: int = 11               # significant bits of each stored scale: 11 is float16; GGUF Q4_1 7, Q5_1 6
    lwc: bool = False
    let: bool = False
    alpha: float = 0.5                 # SmoothQuant migration strength for the LET init
    let_init: str = "smoothquant"      # LET scale start: SmoothQuant's, or "log" (LRQuant: max|x| / log2(2 + max|x|))
    use_ln_matrix: bool = False        # AffineQuant: d×d matrices after the norms (runtime inverse)
    use_matrix: bool = False           # AffineQuant: per-head q↔k matrix
    sf: float | None = None            # stability factor of the gradual mask; None: 1e-2 weight-only, 0.1 with activations
    let_lr: float = 5e-3
    lwc_lr: float = 1e-2
    wd: float = 0.0
    epochs: int = 0                    # 0: round-to-nearest, no training
    nsamples: int = 128
    batch_size: int = 1
    seqlen: int = 2048
    aug_loss: bool = False
    qk_init: str = "stats"             # LET q<->k scale: from q/k statistics, or 1 as OmniQuant
    loss: str = "mse"                  # block objective: weighted terms, "mse" (OmniQuant), "mse+nlc" (LRQuant), "dc" (ABQ-LLM): losses.py
    deactive_amp: bool = False
    seed: int = 2
    real_quant: bool = False           # pack weights into GPTQ-layout int32 tensors (PackedLinear)
    compensation: bool = False         # ABQ-LLM's rank-1 down_proj compensation, first 3 / last 4 blocks (stages.compensation)
    clip_search: bool = False          # search each group's clipping ratio before training (stages.clip_search)
    gptq: bool = False                 # round the weights with GPTQ instead of to nearest (stages.rounding)
    percdamp: float = 0.05             # GPTQ's dampening, a fraction of the Hessian's mean diagonal (GPTQ's: 0.01)
    act_order: bool = True             # GPTQ columns by descending Hessian diagonal (static groups; GPTQ's: off)
    tesseraq: bool = False             # round with TesseraQ's PAR + dequantization-scale tuning (stages.tesseraq)
    par_iters: int = 250               # TesseraQ: Adam steps per round
    par_batch: int = 4                 # TesseraQ: samples per step
    par_lr: float = 1e-3
    par_rounds: int = 20               # TesseraQ: rounds of the hardening schedule (of the reference's 20)
    target_bpw: float | None = None    # mixed precision: average bits per weight (pipeline.allocate)
    mixed_bits: tuple = (2, 3, 4)      # the bit widths a linear may get under --target_bpw
    layer_bits: dict | None = None     # module name -> bits (the allocation; set before the block loop)
    # module name -> a grid of its own, WeightQuantizer's arguments (bits, group_size, super_groups, sub_max, ...):
    # GGUF K-quants and llama.cpp's fallbacks for rows they cannot hold (set before the block loop)
    layer_grids: dict | None = None
    e2e_steps: int = 0                 # end-to-end refinement of the step sizes after the block loop (pipeline.refine)
    e2e_lr: float = 2e-3
    e2e_loss: str = "kl"
    e2e_norms: bool = False
    reference_compat: bool = False     # reproduce the reference code's conventions (docs/reference-compat.md)
    recipe: list | None = None         # the stages as data (recipe.py); None: from the flags above
    max_nan_retries: int = 3           # NaN/Inf loss: roll back, halve the LR, retry this often, then RTN
    flatquant: bool = False            # FlatQuant's Kronecker transforms, LAC and LWC (stages.flatquant)
    flat_lr: float = 5e-3              # FlatQuant: learning rate of the transforms (LAC: 10x)
    direct_inv: bool = False           # FlatQuant: learn the factors directly (inverted in float64), not through their SVD
    train_inputs: str = "quantized"    # "quantized": blocks learn on the quantized trajectory (OmniQuant); "fp": on FP inputs (FlatQuant)

    @property
    def kv_width(self) -> int:
        """The bits of k and v as attention reads them."""
        return self.abits if self.kv_bits is None else self.kv_bits

    @property
    def q_width(self) -> int:
        return self.kv_width if self.q_bits is None else self.q_bits

    @property
    def full_precision(self) -> bool:
        """W16A16: nothing is quantized; main.py only evaluates (the FP baseline of a results table)."""
        return self.wbits >= 16 and self.abits >= 16

    def validate(self) -> "QuantConfig":
        if self.wbits not in VALID_BITS:
            raise ConfigError(f"--wbits {self.wbits} is not supported: use one of 2..8 or 16 (no weight quantization)")
        if self.abits not in VALID_BITS:
            raise ConfigError(f"--abits {self.abits} is not supported: use one of 2..8 or 16 (no activation quantization)")
        for name in ("kv_bits", "q_bits"):
            if getattr(self, name) is not None and getattr(self, name) not in VALID_BITS:
                raise ConfigError(f"--{name} {getattr(self, name)} is not supported: use one of 2..8, or 16 (not quantized)")
        if self.train_inputs not in TRAIN_INPUTS:
            raise ConfigError(f"--train_inputs {self.train_inputs!r} is not known: use quantized (OmniQuant) or fp "
                              f"(FlatQuant)")
        if not self.flat_lr > 0:
            raise ConfigError(f"--flat_lr {self.flat_lr} must be positive: FlatQuant uses 5e-3")
        if not 1 <= self.scale_bits <= 11:
            raise ConfigError(f"scale_bits {self.scale_bits}: scales are float16 values with 1 to 11 significant bits")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"--group_size {self.group_size} is not a group size: give a positive number of input "
                              f"columns per group (128 is usual), or omit --group_size for one grid per output channel")
        for name in ("let_lr", "lwc_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} {getattr(self, name)} must be positive (a negative rate ascends the loss): "
                                  f"OmniQuant uses let_lr 5e-3, lwc_lr 1e-2")
        if self.wd < 0:
            raise ConfigError(f"--wd {self.wd} must be >= 0 (the reference uses 0)")
        if self.bit_balance and (self.wbits != 2 or self.symmetric):
            raise ConfigError(f"--bit_balance adds a fifth level to asymmetric 2-bit weights (ABQ-LLM's W2*), not to "
                              f"{'symmetric ' if self.symmetric else ''}{self.wbits}-bit ones: use --wbits 2 without "
                              f"--symmetric, or drop --bit_balance")
        if self.real_quant and (self.wbits not in (2, 3, 4, 8) or self.abits < 16):
            raise ConfigError(f"--real_quant packs 2, 3, 4 or 8-bit weights of weight-only models (got --wbits "
                              f"{self.wbits} --abits {self.abits}): drop --real_quant, or use --abits 16 and one "
                              f"of those bit-widths")
        if self.full_precision and (self.let or self.flatquant or self.real_quant or self.recipe is not None):
            raise ConfigError("--wbits 16 --abits 16 quantizes nothing (it evaluates the full-precision model), so "
                              "there is nothing to transform or pack: drop --let/--real_quant/--recipe, or lower --wbits or --abits")
        if self.lwc and self.wbits >= 16:
            raise ConfigError("--lwc learns weight clipping but --wbits is 16: drop --lwc or lower --wbits")
        if self.let_init not in LET_INITS:
            raise ConfigError(f"--let_init {self.let_init!r} is not known: use one of {', '.join(LET_INITS)}")
        if self.qk_init not in QK_INITS:
            raise ConfigError(f"--qk_init {self.qk_init!r} is not known: use one of {', '.join(QK_INITS)}")
        self.loss_spec  # noqa: B018 -- parses --loss, raising ConfigError naming the terms
        for name in ("epochs", "nsamples", "batch_size", "seqlen"):
            if getattr(self, name) < (0 if name == "epochs" else 1):
                raise ConfigError(f"--{name} must be positive (got {getattr(self, name)})")
        if self.nsamples % self.batch_size:
            raise ConfigError(f"--nsamples {self.nsamples} is not a multiple of --batch_size {self.batch_size}")
        if (self.use_ln_matrix or self.use_matrix) and not self.let:
            flag = "--use_ln_matrix" if self.use_ln_matrix else "--use_matrix"
            raise ConfigError(f"{flag} learns AffineQuant's matrices, which extend LET: add --let")
        if self.sf is not None and not 0.0 < self.sf <= 1.0:
            raise ConfigError(f"--sf must lie in (0, 1] (got {self.sf}); AffineQuant uses 1e-2 weight-only, 0.1 for W4A4")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must lie in [0, 1] (got {self.alpha})")
        if self.recipe is not None:
            flags = [f"--{k}" for k in ("lwc", "let", "use_ln_matrix", "use_matrix", "clip_search", "gptq",
                                        "tesseraq", "compensation", "flatquant", "e2e_steps") if getattr(self, k)]
            if flags:
                raise ConfigError(f"--recipe names the stages, so {' '.join(flags)} would be ignored: drop them, or "
                                  f"put them in the recipe")
        if self.flatquant and self.let:
            raise ConfigError("--flatquant and --let both transform what the norms feed: keep one")
        if self.tesseraq and self.gptq:
            raise ConfigError("--tesseraq and --gptq both round the weights: keep one")
        if not 0.0 <= self.percdamp < 1.0:
            raise ConfigError(f"--percdamp must lie in [0, 1) (got {self.percdamp}); GPTQ uses 0.01")
        if self.target_bpw is not None:
            if self.full_precision or self.abits < 16:
                raise ConfigError("--target_bpw allocates weight bits per linear for weight-only quantization: give "
                                  "--wbits (below 16) and --abits 16")
            if not self.mixed_bits or any(not 2 <= b <= 8 for b in self.mixed_bits):
                raise ConfigError(f"--mixed_bits are bit widths from 2 to 8 (got {self.mixed_bits})")
            if self.target_bpw < min(self.mixed_bits) or self.bit_balance:
                raise ConfigError(f"--target_bpw {self.target_bpw} lies below the fewest bits of --mixed_bits "
                                  f"({min(self.mixed_bits)}), or comes with --bit_balance: raise it, or add lower bits")
        stages = resolve(self)
        if self.epochs > 0 and not learns(stages):
            raise ConfigError("--epochs > 0 trains nothing without --lwc or --let (no stage of the recipe learns): "
                              "add one, or use --epochs 0")
        return self

    @property
    def effective_wbits(self) -> float:
        """Bits of information per weight: --wbits, or log2(5) = 2.32 under --bit_balance (never "INT2")."""
        return effective_bits(self.wbits, self.bit_balance)

    @property
    def setting(self) -> str:
        """The setting as the papers write it: W3A16g128, W2* for bit balance, and the KV-cache bits wherever
        activations or the cache are quantized (W4A4KV16, W4A4KV4: the papers' W4A4 figures differ in them)."""
        kv = f"KV{self.kv_width}" if min(self.abits, self.kv_width) < 16 else ""
        return (f"W{self.wbits}{'*' if self.bit_balance else ''}A{self.abits}{kv}"
                + (f"g{self.group_size}" if self.group_size else ""))

    @property
    def loss_spec(self) -> LossSpec:
        """The parsed --loss (stages.losses.BlockObjective computes it)."""
        return LossSpec.parse(self.loss)

    @property
    def two_targets(self) -> bool:
        """Whether blocks also match the FP block applied to the quantized input (--aug_loss, or --loss dc)."""
        return self.aug_loss or self.loss_spec.two_targets

    @property
    def stability_factor(self) -> float:
        """--sf, or AffineQuant's README value (default_sf)."""
        return self.sf if self.sf is not None else default_sf(self.abits)

    def stages(self) -> list:
        """The run's recipe: typed stage configs, from --recipe or from the flags (recipe.resolve)."""
        return resolve(self)

    def bits_for(self, module: str) -> int:
        """The weight bits of the block linear `module` (full name): its allocation under --target_bpw, else --wbits."""
        return (self.layer_bits or {}).get(module, self.wbits)

    def grid_for(self, module: str) -> dict:
        """WeightQuantizer's grid arguments for the block linear `module` (full name): the run's grid at
        bits_for's width, with what layer_grids sets for it instead."""
        grid = {"bits": self.bits_for(module), "group_size": self.group_size, "symmetric": self.symmetric,
                "scale_bits": self.scale_bits}
        return {**grid, **(self.layer_grids or {}).get(module, {})}

    def block_stages(self) -> list:
        """The stages the block loop runs, ending with the rounder."""
        return block_stages(self.stages())

    def model_stages(self) -> list:
        """The stages that refine the whole model after the block loop (end-to-end refinement)."""
        return model_stages(self.stages())

    def recipe_data(self) -> list[dict]:
        """The resolved recipe as data: what results.json and the checkpoint manifest record."""
        return recipe_data(self.stages())

    @property
    def trains(self) -> bool:
        return self.epochs > 0 and learns(self.stages())

    @property
    def needs_statistics(self) -> bool:
        return not self.full_precision and needs_statistics(self.stages())

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunInfo:
    """What a run records next to its figures, so every result says how it was obtained."""
    model: str = ""
    calib_source: str = ""
    config: dict = field(default_factory=dict)
