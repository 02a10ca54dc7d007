"""Recipes: a run's algorithms as data, an ordered list of stages with typed configs.

    version: 1
    stages:
      - let: {ln_matrix: true, lr: 5.0e-3}
      - lwc: {lr: 1.0e-2}
      - gptq: {percdamp: 0.01}

An entry is a stage name ("lwc"), a one-key mapping ({"lwc": {...}}) or a mapping with "stage" and
the fields; a file may also be just the list. The last stage rounds the weights (rtn when none is
named). AffineQuant's flags (--lwc --let --use_ln_matrix --use_matrix --sf ...) and ours (--clip_search
--gptq) map onto a recipe here, in one place, so flags and an equivalent recipe file run the same code.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

from .errors import ConfigError

RECIPE_VERSION = 1


@dataclass(frozen=True)
class StageConfig:
    """Typed settings of one stage. `name` is its key in recipes; `version` changes when a field's
    meaning does, so a recipe recorded by an older version is recognised. The class variables say what
    kind of stage it is, which is all a recipe needs to be checked without the stage's code."""
    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    quantizes_weights: ClassVar[bool] = False     # needs weight quantizers (--wbits < 16)
    learns: ClassVar[bool] = False                # has parameters for the shared trainer
    needs_statistics: ClassVar[bool] = False      # starts from activation statistics (act_scales)
    is_rounder: ClassVar[bool] = False            # turns the weights into integer codes: the last block stage
    model_level: ClassVar[bool] = False           # runs once on the whole model after the block loop, on the
                                                  # committed integer codes (end-to-end refinement), after the rounder

    def to_dict(self) -> dict:
        return {"stage": self.name, **asdict(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# name -> config class. The stages register theirs when affinequant.stages is imported (stages.base.register),
# which importing any part of affinequant does (the package's __init__ imports the pipeline and its stages):
# this module stays below the stages and never names one.
STAGE_CONFIGS: dict[str, type[StageConfig]] = {}


def register_config(config_class: type[StageConfig]) -> None:
    if not config_class.name or config_class.name in STAGE_CONFIGS:
        raise ValueError(f"stage name {config_class.name!r} is empty or registered twice")
    STAGE_CONFIGS[config_class.name] = config_class


def _entry(entry) -> StageConfig:
    if isinstance(entry, str):
        name, options = entry, {}
    elif isinstance(entry, dict) and "stage" in entry:
        name, options = entry["stage"], {k: v for k, v in entry.items() if k != "stage"}
    elif isinstance(entry, dict) and len(entry) == 1:
        (name, options), = entry.items()
        options = options or {}
    else:
        raise ConfigError(f"recipe entry {entry!r} is not a stage: write a name (\"lwc\"), {{name: {{options}}}} "
                          f"or {{stage: name, ...options}}")
    if name not in STAGE_CONFIGS:
        raise ConfigError(f"recipe: unknown stage {name!r}; known stages: {', '.join(sorted(STAGE_CONFIGS))}")
    config_class = STAGE_CONFIGS[name]
    unknown = sorted(set(options) - set(config_class.field_names()))
    if unknown:
        raise ConfigError(f"recipe: stage {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
                          f"{', '.join(config_class.field_names()) or 'none'}")
    try:
        return config_class(**options)
    except TypeError as exc:
        raise ConfigError(f"recipe: stage {name!r}: {exc}") from exc


def parse_recipe(data) -> list[StageConfig]:
    """Stage configs from recipe data (a list, or a mapping with version and stages)."""
    if isinstance(data, dict):
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise ConfigError(f"recipe version {version} is not supported by this affinequant (version "
                              f"{RECIPE_VERSION}): update affinequant, or rewrite the recipe")
        data = data.get("stages")
    if not isinstance(data, list) or not data:
        raise ConfigError("a recipe is a non-empty list of stages (or a mapping with 'stages: [...]')")
    return [_entry(e) for e in data]


def load_recipe_file(path: str | Path) -> list[dict]:
    """Read a YAML or JSON recipe file; returns its stages as data (validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--recipe {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ConfigError(f"--recipe {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
                          f"{exc}") from exc
    return recipe_data(parse_recipe(data))


def recipe_from_flags(cfg) -> list[dict]:
    """AffineQuant's and our flags as recipe data, as a recipe file would hold it: LET (with AffineQuant's
    matrices), FlatQuant, ABQ-LLM's compensation, the clipping search on the transformed weights, LWC, then
    the rounder."""
    stages: list[dict] = []
    if cfg.let:
        stages.append({"stage": "let", "lr": cfg.let_lr, "alpha": cfg.alpha, "init": cfg.let_init, "qk_init": cfg.qk_init,
                       "ln_matrix": cfg.use_ln_matrix, "qk_matrix": cfg.use_matrix, "sf": cfg.sf})
    if cfg.flatquant:
        stages.append({"stage": "flatquant", "lr": cfg.flat_lr, "lac_lr": 10 * cfg.flat_lr,
                       "parametrization": "direct" if cfg.direct_inv else "svd"})
    if cfg.compensation:
        stages.append({"stage": "compensation"})
    if cfg.clip_search:
        stages.append({"stage": "clip_search"})
    if cfg.lwc or (cfg.flatquant and cfg.wbits < 16):      # FlatQuant learns LWC with its transforms
        stages.append({"stage": "lwc", "lr": cfg.lwc_lr, "schedule": "cosine" if cfg.flatquant else "constant"})
    if cfg.tesseraq:
        stages.append({"stage": "tesseraq", "iters": cfg.par_iters, "batch": cfg.par_batch, "lr": cfg.par_lr,
                       "rounds": cfg.par_rounds})
    elif cfg.gptq:
        stages.append({"stage": "gptq", "percdamp": cfg.percdamp, "act_order": cfg.act_order})
    else:
        stages.append({"stage": "rtn"})
    if cfg.e2e_steps:
        stages.append({"stage": "e2e", "steps": cfg.e2e_steps, "lr": cfg.e2e_lr, "loss": cfg.e2e_loss,
                       "norms": cfg.e2e_norms})
    return stages


def resolve(cfg) -> list[StageConfig]:
    """The run's stages: its recipe, or its flags as one; checked, ending with a rounder."""
    stages = parse_recipe(cfg.recipe if cfg.recipe is not None else recipe_from_flags(cfg))
    names = [s.name for s in stages]
    for name in set(names):
        if names.count(name) > 1:
            raise ConfigError(f"recipe: stage {name!r} appears {names.count(name)} times; each stage runs once")
    first_model = next((i for i, s in enumerate(stages) if s.model_level), len(stages))
    block, model = stages[:first_model], stages[first_model:]
    misplaced = [s.name for s in model if not s.model_level]
    if misplaced:
        raise ConfigError(f"recipe: {', '.join(misplaced)} works block by block, so it comes before "
                          f"{stages[first_model].name}, which refines the whole model after the block loop: move it up")
    rounders = [s.name for s in block if s.is_rounder]
    if len(rounders) > 1 or (rounders and not block[-1].is_rounder):
        raise ConfigError(f"recipe: the weights are rounded once, by the last block stage (got rounders "
                          f"{', '.join(rounders)} in {names}): keep one rounder, last before any whole-model stage")
    if not rounders:
        block.append(_entry("rtn"))
    stages = block + model
    if model and (cfg.abits < 16 or "flatquant" in names):
        raise ConfigError(f"recipe: {model[0].name} refines the scales of weight-only quantized linears, and this run "
                          f"keeps {'activation quantizers' if cfg.abits < 16 else 'FlatQuant transforms'} in front of "
                          f"them: drop {model[0].name}, or quantize weights only (--abits 16, no flatquant)")
    if cfg.real_quant and "flatquant" in names:
        raise ConfigError("--real_quant writes the GPTQ layout, which has no place for FlatQuant's online transforms "
                          "(they run in front of the linears): drop --real_quant; the model saves in affinequant's "
                          "runtime format")
    if cfg.wbits >= 16:
        wq = [s.name for s in stages if s.quantizes_weights]
        if wq:
            raise ConfigError(f"--wbits 16 quantizes no weights, but {', '.join(wq)} works on quantized weights: "
                              f"lower --wbits, or drop {', '.join(wq)}")
    return stages


def block_stages(stages: list[StageConfig]) -> list[StageConfig]:
    """The stages the block loop runs (up to and including the rounder)."""
    return [s for s in stages if not s.model_level]


def model_stages(stages: list[StageConfig]) -> list[StageConfig]:
    """The stages that refine the whole model after the block loop, in order."""
    return [s for s in stages if s.model_level]


def recipe_data(stages: list[StageConfig]) -> list[dict]:
    return [s.to_dict() for s in stages]


def learns(stages: list[StageConfig]) -> bool:
    """Whether any stage has parameters for the shared trainer."""
    return any(s.learns for s in stages)


def needs_statistics(stages: list[StageConfig]) -> bool:
    """Whether any stage starts from activation statistics (act_scales / act_shifts)."""
    return any(s.needs_statistics for s in stages)
