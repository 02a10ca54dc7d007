"""BOS and the papers' perplexity protocol (issue 30), on SmolLM2-135M with a tokenizer configured to add BOS.

SmolLM2's own tokenizer adds no BOS, so the three --ppl_bos modes agree but for `every`. To see what they do on
a tokenizer that adds one (Llama's, Mistral's, Gemma's), the same model gets a tokenizer that opens every text
with <|endoftext|>, the token that separates SmolLM2's pretraining documents. Three checks:

    .venv/bin/python bench/bos_protocol.py evaluator --data_dir ../shared/data
    .venv/bin/python bench/bos_protocol.py calibration --data_dir ../shared/data      # two main.py runs

`evaluator`: our FP perplexity under each mode against an independent computation written here from GPTQ's
datautils (the joined test text through the tokenizer with its defaults, windows cut from it, Hugging Face's own
loss on each window), window by window; and the data-free calibration's generation time (4 x 256 tokens).
`calibration`: W3 g128 GPTQ (the defaults) calibrated with --calib_bos on and off, evaluated with --ppl_bos
first. Writes bench/bos_protocol.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "bos_protocol.json"


def bos_tokenizer(tokenizer):
    """`tokenizer` made to open every text with <|endoftext|>, as Llama's opens with <s>."""
    import copy
    from tokenizers import processors
    tok = copy.deepcopy(tokenizer)
    bos = "<|endoftext|>"
    bos_id = tok.convert_tokens_to_ids(bos)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tok.bos_token = bos
    return tok


def _load(args):
    from affinequant.eval.data import adds_bos
    from affinequant.models.loading import load_model
    model, tokenizer, _ = load_model(args.model)
    tok = bos_tokenizer(tokenizer)
    assert adds_bos(tok) and not adds_bos(tokenizer)
    return model, tokenizer, tok


def _update(key: str, value) -> None:
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    data[key] = value
    OUT.write_text(json.dumps(data, indent=2) + "\n")


def evaluator(args) -> None:
    from affinequant.eval.data import eval_tokens, generated_samples, load_text
    from affinequant.eval.perplexity import perplexity
    model, plain, tok = _load(args)
    data_dir, s, n = Path(args.data_dir), args.seqlen, args.windows
    joined = load_text("wikitext2", "test", data_dir).text
    defaults = tok(joined).input_ids                          # GPTQ's datautils: tokenizer(joined text)
    bare = tok(joined, add_special_tokens=False).input_ids
    by_hand = {"first": [defaults[i * s:(i + 1) * s] for i in range(n)],
               "every": [[tok.bos_token_id] + bare[i * (s - 1):(i + 1) * (s - 1)] for i in range(n)],
               "none": [bare[i * s:(i + 1) * s] for i in range(n)]}
    rows = {}
    for mode, windows in by_hand.items():
        tokens, _ = eval_tokens("wikitext2", tok, s, data_dir, mode)
        ours = perplexity(model, tokens, s, torch.device("cpu"), n)
        with torch.no_grad():
            theirs = [model(torch.tensor([w]), labels=torch.tensor([w])).loss.item() for w in windows]
        diff = max(abs(a - b) for a, b in zip(ours["window_nll"], theirs, strict=True))
        rows[mode] = {"ppl": ours["ppl"], "independent_ppl": float(torch.tensor(theirs).mean().exp()),
                      "max_window_nll_difference": diff}
        print(f"{mode:6s} ppl {ours['ppl']:.3f}  independent {rows[mode]['independent_ppl']:.3f}  "
              f"max |NLL difference| per window {diff:.2e}", flush=True)
    own = {mode: perplexity(model, eval_tokens("wikitext2", plain, s, data_dir, mode)[0], s, torch.device("cpu"),
                            n)["ppl"] for mode in ("first", "every", "none")}
    print("SmolLM2's own tokenizer (adds no BOS):", {k: round(v, 3) for k, v in own.items()}, flush=True)
    t0 = time.time()
    generated_samples(model, tok, 4, 256, seed=2, bos=True)
    seconds = time.time() - t0
    print(f"data-free calibration text, 4 x 256 tokens in one batch with the KV cache: {seconds:.1f} s", flush=True)
    _update("evaluator", {"windows": n, "seqlen": s, "threads": torch.get_num_threads(), "bos_tokenizer": rows,
                          "own_tokenizer_ppl": own, "generated_4x256_seconds": seconds})


def calibration(args) -> None:
    model, _, tok = _load(args)
    folder = Path(args.work) / "smollm2-135m-bos"
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    del model
    rows = {}
    for calib_bos in ("on", "off"):
        out = Path(args.work) / f"gptq-w3g128-calib-bos-{calib_bos}"
        if not (out / "results.json").is_file():
            cmd = [sys.executable, str(ROOT / "main.py"), "--model", str(folder), "--wbits", "3", "--group_size", "128",
                   "--gptq", "--nsamples", "8", "--seqlen", str(args.seqlen), "--calib_dataset", "c4",
                   "--data_dir", args.data_dir, "--eval_ppl", "--ppl_datasets", "wikitext2", "--limit",
                   str(args.windows), "--ppl_bos", "first", "--calib_bos", calib_bos, "--output_dir", str(out)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res = json.loads((out / "results.json").read_text())
        w = res["ppl"]["wikitext2"]
        rows[calib_bos] = {"ppl": w["ppl"], "fp_ppl": w["fp_ppl"], "kl": w["kl"], "top1": w["top1_agreement"],
                           "calibration": res["calibration"], "calibration_bos": res["calibration_bos"]}
        print(f"--calib_bos {calib_bos}: ppl {w['ppl']:.3f} (FP {w['fp_ppl']:.3f}, KL {w['kl']:.4f}, "
              f"top-1 {w['top1_agreement']:.3f})", flush=True)
    _update("calibration", {"setting": "W3A16g128, --gptq (defaults), 8 x 512 C4, --ppl_bos first",
                            "windows": args.windows, "rows": rows})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["evaluator", "calibration"])
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m.gguf"))
    p.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--work", default="/tmp/bos-bench")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=20)
    args = p.parse_args()
    {"evaluator": evaluator, "calibration": calibration}[args.step](args)


if __name__ == "__main__":
    main()
