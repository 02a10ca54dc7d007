"""Calibration and evaluation text, GPTQ protocol.

BOS as the papers have it (GPTQ's, OmniQuant's and AffineQuant's datautils): a perplexity set's joined text is
tokenized once with the tokenizer's defaults, so a tokenizer that adds BOS (Llama, Mistral, Gemma) puts it at
the start of window 0 and nowhere else (`--ppl_bos first`); `every` opens each window with BOS, as lm-eval's
rolling perplexity does; `none` tokenizes without special tokens. SmolLM2's and Qwen2.5's tokenizers add no
BOS, and there `first` and `none` agree. Calibration samples open with BOS where the tokenizer adds one
(`--calib_bos on`), so a block is calibrated on the attention sink it sees in use.

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
BOS_MODES = ("first", "every", "none")



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


def _tokenize(tokenizer, text: str, special: bool = False) -> torch.Tensor:
    """`special`: the tokenizer's defaults (BOS where it adds one), else the bare text's tokens."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=special).input_ids[0]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's defaults open a text with BOS (Llama's, Mistral's, Gemma's do; SmolLM2's and
    Qwen2.5's add nothing)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def bos_token_id(tokenizer, flag: str) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise DataError(f"{flag} needs a BOS token and this tokenizer has none: choose another {flag.split()[0]} value")
    return bos


def _with_bos(windows: torch.Tensor, bos: int) -> torch.Tensor:
    """(n, s) windows → (n, s + 1), each opened by BOS."""
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def _bos_every(ids: torch.Tensor, seqlen: int, bos: int) -> torch.Tensor:
    """A token stream cut into windows of seqlen − 1, each opened by BOS, as one stream of whole windows."""
    width = seqlen - 1
    return _with_bos(ids[: ids.numel() // width * width].reshape(-1, width), bos).reshape(-1)


def random_windows(tokens: torch.Tensor, n: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    if tokens.numel() <= seqlen:
        raise DataError(f"the calibration text has {tokens.numel()} tokens, fewer than one window of "
                        f"--seqlen {seqlen}: use more text or a smaller --seqlen")
    starts = [rng.randint(0, tokens.numel() - seqlen - 1) for _ in range(n)]
    return torch.stack([tokens[s:s + seqlen] for s in starts])


def document_windows(docs: list[str], tokenizer, n: int, seqlen: int, rng: random.Random,
                     special: bool = False) -> torch.Tensor:
    """GPTQ's C4 draw: a random document with more than seqlen tokens, a random window in it.
    (`>` rather than `>=` avoids GPTQ's randint crash on documents of exactly seqlen tokens.)
    `special`: documents tokenized with the tokenizer's defaults, as GPTQ's (a window at 0 then opens with BOS)."""
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise DataError(f"found only {len(out)} documents longer than --seqlen {seqlen} tokens; "
                            f"use a smaller --seqlen or more documents")
        ids = _tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)], special)
        if ids.numel() <= seqlen:
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[start:start + seqlen])
    return torch.stack(out)


def generated_samples(model, tokenizer, n: int, seqlen: int, seed: int, bos: bool = False) -> torch.Tensor:
    """Data-free calibration: text sampled from the model itself, each sample from a random first token (as
    LLM-QAT does; after BOS with `bos`), for when no data is reachable at all. All samples in one batch, with the
    KV cache: a 135M model's 4 × 256 tokens take seconds."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    start = torch.randint(0, model.config.vocab_size, (n, 1), generator=gen)
    if bos:
        start = _with_bos(start, bos_token_id(tokenizer, "--calib_bos on"))
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        new = seqlen - start.shape[1]
        out = model.generate(start.to(device), attention_mask=torch.ones_like(start).to(device), max_new_tokens=new,
                             min_new_tokens=new, do_sample=True, top_k=50, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id or 0)
    return out[:, :seqlen].cpu()


def calibration_samples(name: str | None, tokenizer, nsamples: int, seqlen: int, seed: int,
                        data_dir: Path | None, model=None, bos: bool = False) -> tuple[torch.Tensor, str]:
    """(nsamples, seqlen) token windows for calibration, and a description of their source.
    name None means: WikiText-2 train if reachable, else C4, else model-generated text. `bos`: each sample is
    BOS and seqlen − 1 tokens of text (the reference's random slices never hold it)."""
    if name is None:
        for candidate in ("wikitext2", "c4"):
            try:
                return calibration_samples(candidate, tokenizer, nsamples, seqlen, seed, data_dir, model, bos)
            except DataError as exc:
                log.warning("calibration set %s unavailable (%s)", candidate, str(exc).split(":")[0])
        log.warning("no calibration data reachable: calibrating on text generated by the model (data-free). For "
                    "real text, point --data_dir at a folder with wiki.train.raw or c4-validation*.json.gz|.parquet, "
                    "or pass --calib_dataset FILE.txt|.jsonl|.parquet")
        name = "generated"
    if name == "generated":
        if model is None:
            raise DataError("model-generated calibration text needs the whole model in memory: give --calib_dataset "
                            "(a text file, wikitext2 or c4), or drop --stream")
        return (generated_samples(model, tokenizer, nsamples, seqlen, seed, bos),
                f"generated by the model, seed {seed}{', each opening with BOS' if bos else ''}")
    samples, source = _text_samples(name, tokenizer, nsamples, seqlen - 1 if bos else seqlen, seed, data_dir)
    if bos:
        return _with_bos(samples, bos_token_id(tokenizer, "--calib_bos on")), f"{source}, each opening with BOS"
    return samples, source


def _text_samples(name: str, tokenizer, nsamples: int, width: int, seed: int, data_dir: Path | None):
    rng = random.Random(seed)
    path = Path(name)
    if path.suffix in (".txt", ".jsonl", ".json", ".parquet", ".gz") or path.is_file():
        if not path.is_file():
            raise DataError(f"calibration file {name} does not exist")
        docs = _read_documents(path)
        if len(docs) > 1:
            return document_windows(docs, tokenizer, nsamples, width, rng), f"file:{path}, {nsamples} windows"
        return random_windows(_tokenize(tokenizer, docs[0]), nsamples, width, rng), f"file:{path}, {nsamples} windows"
    if name in ("c4", "c4-new"):
        text = load_text("c4", "train", data_dir)
        split = "validation" if "validation" in text.source else "train"   # a local sample may be validation text
        return document_windows(text.text, tokenizer, nsamples, width, rng), f"c4 {split} ({text.source}), seed {seed}"
    if name in ("wikitext2", "ptb"):
        text = load_text(name, "train", data_dir)
        return random_windows(_tokenize(tokenizer, text.text), nsamples, width, rng), f"{name} train ({text.source}), seed {seed}"
    raise DataError(f"unknown calibration set '{name}': use one of {', '.join(CALIB_DATASETS)} or a "
                    f".txt/.jsonl/.parquet file")


def eval_tokens(name: str, tokenizer, seqlen: int, data_dir: Path | None, bos: str = "first") -> tuple[torch.Tensor, str]:
    """The token stream of a perplexity set, GPTQ protocol, evaluated in non-overlapping windows of seqlen.
    `bos` (BOS_MODES): first, the tokenizer's defaults on the joined text (the papers'); every, each window
    BOS and seqlen − 1 tokens; none, no special tokens."""
    if bos not in BOS_MODES:
        raise DataError(f"--ppl_bos {bos}: use one of {', '.join(BOS_MODES)}")
    special, every = bos == "first", bos == "every"
    bos_id = bos_token_id(tokenizer, "--ppl_bos every") if every else None
    if name in ("wikitext2", "ptb", "ptb-new"):
        text = load_text(name, {"wikitext2": "test", "ptb": "validation", "ptb-new": "test"}[name], data_dir)
        ids = _tokenize(tokenizer, text.text, special)
        return (_bos_every(ids, seqlen, bos_id) if every else ids), text.source
    if name == "c4":
        text = load_text("c4", "validation", data_dir)
        windows = document_windows(text.text, tokenizer, C4_EVAL_WINDOWS, seqlen - 1 if every else seqlen,
                                   random.Random(0), special)
        windows = _with_bos(windows, bos_id) if every else windows
        return windows.reshape(-1), f"{text.source}, {C4_EVAL_WINDOWS} random windows, seed 0"
    if name == "c4-new":
        text = load_text("c4", "validation", data_dir)
        ids = _tokenize(tokenizer, " ".join(text.text[:1100]), special)
        ids = _bos_every(ids, seqlen, bos_id) if every else ids
        return ids[: C4_EVAL_WINDOWS * seqlen], f"{text.source}, first 1100 documents joined"
    raise DataError(f"unknown perplexity set '{name}': use one of {', '.join(PPL_DATASETS)}")
