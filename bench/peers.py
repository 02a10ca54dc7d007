"""The tools users would pick instead, on the same calibration samples and evaluated by our evaluator
on the same windows: GPTQModel's GPTQ and Intel's AutoRound. Each runs in its own virtual environment
(GPTQModel needs torch >= 2.14.1; neither is a dependency of this project), so a row takes three steps:

    .venv/bin/python bench/peers.py prepare --model models/smollm2-135m.gguf --work /tmp/peers
    GPTQMODEL_CPU_WORKERS=1 <gptqmodel-venv>/bin/python bench/peers.py gptqmodel --work /tmp/peers --wbits 3
    <autoround-venv>/bin/python bench/peers.py autoround --work /tmp/peers --wbits 3 --iters 24
    <autoround-venv>/bin/python bench/peers.py autoround --work /tmp/peers --format gguf:q4_1 --iters 200
    .venv/bin/python bench/peers.py evaluate --model models/smollm2-135m.gguf --work /tmp/peers \
        --run gptqmodel-w3g128 --setting W3A16g128 --method "GPTQModel GPTQ"

`prepare` writes the FP model as a Hugging Face folder and the bench's calibration samples (the same
token ids main.py draws: C4, seed 2) as JSON. Each tool quantizes asymmetrically (as our rows), group
128, and its model is written with dense dequantized weights (GPTQModel: its packed layers unpacked
after reloading the saved checkpoint; AutoRound: its "fake" format). `evaluate` measures it as
main.py does (WikiText-2, first N windows, KL and top-1 against the FP model) and writes
bench/out/<model>__<setting>__<method>/results.json, which bench/run_bench.py tabulates.
Set-up of the environments (outside CI):
    python3 -m venv gq && gq/bin/pip install gptqmodel==7.7.0
    python3 -m venv ar && ar/bin/pip install torch==2.13.0 auto-round==0.16.1 transformers==5.23.0
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _ids(work: Path) -> list[list[int]]:
    return json.loads((work / "calib_ids.json").read_text())


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(args):
    sys.path.insert(0, str(ROOT))
    from affinequant.eval.data import calibration_samples, default_data_dir
    from affinequant.models.loading import load_model
    work = Path(args.work)
    model, tok, _ = load_model(args.model)
    samples, source = calibration_samples("c4", tok, args.nsamples, args.seqlen, args.seed,
                                          default_data_dir(args.data_dir), model)
    model.save_pretrained(work / "fp")
    tok.save_pretrained(work / "fp")
    (work / "calib_ids.json").write_text(json.dumps(samples.tolist()))
    (work / "calib_source.txt").write_text(source)
    print(f"wrote {work / 'fp'} and {len(samples)} x {samples.shape[1]} calibration ids from {source}")


def _write(work: Path, run: str, model, info: dict) -> None:
    out = work / run
    model.save_pretrained(out / "dense", safe_serialization=True)
    (out / "info.json").write_text(json.dumps(info, indent=2))


def gptqmodel(args):
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    work = Path(args.work)
    run = f"gptqmodel-w{args.wbits}g{args.group_size}"
    cfg = QuantizeConfig(bits=args.wbits, group_size=args.group_size, sym=False, desc_act=False)
    model = GPTQModel.load(str(work / "fp"), cfg, device="cpu")
    calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in _ids(work)]
    t0 = time.time()
    model.quantize(calib, batch_size=1)
    seconds = time.time() - t0
    model.save(str(work / run / "packed"))
    del model
    packed = GPTQModel.load(str(work / run / "packed"), device="cpu", backend=BACKEND.TORCH)
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(work / "fp", dtype=torch.float32)
    dense_modules = dict(dense.named_modules())
    n = 0
    for name, module in packed.model.named_modules():
        if hasattr(module, "dequantize_weight") and name in dense_modules:
            dense_modules[name].weight.data.copy_(module.dequantize_weight().float().T)   # it returns (in, out)
            n += 1
    print(f"unpacked {n} quantized linears")
    _write(work, run, dense, {"tool": "gptqmodel", "calibration_seconds": seconds, "linears": n,
                              "peak_rss_mib": _peak_mib(), "config": {"bits": args.wbits, "group_size": args.group_size,
                                                                      "sym": False, "desc_act": False}})


def autoround(args):
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer
    work = Path(args.work)
    model = AutoModelForCausalLM.from_pretrained(work / "fp", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(work / "fp")
    ids = _ids(work)
    calib = [torch.tensor([x]) for x in ids]
    if args.format.startswith("gguf:"):
        return _autoround_gguf(args, work, model, tok, ids, calib)
    run = f"autoround-w{args.wbits}g{args.group_size}-i{args.iters}"
    fake = work / run / "fake"
    if not fake.exists():
        t0 = time.time()
        ar = AutoRound(model, tok, bits=args.wbits, group_size=args.group_size, sym=False, iters=args.iters,
                       nsamples=len(ids), seqlen=len(ids[0]), batch_size=1, dataset=calib, device_map="cpu",
                       amp=False, enable_torch_compile=False)
        ar.quantize_and_save(str(fake), format="fake")
        (work / run / "seconds.txt").write_text(str(time.time() - t0))
    seconds = float((work / run / "seconds.txt").read_text()) if (work / run / "seconds.txt").is_file() else float("nan")
    # the fake format holds dense quantized-dequantized weights, in a sub-folder named after the model
    dense = AutoModelForCausalLM.from_pretrained(next(fake.rglob("config.json")).parent, dtype=torch.float32)
    _write(work, run, dense, {"tool": "auto-round", "calibration_seconds": seconds, "iters": args.iters,
                              "peak_rss_mib": _peak_mib(), "config": {"bits": args.wbits, "group_size": args.group_size,
                                                                      "sym": False, "batch_size": 1}})


def _autoround_gguf(args, work, model, tok, ids, calib):
    """AutoRound's own GGUF export (its scheme sets bits, group and symmetry; llama.cpp's layout for the embedding
    and output head): the file goes to bench/gguf_check.py like ours."""
    from auto_round import AutoRound
    kind = args.format.split(":", 1)[1]
    run = work / f"autoround-{kind}-i{args.iters}"
    t0 = time.time()
    ar = AutoRound(model, tok, scheme=args.format, iters=args.iters, nsamples=len(ids), seqlen=len(ids[0]),
                   batch_size=1, dataset=calib, device_map="cpu", amp=False, enable_torch_compile=False)
    ar.quantize_and_save(str(run / "gguf"), format=args.format)
    seconds = time.time() - t0
    files = sorted((run / "gguf").rglob("*.gguf"))
    (run / "info.json").write_text(json.dumps({"tool": "auto-round", "format": args.format, "iters": args.iters,
                                               "calibration_seconds": seconds, "files": [str(f) for f in files],
                                               "nsamples": len(ids), "peak_rss_mib": _peak_mib()}, indent=2))
    print(f"AutoRound {args.format} in {seconds:.0f} s: {', '.join(map(str, files))}")


def evaluate(args):
    sys.path.insert(0, str(ROOT))
    from transformers import AutoModelForCausalLM
    from affinequant.eval.data import default_data_dir, eval_tokens
    from affinequant.eval.perplexity import perplexity
    from affinequant.models.loading import load_model
    work = Path(args.work)
    info = json.loads((work / args.run / "info.json").read_text())
    reference, tok, _ = load_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(work / args.run / "dense", dtype=torch.float32).eval()
    tokens, source = eval_tokens("wikitext2", tok, args.seqlen, default_data_dir(args.data_dir))
    res = perplexity(model, tokens, args.seqlen, torch.device("cpu"), args.windows, reference, desc=args.run)
    res["source"] = source
    n_blocks = model.config.num_hidden_layers
    results = {"model": args.model, "peer": info, "config": {"epochs": info.get("iters", 0),
                                                             "nsamples": len(_ids(work)), "seqlen": args.seqlen},
               "calibration": (work / "calib_source.txt").read_text(), "calibration_seconds": info["calibration_seconds"],
               "seconds_per_block": info["calibration_seconds"] / n_blocks,
               "calibration_peak_memory_mib": info["peak_rss_mib"], "ppl": {"wikitext2": res}}
    out = ROOT / "bench" / "out" / f"{Path(args.model).stem}__{args.setting}__{args.method}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{args.method} {args.setting}: wikitext2 ppl {res['ppl']:.2f} (FP {res['fp_ppl']:.2f}, KL {res['kl']:.4f}) "
          f"-> {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["prepare", "gptqmodel", "autoround", "evaluate"])
    p.add_argument("--model", help="the .gguf the bench quantizes (prepare, evaluate)")
    p.add_argument("--work", required=True)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--wbits", type=int, default=3)
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--iters", type=int, default=24, help="AutoRound steps per block (batch 1)")
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--format", default="fake", help="autoround: fake (dense weights, evaluated here) or a GGUF "
                   "scheme such as gguf:q4_1 (the file is checked by bench/gguf_check.py)")
    p.add_argument("--run", help="evaluate: the folder under --work (gptqmodel-w3g128, autoround-w3g128-i24)")
    p.add_argument("--setting", default="W3A16g128")
    p.add_argument("--method", default="GPTQModel GPTQ")
    args = p.parse_args()
    {"prepare": prepare, "gptqmodel": gptqmodel, "autoround": autoround, "evaluate": evaluate}[args.step](args)


if __name__ == "__main__":
    main()
