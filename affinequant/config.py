"""Typed configuration of one quantization run: what the CLI fills in and the library consumes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the fix."""


@dataclass
class QuantConfig:
    wbits: int = 4
    abits: int = 16
    group_size: int | None = None      # None: one group per output channel
    symmetric: bool = False
    lwc: bool = False
    let: bool = False
    alpha: float = 0.5                 # SmoothQuant migration strength for the LET init
    let_lr: float = 5e-3
    lwc_lr: float = 1e-2
    wd: float = 0.0
    epochs: int = 0                    # 0: round-to-nearest, no training
    nsamples: int = 128
    batch_size: int = 1
    seqlen: int = 2048
    aug_loss: bool = False
    deactive_amp: bool = False
    seed: int = 2
    max_nan_retries: int = 3           # NaN/Inf loss: roll back, halve the LR, retry this often, then RTN

    def validate(self) -> "QuantConfig":
        if self.wbits not in VALID_BITS:
            raise ConfigError(f"--wbits {self.wbits} is not supported: use one of 2..8 or 16 (no weight quantization)")
        if self.abits not in VALID_BITS:
            raise ConfigError(f"--abits {self.abits} is not supported: use one of 2..8 or 16 (no activation quantization)")
        if self.group_size is not None and self.group_size <= 0:
            self.group_size = None
        if self.wbits >= 16 and self.abits >= 16:
            raise ConfigError("--wbits 16 --abits 16 quantizes nothing: lower --wbits or --abits")
        if self.lwc and self.wbits >= 16:
            raise ConfigError("--lwc learns weight clipping but --wbits is 16: drop --lwc or lower --wbits")
        for name in ("epochs", "nsamples", "batch_size", "seqlen"):
            if getattr(self, name) < (0 if name == "epochs" else 1):
                raise ConfigError(f"--{name} must be positive (got {getattr(self, name)})")
        if self.nsamples % self.batch_size:
            raise ConfigError(f"--nsamples {self.nsamples} is not a multiple of --batch_size {self.batch_size}")
        if self.epochs > 0 and not (self.lwc or self.let):
            raise ConfigError("--epochs > 0 trains nothing without --lwc or --let: add one, or use --epochs 0 (RTN)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must lie in [0, 1] (got {self.alpha})")
        return self

    @property
    def trains(self) -> bool:
        return self.epochs > 0 and (self.lwc or self.let)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunInfo:
    """What a run records next to its figures, so every result says how it was obtained."""
    model: str = ""
    calib_source: str = ""
    config: dict = field(default_factory=dict)
