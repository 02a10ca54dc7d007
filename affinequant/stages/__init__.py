"""The stages a recipe can name. Importing a stage's module registers it (base.register): a new
algorithm is a module here with a config and a handler, plus its import below."""
from .base import STAGES, BlockContext, BlockData, Rounder, Stage, StageConfig, register  # noqa: F401
from . import let, flatquant, compensation, lwc, clip_search, rounding, tesseraq  # noqa: F401,E402
