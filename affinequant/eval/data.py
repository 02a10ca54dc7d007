"""Calibration and evaluation text, GPTQ protocol.

Every dataset is loaded from the hub by name when it is reachable, and otherwise from local
files in the data directory (--data_dir, $AFFINEQUANT_DATA, or ../shared/data beside the
checkout) under their usual names. Results always record which source was used.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AffineQuantError
from ..utils import hub_reachable

log = logging.getLogger("affinequant")

PPL_DATASETS = ("wikitext2", "c4", "ptb", "c4-new", "ptb-new")
CALIB_DATASETS = ("wikitext2", "c4", "ptb", "generated")
C4_EVAL_WINDOWS = 256



class DataError(AffineQuantError, RuntimeError):
    """Data that cannot be read or is not there; the message says where to put it."""


@dataclass
class Text:
    text: str | list[str]          # one string, or documents (C4)
    source: str


def default_data_dir(explicit: str | None = None) -> Path | None:
    if explicit:        # asked for by name: never silently another folder
        if not Path(explicit).is_dir():
            raise DataError(f"--data_dir {explicit} is not a directory: give the folder that holds the data files "
                            f"(e.g. ../shared/data), or omit --data_dir")
        return Path(explicit)
    env = os.environ.get("AFFINEQUANT_DATA")
    if env and not Path(env).is_dir():
        raise DataError(f"$AFFINEQUANT_DATA={env} is not a directory: fix or unset it")
    checkout = Path(__file__).resolve().parents[2]      # affinequant/eval/data.py → the repository's root
    for candidate in (env, checkout.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _find(data_dir: Path | None, *names: str) -> Path | None:
    if data_dir is None:
        return None
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _wikitext_rows(path: Path) -> list[str]:
    # The raw file has one HF row per line; blank rows are written as " \n" and are "" in HF.
    with open(path, encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def _read_documents(path: Path) -> list[str]:
    try:
        docs = _read_documents_unchecked(path)
    except (UnicodeDecodeError, json.JSONDecodeError, OSError, ValueError) as exc:
        raise DataError(f"calibration file {path} cannot be read as text ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]}): give a UTF-8 .txt, a .jsonl with a \"text\" field per "
                        f"line, or a .parquet with a \"text\" column") from exc
    if not any(d.strip() for d in docs):
        raise DataError(f"calibration file {path} holds no text (a .jsonl needs a \"text\", \"sentence\" or "
                        f"\"content\" field per line)")
    return docs


def _read_documents_unchecked(path: Path) -> list[str]:
    suffixes = "".join(path.suffixes)
    if suffixes.endswith(".parquet"):
        import pandas as pd
        return pd.read_parquet(path, columns=["text"])["text"].tolist()
    opener = open
    if suffixes.endswith(".gz"):
        import gzip
        opener = gzip.open
    if ".json" in suffixes:
        docs = []
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    docs.append(row.get("text") or row.get("sentence") or row.get("content") or "")
        return docs
    with opener(path, "rt", encoding="utf-8") as f:
        return [f.read()]


def _hub(loader):
    if not hub_reachable():
        return None
    try:
        return loader()
    except Exception as exc:  # hub reachable but dataset unavailable: fall through to local files
        log.warning("could not load from the hub (%s); trying local files", exc)
        return None


def load_text(name: str, split: str, data_dir: Path | None) -> Text:
    """The raw text of a named dataset split ('test', 'validation', 'train')."""
    if name == "wikitext2":
        from_hub = _hub(lambda: __import__("datasets").load_dataset("wikitext", "wikitext-2-raw-v1", split=split))
        if from_hub is not None:
            return Text("\n\n".join(from_hub["text"]), f"hub:wikitext-2-raw-v1/{split}")
        fname = {"test": "wiki.test.raw", "train": "wiki.train.raw", "validation": "wiki.valid.raw"}[split]
        path = _find(data_dir, fname)
        if path:
            return Text("\n\n".join(_wikitext_rows(path)), f"file:{path}")
        raise DataError(f"WikiText-2 {split} is not reachable: the hub is offline and {fname} is not in the data "
                        f"directory ({data_dir}). Point --data_dir at a folder holding it, or choose another "
                        f"dataset (--calib_dataset c4 | ptb | generated | a .txt/.jsonl/.parquet file)")
    if name in ("ptb", "ptb-new"):
        from_hub = _hub(lambda: __import__("datasets").load_dataset("ptb_text_only", "penn_treebank", split=split))
        sep = " " if name == "ptb-new" else "\n\n"
        if from_hub is not None:
            return Text(sep.join(from_hub["sentence"]), f"hub:ptb_text_only/{split}")
        fname = {"test": "ptb.test.txt", "train": "ptb.train.txt", "validation": "ptb.valid.txt"}[split]
        path = _find(data_dir, fname)
        if path:
            with open(path, encoding="utf-8") as f:
                return Text(sep.join(line.rstrip("\n") for line in f), f"file:{path}")
        raise DataError(f"PTB {split} is not reachable: the hub is offline and {fname} is not in the data "
                        f"directory ({data_dir}); point --data_dir at a folder holding it")
    if name in ("c4", "c4-new"):
        shard = {"validation": "en/c4-validation.00000-of-00008.json.gz",
                 "train": "en/c4-train.00000-of-01024.json.gz"}[split]
        from_hub = _hub(lambda: __import__("datasets").load_dataset(
            "allenai/c4", data_files={split: shard}, split=split))
        if from_hub is not None:
            return Text(list(from_hub["text"]), f"hub:allenai/c4/{shard}")
        names = [f"c4-{split}.json.gz", f"c4-{split}.json", f"c4-{split}.2k.parquet", f"c4-{split}.parquet",
                 "c4-validation.00000-of-00008.json.gz" if split == "validation" else "c4-train.00000-of-01024.json.gz"]
        path = _find(data_dir, *names)
        if path is None and split == "train":
            path = _find(data_dir, "c4-validation.json.gz", "c4-validation.2k.parquet", "c4-validation.parquet")
            if path:
                log.warning("C4 train is not reachable: calibrating on C4 *validation* documents (%s)", path)
        if path:
            return Text(_read_documents(path), f"file:{path}")
        raise DataError(f"C4 {split} is not reachable: the hub is offline and no c4-{split} .json(.gz)/.parquet "
                        f"file is in the data directory ({data_dir})")
    raise DataError(f"unknown dataset '{name}': use one of {', '.join(PPL_DATASETS)}, or a file path")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def random_windows(tokens: torch.Tensor, n: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    if tokens.numel() <= seqlen:
        raise DataError(f"the calibration text has {tokens.numel()} tokens, fewer than one window of "
                        f"--seqlen {seqlen}: use more text or a smaller --seqlen")
    starts = [rng.randint(0, tokens.numel() - seqlen - 1) for _ in range(n)]
    return torch.stack([tokens[s:s + seqlen] for s in starts])


def document_windows(docs: list[str], tokenizer, n: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    """GPTQ's C4 draw: a random document with more than seqlen tokens, a random window in it.
    (`>` rather than `>=` avoids GPTQ's randint crash on documents of exactly seqlen tokens.)"""
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise DataError(f"found only {len(out)} documents longer than --seqlen {seqlen} tokens; "
                            f"use a smaller --seqlen or more documents")
        ids = _tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)])
        if ids.numel() <= seqlen:
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[start:start + seqlen])
    return torch.stack(out)


def generated_samples(model, tokenizer, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """Data-free calibration: text sampled from the model itself, each sample from a random first
    token (as LLM-QAT does), for when no data is reachable at all."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    samples = []
    for _ in range(n):
        start = torch.randint(0, vocab, (1, 1), generator=gen).to(device)
        with torch.no_grad():
            out = model.generate(start, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1, do_sample=True,
                                 top_k=50, pad_token_id=tokenizer.pad_token_id or 0)
        samples.append(out[0, :seqlen].cpu())
    return torch.stack(samples)


def calibration_samples(name: str | None, tokenizer, nsamples: int, seqlen: int, seed: int,
                        data_dir: Path | None, model=None) -> tuple[torch.Tensor, str]:
    """(nsamples, seqlen) token windows for calibration, and a description of their source.
    name None means: WikiText-2 train if reachable, else C4, else model-generated text."""
    rng = random.Random(seed)
    if name is None:
        for candidate in ("wikitext2", "c4"):
            try:
                return calibration_samples(candidate, tokenizer, nsamples, seqlen, seed, data_dir, model)
            except DataError as exc:
                log.warning("calibration set %s unavailable (%s)", candidate, str(exc).split(":")[0])
        log.warning("no calibration data reachable: using text generated by the model (data-free)")
        name = "generated"
    if name == "generated":
        if model is None:
            raise DataError("model-generated calibration text needs the whole model in memory: give --calib_dataset "
                            "(a text file, wikitext2 or c4), or drop --stream")
        return generated_samples(model, tokenizer, nsamples, seqlen, seed), f"generated by the model, seed {seed}"
    path = Path(name)
    if path.suffix in (".txt", ".jsonl", ".json", ".parquet", ".gz") or path.is_file():
        if not path.is_file():
            raise DataError(f"calibration file {name} does not exist")
        docs = _read_documents(path)
        if len(docs) > 1:
            return document_windows(docs, tokenizer, nsamples, seqlen, rng), f"file:{path}, {nsamples} windows"
        return random_windows(_tokenize(tokenizer, docs[0]), nsamples, seqlen, rng), f"file:{path}, {nsamples} windows"
    if name in ("c4", "c4-new"):
        text = load_text("c4", "train", data_dir)
        split = "validation" if "validation" in text.source else "train"   # a local sample may be validation text
        return document_windows(text.text, tokenizer, nsamples, seqlen, rng), f"c4 {split} ({text.source}), seed {seed}"
    if name in ("wikitext2", "ptb"):
        text = load_text(name, "train", data_dir)
        return random_windows(_tokenize(tokenizer, text.text), nsamples, seqlen, rng), f"{name} train ({text.source}), seed {seed}"
    raise DataError(f"unknown calibration set '{name}': use one of {', '.join(CALIB_DATASETS)} or a "
                    f".txt/.jsonl/.parquet file")


def eval_tokens(name: str, tokenizer, seqlen: int, data_dir: Path | None) -> tuple[torch.Tensor, str]:
    """The token stream of a perplexity set, GPTQ protocol; evaluated in non-overlapping windows."""
    if name == "wikitext2":
        text = load_text("wikitext2", "test", data_dir)
        return _tokenize(tokenizer, text.text), text.source
    if name == "ptb":
        text = load_text("ptb", "validation", data_dir)
        return _tokenize(tokenizer, text.text), text.source
    if name == "ptb-new":
        text = load_text("ptb-new", "test", data_dir)
        return _tokenize(tokenizer, text.text), text.source
    if name == "c4":
        text = load_text("c4", "validation", data_dir)
        windows = document_windows(text.text, tokenizer, C4_EVAL_WINDOWS, seqlen, random.Random(0))
        return windows.reshape(-1), f"{text.source}, {C4_EVAL_WINDOWS} random windows, seed 0"
    if name == "c4-new":
        text = load_text("c4", "validation", data_dir)
        ids = _tokenize(tokenizer, " ".join(text.text[:1100]))
        return ids[: C4_EVAL_WINDOWS * seqlen], f"{text.source}, first 1100 documents joined"
    raise DataError(f"unknown perplexity set '{name}': use one of {', '.join(PPL_DATASETS)}")
