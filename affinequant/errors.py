"""The library's exceptions. Each message names the problem and the fix; the command line prints it
as one line and exits non-zero (cli.run), a library user catches AffineQuantError."""


class AffineQuantError(Exception):
    """A run that cannot go on as asked: bad input, missing data, an incompatible checkpoint."""


class ConfigError(AffineQuantError, ValueError):
    """A setting that cannot work; the message names the fix."""


class ModelLoadError(AffineQuantError):
    """--model names something that is not a loadable model."""


class OutputError(AffineQuantError):
    """An output path that cannot be written without losing something the user owns."""
