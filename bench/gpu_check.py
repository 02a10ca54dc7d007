"""The GPU user's path in one run (issue 32), driven by bench/gpu_check.sh: each check is main.py in its own
process on --device, its figures gathered into one JSON file.

    bash bench/gpu_check.sh                          # CUDA: set-up, models, every check (about 8 min on an H100)
    bash bench/gpu_check.sh --device cpu --tiny      # the same checks on a tiny random model, in seconds (CI)

Checks: the README's first command; AffineQuant W3 g128 and FlatQuant W4A4KV4 on Qwen2.5-0.5B at the bench's
budget; round-to-nearest W4 evaluated with the model in float16 and in float32 (the float16 path's cost in
perplexity); a GPTQ export written and loaded back with load_quantized (its perplexity against the run's).
Each records perplexity, KL, seconds per block, calibration and whole-run peak memory (GPU memory on CUDA).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checks(model_small: str, model_qwen: str, tiny: bool) -> dict[str, list[str]]:
    """name: main.py flags. The tiny budget keeps every flag of the full one, at sizes a random model takes."""
    if tiny:
        # eager quantizer kernels: each check is a fresh process, and CI need not build the fused ones six times
        budget = ["--nsamples", "2", "--seqlen", "32", "--eval_ppl", "--ppl_datasets", "wikitext2", "--limit", "2",
                  "--quant_kernels", "eager"]
        group = ["--group_size", "16"]
    else:
        budget = ["--nsamples", "4", "--seqlen", "512", "--calib_dataset", "c4", "--eval_ppl", "--ppl_datasets",
                  "wikitext2", "--limit", "10"]
        group = ["--group_size", "128"]
    readme = (["--nsamples", "2", "--seqlen", "32", "--limit", "2", "--quant_kernels", "eager"] if tiny else
              ["--nsamples", "16", "--seqlen", "512", "--limit", "20"])
    return {
        "readme_command": ["--model", model_small, "--wbits", "3", *group, "--clip_search", "--gptq", *readme,
                           "--eval_ppl", "--ppl_datasets", "wikitext2"],
        "affinequant_w3g128": ["--model", model_qwen, "--wbits", "3", *group, "--lwc", "--let", "--use_ln_matrix",
                               "--epochs", "2", "--lwc_lr", "5e-2", *budget],
        "flatquant_w4a4kv4": ["--model", model_qwen, "--wbits", "4", "--abits", "4", "--kv_bits", "4", "--q_bits",
                              "16", "--flatquant", "--train_inputs", "fp", "--epochs", "2", *budget],
        "rtn_w4_float16": ["--model", model_qwen, "--wbits", "4", *group, "--dtype", "float16", *budget],
        "rtn_w4_float32": ["--model", model_qwen, "--wbits", "4", *group, "--dtype", "float32", *budget],
        "gptq_export": ["--model", model_small, "--wbits", "4", *group, "--symmetric", "--gptq", "--real_quant",
                        *budget],
    }


def run_check(name: str, flags: list[str], device: str, work: Path, data_dir: str | None) -> dict:
    out = work / name
    cmd = [sys.executable, str(ROOT / "main.py"), *flags, "--device", device, "--output_dir", str(out)]
    if data_dir:
        cmd += ["--data_dir", data_dir]
    if name == "gptq_export":
        cmd += ["--save_dir", str(work / "gptq-export")]
    t0 = time.time()
    with open(work / f"{name}.log", "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    row = {"command": " ".join(cmd[1:]), "returncode": done.returncode, "wall_seconds": round(time.time() - t0, 1)}
    if done.returncode != 0:
        row["log_tail"] = (work / f"{name}.log").read_text()[-2000:]
        return row
    res = json.loads((out / "results.json").read_text())
    w = res.get("ppl", {}).get("wikitext2", {})
    row.update(ppl=w.get("ppl"), fp_ppl=w.get("fp_ppl"), kl=w.get("kl"), top1=w.get("top1_agreement"),
               seconds_per_block=res.get("seconds_per_block"),
               calibration_peak_memory_mib=res.get("calibration_peak_memory_mib"),
               peak_memory_mib=res.get("peak_memory_mib"), device=res.get("device"))
    if name == "gptq_export":
        row["reloaded_ppl"] = reloaded_perplexity(work / "gptq-export", flags, device, data_dir)
    return row


def reloaded_perplexity(path: Path, flags: list[str], device: str, data_dir: str | None) -> float:
    """The export read back by load_quantized, on the run's own windows."""
    import torch
    from transformers import AutoTokenizer

    from affinequant import load_quantized
    from affinequant.eval.data import default_data_dir, eval_tokens
    from affinequant.eval.perplexity import perplexity
    seqlen, limit = int(flags[flags.index("--seqlen") + 1]), int(flags[flags.index("--limit") + 1])
    tokens, _ = eval_tokens("wikitext2", AutoTokenizer.from_pretrained(path), seqlen, default_data_dir(data_dir))
    model = load_quantized(str(path)).to(device)
    return perplexity(model, tokens, seqlen, torch.device(device), limit)["ppl"]


def tiny_models(work: Path) -> tuple[str, str, str]:
    """A tiny random Llama and Qwen2 with a word-level tokenizer, and a data folder with a WikiText-2 test file."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny, write_text
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_text(data / "wiki.test.raw", n_words=3000)
    write_text(data / "wiki.train.raw", n_words=3000, seed=1)
    return save_tiny(work / "tiny-llama"), save_tiny(work / "tiny-qwen2", "qwen2"), str(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of the real ones (CI)")
    p.add_argument("--work", default="/tmp/gpu-check")
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_check.json"))
    p.add_argument("--model_dir", default=str(ROOT / "models"))
    p.add_argument("--data_dir", default=None)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        small, qwen, data_dir = tiny_models(work)
    else:
        small, qwen = (str(Path(args.model_dir) / f"{m}.gguf") for m in ("smollm2-135m", "qwen2.5-coder-0.5b"))
        data_dir = args.data_dir
    import torch
    report = {"device": args.device, "tiny": args.tiny, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available()
              else None, "checks": {}}
    for name, flags in checks(small, qwen, args.tiny).items():
        print(f"[gpu_check] {name}", flush=True)
        report["checks"][name] = row = run_check(name, flags, args.device, work, data_dir)
        print(f"[gpu_check]   {json.dumps({k: v for k, v in row.items() if k not in ('command', 'log_tail')})}",
              flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    failed = [n for n, r in report["checks"].items() if r["returncode"] != 0]
    if failed:
        raise SystemExit(f"gpu_check: {', '.join(failed)} failed; logs in {work}")


if __name__ == "__main__":
    main()
