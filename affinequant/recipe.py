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
from pathlib import Path

from .config import ConfigError
from .stages import STAGES, StageConfig

RECIPE_VERSION = 1


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
    if name not in STAGES:
        raise ConfigError(f"recipe: unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    config_class = STAGES[name].config_class
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


def recipe_from_flags(cfg) -> list[StageConfig]:
    """AffineQuant's and our flags as a recipe: LET (with AffineQuant's matrices), the clipping search on
    the transformed weights, LWC, then the rounder."""
    from .stages.clip_search import ClipSearchConfig
    from .stages.compensation import CompensationConfig
    from .stages.flatquant import FlatQuantConfig
    from .stages.let import LETConfig
    from .stages.lwc import LWCConfig
    from .stages.rounding import GPTQConfig, RTNConfig
    from .stages.tesseraq import TesseraQConfig

    stages: list[StageConfig] = []
    if cfg.let:
        stages.append(LETConfig(lr=cfg.let_lr, alpha=cfg.alpha, init=cfg.let_init, qk_init=cfg.qk_init, ln_matrix=cfg.use_ln_matrix,
                                qk_matrix=cfg.use_matrix, sf=cfg.sf))
    if cfg.flatquant:
        stages.append(FlatQuantConfig(lr=cfg.flat_lr, lac_lr=10 * cfg.flat_lr,
                                      parametrization="direct" if cfg.direct_inv else "svd"))
    if cfg.compensation:
        stages.append(CompensationConfig())
    if cfg.clip_search:
        stages.append(ClipSearchConfig())
    if cfg.lwc or (cfg.flatquant and cfg.wbits < 16):      # FlatQuant learns LWC with its transforms
        stages.append(LWCConfig(lr=cfg.lwc_lr, schedule="cosine" if cfg.flatquant else "constant"))
    if cfg.tesseraq:
        stages.append(TesseraQConfig(iters=cfg.par_iters, batch=cfg.par_batch, lr=cfg.par_lr, rounds=cfg.par_rounds))
    else:
        stages.append(GPTQConfig(percdamp=cfg.percdamp, act_order=cfg.act_order) if cfg.gptq else RTNConfig())
    return stages


def resolve(cfg) -> list[StageConfig]:
    """The run's stages: its recipe, or its flags as one; checked, ending with a rounder."""
    stages = parse_recipe(cfg.recipe) if cfg.recipe is not None else recipe_from_flags(cfg)
    names = [s.name for s in stages]
    for name in set(names):
        if names.count(name) > 1:
            raise ConfigError(f"recipe: stage {name!r} appears {names.count(name)} times; each stage runs once")
    rounders = [s.name for s in stages if STAGES[s.name].is_rounder]
    if len(rounders) > 1 or (rounders and not STAGES[stages[-1].name].is_rounder):
        raise ConfigError(f"recipe: the weights are rounded once, by the last stage (got rounders "
                          f"{', '.join(rounders)} in {names}): keep one rounder, last")
    if not rounders:
        from .stages.rounding import RTNConfig
        stages.append(RTNConfig())
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


def recipe_data(stages: list[StageConfig]) -> list[dict]:
    return [s.to_dict() for s in stages]


def learns(stages: list[StageConfig]) -> bool:
    """Whether any stage has parameters for the shared trainer."""
    return any(STAGES[s.name].learns for s in stages)


def needs_statistics(stages: list[StageConfig]) -> bool:
    """Whether any stage starts from activation statistics (act_scales / act_shifts)."""
    return any(STAGES[s.name].needs_statistics for s in stages)
