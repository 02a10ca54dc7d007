"""Copy the benchmark tables (bench/RESULTS.md, PACKING.md, affine_cost.json, gptqmodel_check.json)
into bench/README.md between the bench markers."""
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
        rows = ["| mode | step s: compiled block / compiled / eager / unfused | relative to LWC+LET | GFLOP per step "
                "| MFU: compiled block / compiled / eager | the step's matmuls alone: MFU, share of the step | saved "
                "for backward, fused (unfused) |", "|---|---|---|---|---|---|---|"]
        for k, v in c["train_step_seconds"].items():
            rows.append(f"| {k} | {c['train_step_seconds_compiled_block'][k]:.3f} / {v:.3f} / "
                        f"{c['train_step_seconds_eager'][k]:.3f} / "
                        f"{c['train_step_seconds_unfused'][k]:.3f} | {c['train_step_over_let'][k]:.2f}x | "
                        f"{c['train_step_gflop'][k]:.1f} | {c['train_step_mfu_compiled_block'][k]:.2f} / "
                        f"{c['train_step_mfu'][k]:.2f} / "
                        f"{c['train_step_mfu_eager'][k]:.2f} | {c['matmul_only_mfu'][k]:.2f}, "
                        f"{c['matmul_share_of_step'][k]:.2f} | "
                        f"{c['saved_for_backward_mib'][k]:.0f} MiB ({c['saved_for_backward_mib_unfused'][k]:.0f}) |")
        parts += ["", "### Training step cost (`bench/affine_cost.py`, one process, one thread, SmolLM2 block 0, "
                  f"{c['seqlen']} tokens)", "",
                  f"MFU: the step's FLOPs (torch's FlopCounterMode, which counts the matrix products and not "
                  f"attention) over its time, against the fp32 matmul peak measured in the same process "
                  f"({c['matmul_peak_gflops']:.0f} GFLOP/s, 1024^3). Compiled block: the whole block's forward and "
                  f"backward compiled (`--compile_block`). Compiled / eager: the fused fake-quantization "
                  f"on `--quant_kernels compiled` (the default with a C++ compiler) and `eager`; unfused: the "
                  f"formula as separate autograd operations. The step's own matrix products, timed alone with the "
                  f"same shapes and layouts, reach the MFU in the next-to-last column, the ceiling of the step's; "
                  f"the rest of the step (attention, norms, the element-wise work of the transforms, AdamW) takes "
                  f"what they leave. Where the rest goes, and why 0.8 of the peak is out of reach for the whole "
                  f"step: [docs/step-cost.md](../docs/step-cost.md).", "",
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
    if (bench / "reference_side_by_side.json").is_file():
        parts += ["", *reference_section(json.loads((bench / "reference_side_by_side.json").read_text()))]
    if (bench / "PACKING.md").is_file():
        parts += ["", "### Real quantization (`bench/packing_bench.py`)", "", (bench / "PACKING.md").read_text().strip()]
    if (bench / "gptqmodel_check.json").is_file():
        g = json.loads((bench / "gptqmodel_check.json").read_text())
        parts += ["", "### Loading our GPTQ export with GPTQModel 7.7 (`bench/gptqmodel_check.py`)", "",
                  f"SmolLM2-135M, W4 g128 asymmetric (gptq_v2), kernel {g['kernel']}: logits against our packed "
                  f"model's: max |diff| {g['max_abs_diff']:.3f} (logit scale {g['logit_scale']:.1f}), mean "
                  f"{g['mean_abs_diff']:.4f}, top-1 agreement {g['top1_agreement']:.3f} (fp16 arithmetic on its side)."]
    if (bench / "gptqmodel_check_mixed.json").is_file():
        g = json.loads((bench / "gptqmodel_check_mixed.json").read_text())
        counts = ", ".join(f"{n} at {b} bits" for b, n in sorted(g["bits_counts"].items()))
        parts += ["", f"Mixed precision (`gptqmodel_check.py export --wbits 3 --target_bpw 3.0 --mixed_bits 2,3,4`, "
                  f"RTN, W3 g128 asymmetric, the other widths under `dynamic`): GPTQModel builds {counts}, each "
                  f"module at the width our config gives it; logits max |diff| {g['max_abs_diff']:.3f} (logit scale "
                  f"{g['logit_scale']:.1f}), mean {g['mean_abs_diff']:.4f}, top-1 agreement {g['top1_agreement']:.3f}."]
    return "\n".join(parts)


def reference_section(r: dict) -> list[str]:
    """The side-by-side against the reference AffineQuant: steady seconds per block, ratios, matmul floor."""
    m, st = r["model"], r["settings"]
    ours = ["ours --reference_compat", "ours", "ours --compile_block"]
    rows = ["| mode | matmul floor | reference | " + " | ".join(ours) + " | last-epoch loss, ours --reference_compat "
            "against the reference |", "|---|---|---|" + "---|" * len(ours) + "---|"]
    for mode, row in r["modes"].items():
        ref = row["reference"]
        cells = [f"{row[n]['steady_seconds']:.2f} s ({row[n]['steady_seconds'] / ref['steady_seconds']:.2f}x)"
                 for n in ours]
        gaps = [abs(a[-1] - b[-1]) / abs(b[-1]) for a, b in zip(row["ours --reference_compat"]["losses"], ref["losses"])]
        rows.append(f"| {mode} | {row['matmul_floor_seconds']:.2f} s | {ref['steady_seconds']:.2f} s | "
                    + " | ".join(cells) + f" | within {max(gaps):.1e} relative |")
    check = r.get("fixture_check", {})
    fixture = (" Before timing, the reference checkout run here reproduced the losses of the fixture's own reference "
               "run (" + ", ".join(f"{k} to {v['max_rel_diff']:.0e}" for k, v in check.items()) + ").") if check else ""
    return ["### Against the reference AffineQuant (`bench/reference_side_by_side.py`, outside CI)", "",
            f"Seconds per block once one-off costs are paid (the mean over blocks 2-{m['layers']}), the best of "
            f"{r.get('repeats', 1)} runs of each code taken in turns, one process each, {r['threads']} thread, on a random MHA Llama-shaped model (hidden {m['hidden']}, {m['heads']} heads and "
            f"KV heads, MLP {m['intermediate']}, {m['layers']} layers), W{st['wbits']} g{st['group_size']}, "
            f"{st['nsamples']} samples x {st['seqlen']} tokens, {st['epochs']} epochs, batch 1: the same tokens, "
            f"statistics and settings for both codes. The reference (bytedance/AffineQuant, transformers 4.35 in its "
            f"own environment) runs unedited, with three run-time substitutions for the CPU; ours with the "
            f"reference's conventions (`--reference_compat`: the same arithmetic, hence the same losses), with its "
            f"defaults, and with `--compile_block`. Matmul floor: the block's matrix-product FLOPs at the fp32 matmul "
            f"peak measured in the same process ({r['matmul_peak_gflops']:.0f} GFLOP/s).{fixture} Set-up and "
            f"discussion: [docs/step-cost.md](../docs/step-cost.md#against-the-reference-affinequant).", "", *rows]


def main():
    readme = ROOT / "bench" / "README.md"
    text = readme.read_text()
    head, rest = text.split(START) if START in text else text.split("BENCH_TABLE")
    tail = rest.split(END, 1)[1] if END in rest else rest
    readme.write_text(f"{head}{START}\n{section()}\n{END}{tail}")


if __name__ == "__main__":
    main()
