"""Write any model affinequant loads (a .gguf file, a hub id, a local directory) as a Hugging Face directory with
safetensors, which --stream reads block by block:

    python -m affinequant.convert models/qwen2.5-coder-0.5b.gguf models/qwen2.5-coder-0.5b

The weights keep float32 unless --dtype says otherwise (a GGUF's dequantized values are not all representable
in float16 or bfloat16). This step loads the whole model once; --stream never does.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..errors import AffineQuantError
from .export import check_save_dir
from ..models.loading import load_model
from ..utils import setup_logging

log = logging.getLogger("affinequant")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert(model: str, out: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
            shard_size: str = "1GB") -> Path:
    out_dir = Path(out)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise AffineQuantError(f"{out_dir} is not empty: give a new or empty directory for the converted model")
    check_save_dir(out_dir)
    loaded, tokenizer, _ = load_model(model, dtype, trust_remote_code)
    loaded.config.use_cache = True
    loaded.save_pretrained(out_dir, max_shard_size=shard_size)
    tokenizer.save_pretrained(out_dir)
    log.info("wrote %s (%s, safetensors): pass it as --model, with --stream to quantize it block by block",
             out_dir, str(dtype).removeprefix("torch."))
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m affinequant.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help=".gguf file, hub id or local model directory")
    p.add_argument("out", help="the new directory")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--trust_remote_code", action="store_true")
    args = p.parse_args(argv)
    setup_logging()
    try:
        convert(args.model, args.out, DTYPES[args.dtype], args.trust_remote_code)
    except AffineQuantError as exc:
        raise SystemExit(f"convert: error: {exc}") from exc


if __name__ == "__main__":
    main()
