"""`python -m affinequant.convert MODEL DIR`: the command of formats.convert, kept at the path users type."""
from .formats.convert import convert, main  # noqa: F401

if __name__ == "__main__":
    main()
