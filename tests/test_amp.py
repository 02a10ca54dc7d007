"""The autocast path GPU users run (AMP training, activation caches in the AMP dtype) runs in CI: on the CPU
with bfloat16 autocast (--dtype bfloat16), device-agnostic."""
import math

import pytest
import torch

from affinequant.pipeline import calibrate
from affinequant.models.adapters import get_adapter
from affinequant.pipeline.calibrate import quantize_blocks
from affinequant.config import QuantConfig
from affinequant.quant.qmodules import QuantLinear
from affinequant.pipeline.stats import collect_act_stats

from conftest import tiny_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("abits", [16, 4])
def test_bfloat16_autocast_training_on_cpu(tokens, monkeypatch, abits):
    seen = {"dtypes": set(), "cache": set()}
    real_forward = QuantLinear.forward

    def forward(self, x):
        out = real_forward(self, x)
        if torch.is_grad_enabled():         # a training step
            seen["dtypes"].add(out.dtype)
        return out
    monkeypatch.setattr(QuantLinear, "forward", forward)
    real_quantize = calibrate.BlockRunner.quantize

    def spy(self, block, index, q_inps, fp_inps, kwargs, *a, **k):
        seen["cache"].add(q_inps.dtype)
        return real_quantize(self, block, index, q_inps, fp_inps, kwargs, *a, **k)
    monkeypatch.setattr(calibrate.BlockRunner, "quantize", spy)
    results = {}
    for amp in (torch.bfloat16, torch.float32):
        model = tiny_model("llama")
        adapter = get_adapter(model.config)
        stats = collect_act_stats(model, adapter, tokens, CPU)
        cfg = QuantConfig(wbits=2, abits=abits, group_size=16, lwc=True, let=True, epochs=6, nsamples=8, lwc_lr=5e-2)
        results[amp] = quantize_blocks(model, adapter, tokens, cfg, CPU, *stats, amp_dtype=amp)
        if amp == torch.bfloat16:
            assert seen["dtypes"] == {torch.bfloat16} and seen["cache"] == {torch.bfloat16}
            seen["dtypes"].clear(), seen["cache"].clear()
    assert seen["dtypes"] == {torch.float32} and seen["cache"] == {torch.float32}    # float32: no autocast
    for amp_report, fp32_report in zip(results[torch.bfloat16], results[torch.float32]):
        assert all(math.isfinite(x) for x in amp_report.losses)
        assert amp_report.losses[-1] < amp_report.losses[0]
        # bfloat16 keeps 8 bits of mantissa: the same optimisation, not the same numbers
        assert amp_report.final_mse < 2 * fp32_report.final_mse + 1e-6


def test_deactive_amp_turns_autocast_off():
    from affinequant.pipeline.calibrate import amp_active
    assert amp_active(CPU, QuantConfig(), torch.bfloat16)
    assert not amp_active(CPU, QuantConfig(deactive_amp=True), torch.bfloat16)
    assert not amp_active(CPU, QuantConfig(), torch.float16)      # float16 autocast is a CUDA path
    assert amp_active(torch.device("cuda"), QuantConfig(), torch.float16)


def test_float16_autocast_trains_through_a_gradient_scaler(tokens, monkeypatch):
    """The reference's GPU path: float16 autocast with a loss scaler. Run here on the CPU by letting the CPU take
    the branch CUDA takes; the scaler is torch.amp.GradScaler for whatever device the block is on. float16 keeps
    11 bits of mantissa (bfloat16 8): the same optimisation as float32, within the bound the bfloat16 test uses."""
    monkeypatch.setattr(calibrate, "amp_active", lambda device, cfg, dtype: not cfg.deactive_amp)
    scales = []
    real_scale = torch.amp.GradScaler.scale

    def scale(self, outputs):
        scales.append(self.get_scale() if self.is_enabled() else 1.0)
        return real_scale(self, outputs)
    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    results = {}
    for amp in (torch.float16, torch.float32):
        model = tiny_model("llama")
        adapter = get_adapter(model.config)
        stats = collect_act_stats(model, adapter, tokens, CPU)
        cfg = QuantConfig(wbits=2, group_size=16, lwc=True, let=True, epochs=6, nsamples=8, lwc_lr=5e-2,
                          deactive_amp=amp == torch.float32)
        results[amp] = quantize_blocks(model, adapter, tokens, cfg, CPU, *stats, amp_dtype=torch.float16)
        if amp == torch.float16:
            assert scales and all(s > 1 for s in scales)        # every float16 step's loss was scaled up
            scales.clear()
    assert scales and all(s == 1.0 for s in scales)             # float32: the scaler stays off
    for amp_report, fp32_report in zip(results[torch.float16], results[torch.float32]):
        assert all(math.isfinite(x) for x in amp_report.losses)
        assert amp_report.losses[-1] < amp_report.losses[0]
        assert amp_report.final_mse < 2 * fp32_report.final_mse + 1e-6
