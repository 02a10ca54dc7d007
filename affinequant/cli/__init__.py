"""The command line (main.py): flags (args), checks before any weight is read (preflight), then the run
(commands): calibration and evaluation steps, the export, results.json."""
from .args import build_parser, config_from_args  # noqa: F401
from .commands import main, run  # noqa: F401
