"""Do our GGUF files run in llama.cpp with the perplexity our evaluator gives them?

For each GGUF file: our evaluator's perplexity (affinequant's WikiText-2 windows, the file's weights dequantized by
transformers' GGUF loader, float32) against llama.cpp's (llama-cpp-python, its own CPU kernels) on the very same
token ids, window by window; and the greedy text llama.cpp writes for three prompts. Three stages, because
llama-cpp-python lives in a virtual environment of its own:

    .venv/bin/python bench/gguf_check.py windows --model models/smollm2-135m.gguf --out DIR
    /work/venvs/llama/bin/python bench/gguf_check.py llama --out DIR FILE.gguf ...   # also: --quantize Q4_0 F16.gguf
    .venv/bin/python bench/gguf_check.py ours --out DIR FILE.gguf ...

    .venv/bin/python bench/gguf_check.py imatrix --out DIR --tools LLAMA_CPP/build/bin --source F16.gguf --types Q4_K_M

`windows` writes DIR/windows.npy (--ppl_bos first: BOS opens the first window only, as main.py evaluates);
`llama` and `ours` each add one record per file to DIR/results.json; `report` prints the table. llama.cpp's
`--quantize TYPE SRC` first writes llama.cpp's own quantization of SRC (an F16/F32 GGUF) next to it, the baseline
row. Threads: 2 for llama.cpp, torch's default for ours (both stated in the records).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import PROMPTS, ROOT, ours as our_ppl, ppl_of, report, update, windows  # noqa: E402


def llama(args) -> None:
    import llama_cpp
    files = list(args.files)
    if args.quantize:
        kind, source = args.quantize
        target = Path(source).with_name(f"{Path(source).stem.rsplit('-', 1)[0]}-llamacpp-{kind.lower()}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
        params.nthread = args.threads
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
            raise SystemExit(f"llama.cpp could not quantize {source} to {kind}")
        print(f"llama.cpp quantized {source} -> {target}")
        files.append(str(target))
    ids = np.load(args.out / "windows.npy")
    for file in files:
        model = llama_cpp.Llama(model_path=file, n_ctx=ids.shape[1], n_batch=ids.shape[1], logits_all=True,
                                n_threads=args.threads, verbose=False)
        t0, window_nll = time.time(), []
        for window in ids:
            model.reset()
            model.eval(window.tolist())
            logits = np.asarray(model.scores[: len(window) - 1], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
            window_nll.append(float(np.mean(logz - logits[np.arange(len(window) - 1), window[1:]])))
        seconds = time.time() - t0
        texts = {}
        for prompt in PROMPTS:
            model.reset()
            texts[prompt] = model(prompt, max_tokens=24, temperature=0.0)["choices"][0]["text"]
        record = {"file": file, "ppl": ppl_of(window_nll), "window_nll": window_nll, "seconds": seconds,
                  "threads": args.threads, "engine": f"llama-cpp-python {llama_cpp.__version__}", "greedy": texts}
        update(args.out, "llama.cpp", record)
        print(f"{Path(file).name}: llama.cpp ppl {record['ppl']:.4f} ({seconds:.0f} s); {texts[PROMPTS[0]]!r}")


def imatrix(args) -> None:
    """llama.cpp's own quantization with an importance matrix: `llama-imatrix` on the bench's calibration samples
    (the token ids main.py draws, C4 seed 2, decoded to text: llama.cpp re-tokenizes them), then `llama-quantize
    --imatrix` to each TYPE. The two tools are not in llama-cpp-python's wheel: --tools is the bin/ folder of
    its vendored llama.cpp built with -DLLAMA_BUILD_TOOLS=ON (docs in bench/SERVING.md)."""
    import subprocess
    sys.path.insert(0, str(ROOT))
    from affinequant.eval.data import calibration_samples, default_data_dir
    from affinequant.models.loading import load_model
    source, tools = Path(args.source), Path(args.tools)
    matrix = args.out / f"{source.stem.rsplit('-', 1)[0]}-imatrix.gguf"
    if not matrix.is_file():
        _, tok, _ = load_model(args.model)
        samples, origin = calibration_samples("c4", tok, args.nsamples, args.seqlen, 2, default_data_dir(), None)
        text = args.out / "calib.txt"
        text.write_text("\n".join(tok.decode(x) for x in samples.tolist()))
        print(f"{len(samples)} x {samples.shape[1]} calibration tokens from {origin} -> {text}")
        subprocess.run([str(tools / "llama-imatrix"), "-m", str(source), "-f", str(text), "-o", str(matrix),
                        "-c", str(args.seqlen), "--chunks", str(args.nsamples), "-t", str(args.threads)], check=True)
    for kind in args.types:
        target = args.out / f"{source.stem.rsplit('-', 1)[0]}-llamacpp-imatrix-{kind.lower()}.gguf"
        subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(matrix), str(source), str(target), kind,
                        str(args.threads)], check=True, capture_output=True)
        print(f"llama.cpp quantized {source} with {matrix.name} -> {target}")


def ours(args) -> None:
    sys.path.insert(0, str(ROOT))
    from affinequant.formats.gguf import file_summary
    from affinequant.models.loading import load_model
    for file in args.files:
        summary = file_summary(file)
        record = our_ppl(args.out, file, load_model(file)[0], "ours", bits_per_weight=round(summary["bits_per_weight"], 3),
                              tensor_types=summary["tensor_types"],
                              engine="affinequant evaluator (weights dequantized by transformers, float32)")
        print(f"{Path(file).name}: our ppl {record['ppl']:.4f}, {record['bits_per_weight']:.3f} bpw")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["windows", "llama", "imatrix", "ours", "report"])
    p.add_argument("files", nargs="*")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="models/smollm2-135m.gguf")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantize", nargs=2, metavar=("TYPE", "SOURCE"))
    p.add_argument("--tools", help="imatrix: the bin/ folder holding llama-imatrix and llama-quantize")
    p.add_argument("--source", help="imatrix: the F16 GGUF to quantize")
    p.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0"], help="imatrix: llama.cpp types")
    p.add_argument("--nsamples", type=int, default=16, help="imatrix: calibration samples of --seqlen tokens")
    args = p.parse_intermixed_args()
    {"windows": windows, "llama": llama, "imatrix": imatrix, "ours": ours, "report": lambda a: report(a.out, ("ours", "llama.cpp"), ("bits_per_weight",))}[args.stage](args)
