"""Copy the benchmark tables (bench/RESULTS.md, PACKING.md, affine_cost.json, gptqmodel_check.json)
into README.md between the bench markers."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def section() -> str:
    bench = ROOT / "bench"
    parts = ["### Quantization quality (`bench/run_bench.py`)", "", (bench / "RESULTS.md").read_text().strip()]
    parts += ["", "Per-block output MSE and training-loss curves: `bench/plots/<model>__<setting>.svg` "
              "(`bench/plot_losses.py`)."]
    if (bench / "ZEROSHOT.md").is_file():
        parts += ["", "### Zero-shot accuracy (`bench/run_zeroshot.py`)", "", (bench / "ZEROSHOT.md").read_text().strip()]
    if (bench / "affine_cost.json").is_file():
        c = json.loads((bench / "affine_cost.json").read_text())
        rows = ["| mode | step s: compiled / eager / unfused | relative to LWC+LET | GFLOP per step | MFU: compiled "
                "/ eager | the step's matmuls alone: MFU, share of the step | saved for backward, fused (unfused) |",
                "|---|---|---|---|---|---|---|"]
        for k, v in c["train_step_seconds"].items():
            rows.append(f"| {k} | {v:.3f} / {c['train_step_seconds_eager'][k]:.3f} / "
                        f"{c['train_step_seconds_unfused'][k]:.3f} | {c['train_step_over_let'][k]:.2f}x | "
                        f"{c['train_step_gflop'][k]:.1f} | {c['train_step_mfu'][k]:.2f} / "
                        f"{c['train_step_mfu_eager'][k]:.2f} | {c['matmul_only_mfu'][k]:.2f}, "
                        f"{c['matmul_share_of_step'][k]:.2f} | "
                        f"{c['saved_for_backward_mib'][k]:.0f} MiB ({c['saved_for_backward_mib_unfused'][k]:.0f}) |")
        parts += ["", "### Training step cost (`bench/affine_cost.py`, one process, one thread, SmolLM2 block 0, "
                  f"{c['seqlen']} tokens)", "",
                  f"MFU: the step's FLOPs (torch's FlopCounterMode, which counts the matrix products and not "
                  f"attention) over its time, against the fp32 matmul peak measured in the same process "
                  f"({c['matmul_peak_gflops']:.0f} GFLOP/s, 1024^3). Compiled / eager: the fused fake-quantization "
                  f"on `--quant_kernels compiled` (the default with a C++ compiler) and `eager`; unfused: the "
                  f"formula as separate autograd operations. The step's own matrix products, timed alone with the "
                  f"same shapes and layouts, reach the MFU in the next-to-last column, the ceiling of the step's; "
                  f"the rest of the step (attention, norms, the element-wise work of the transforms, AdamW) takes "
                  f"what they leave. Where the rest goes, and why 0.8 of the peak is out of reach for the whole "
                  f"step: [docs/step-cost.md](docs/step-cost.md).", "",
                  *rows, "",
                  f"Forward time of a merged block with the runtime inverses after its norms, relative to the LET-merged "
                  f"block: {c['runtime_inverse_forward_overhead']:.2f}x."]
        long = bench / "affine_cost_2048.json"
        if long.is_file():       # the reference's sequence length: the matrices' token-independent work weighs less
            c2 = json.loads(long.read_text())
            parts += ["", f"At {c2['seqlen']} tokens (`--seqlen 2048 --out bench/affine_cost_2048.json`): "
                      + ", ".join(f"{k} {v:.2f}x" for k, v in c2["train_step_over_let"].items())
                      + " of LWC+LET's step; MFU " + ", ".join(f"{v:.2f}" for v in c2["train_step_mfu"].values())
                      + f" (peak {c2['matmul_peak_gflops']:.0f} GFLOP/s; the steps' matmuls alone "
                      + ", ".join(f"{v:.2f}" for v in c2["matmul_only_mfu"].values()) + "). The matrices' product with the weights does "
                      f"not depend on the tokens (hidden x hidden x out per consumer), so it weighs less at longer "
                      f"sequences: {c['use_ln_matrix_over_let']:.2f}x at {c['seqlen']} tokens, "
                      f"{c2['use_ln_matrix_over_let']:.2f}x at {c2['seqlen']}."]
    if (bench / "PACKING.md").is_file():
        parts += ["", "### Real quantization (`bench/packing_bench.py`)", "", (bench / "PACKING.md").read_text().strip()]
    if (bench / "gptqmodel_check.json").is_file():
        g = json.loads((bench / "gptqmodel_check.json").read_text())
        parts += ["", "### Loading our GPTQ export with GPTQModel 7.7 (`bench/gptqmodel_check.py`)", "",
                  f"SmolLM2-135M, W4 g128 asymmetric (gptq_v2), kernel {g['kernel']}: logits against our packed "
                  f"model's: max |diff| {g['max_abs_diff']:.3f} (logit scale {g['logit_scale']:.1f}), mean "
                  f"{g['mean_abs_diff']:.4f}, top-1 agreement {g['top1_agreement']:.3f} (fp16 arithmetic on its side)."]
    return "\n".join(parts)


def main():
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(START) if START in text else text.split("BENCH_TABLE")
    tail = rest.split(END, 1)[1] if END in rest else rest
    readme.write_text(f"{head}{START}\n{section()}\n{END}{tail}")


if __name__ == "__main__":
    main()
