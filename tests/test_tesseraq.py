"""TesseraQ as a rounder: the rectified sigmoid and its inverse, the soft block's start at the clipped FP
weights, hardening, integer codes with tuned dequantization scales that pack bit for bit, a resume in the
middle of PAR, and a lower block loss than round-to-nearest on the same grid."""
import pytest
import torch

from affinequant.pipeline import checkpoint as ckpt_module
from affinequant.models.adapters import get_adapter
from affinequant.pipeline.calibrate import quantize_blocks
from affinequant.pipeline.checkpoint import CalibrationCheckpoint
from affinequant.config import QuantConfig
from affinequant.quant.packing import PackedLinear, dequantize
from affinequant.quant.quantizer import WeightQuantizer
from affinequant.stages import tesseraq as tq
from affinequant.pipeline.stats import collect_act_stats

from conftest import tiny_model

CPU = torch.device("cpu")
PAR = {"tesseraq": {"iters": 4, "batch": 2, "rounds": 5, "lr": 1e-2}}


def test_rectified_sigmoid_and_its_inverse():
    y = torch.linspace(0, 0.999, 200)
    torch.testing.assert_close(tq.rectified_sigmoid(tq.rectified_sigmoid_inverse(y)), y, atol=1e-5, rtol=0)
    v = torch.tensor([-50.0, 0.0, 50.0])
    assert tq.rectified_sigmoid(v).tolist() == [0.0, 0.5, 1.0]       # clamped ends are exactly 0 and 1
    assert tq.schedule(20) == list(tq.THRESHOLDS) and tq.schedule(5)[-1] == tq.THRESHOLDS[-1]


@pytest.mark.parametrize("group, clip", [(16, 1.0), (24, 0.8)])
def test_soft_block_starts_at_the_clipped_weights_and_ends_on_its_codes(group, clip):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    quantizer = WeightQuantizer((8, 64), 3, group)
    quantizer.clip_ratio = torch.full((8, quantizer.n_groups, 1), clip)
    soft = tq.SoftRounding(w, quantizer, tune_scale=True)
    scale, zero = quantizer.scale_zero(w)
    g = torch.arange(64) // group
    s, z = scale[:, g, 0], zero[:, g, 0]
    clipped = ((w / s + z).clamp(0, 7) - z) * s                   # the FP weights, clipped to the grid's range
    torch.testing.assert_close(soft(w), clipped, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        soft.mu.uniform_(-1, 1)                                     # tuned dequantization factors
    for threshold in tq.schedule(6):
        soft.harden(threshold)
    assert 0.99 < soft.hard.float().mean() < 1.0
    soft.harden_all()
    assert soft.hard.all()
    codes, factor = soft.codes(), soft.factor()
    assert codes.min() >= 0 and codes.max() <= 7
    torch.testing.assert_close(soft(w), dequantize(codes, scale[..., 0] * factor, zero[..., 0], group, torch.float32),
                               atol=1e-6, rtol=1e-6)


def _run(recipe, tokens, real_quant=False, epochs=0, checkpoint=None, family="llama", wbits=3, group=16):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    cfg = QuantConfig(wbits=wbits, group_size=group, epochs=epochs, recipe=recipe, real_quant=real_quant,
                      nsamples=tokens.shape[0], seqlen=tokens.shape[1])
    stats = collect_act_stats(model, adapter, tokens, CPU) if cfg.needs_statistics else (None, None)
    torch.manual_seed(0)
    reports = quantize_blocks(model, adapter, tokens, cfg, CPU, *stats, checkpoint=checkpoint)
    return model, reports


@pytest.mark.parametrize("wbits, group", [(2, 16), (3, 24), (4, 24)])
def test_packed_equals_fake_quant_with_tuned_scales(tokens, wbits, group):
    """64 input columns in groups of 24: the last group is shorter."""
    fake, reports = _run(["lwc", PAR], tokens, epochs=1, wbits=wbits, group=group)
    packed, _ = _run(["lwc", PAR], tokens, real_quant=True, epochs=1, wbits=wbits, group=group)
    assert reports[0].stages["tesseraq"]["dequant_factor_range"] != [1.0, 1.0]
    fake_modules = dict(fake.named_modules())
    layers = [(n, m) for n, m in packed.named_modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14
    for name, m in layers:
        assert torch.equal(m.weight(torch.float32), fake_modules[name].weight), name


def test_par_lowers_the_block_loss_below_round_to_nearest(tokens):
    _, reports = _run([{"let": {"ln_matrix": True}}, "lwc", PAR], tokens, epochs=1)
    for report in reports:
        par = report.stages["tesseraq"]
        assert par["loss_par"] < par["loss_rtn"]
        assert 0 < par["changed_vs_rtn"] < 0.5 and len(par["rounds"]) == 5
        assert par["rounds"][-1]["hardened"] > 0.99
    # the committed block (codes, scales x f in fp16) is the block PAR measured: block 0 sees the same inputs
    assert reports[0].final_mse == pytest.approx(reports[0].stages["tesseraq"]["loss_par"], rel=1e-3)


def test_resume_in_the_middle_of_par_equals_an_uninterrupted_run(tokens, tmp_path, monkeypatch):
    cfg = QuantConfig(wbits=3, group_size=16, recipe=["lwc", PAR], epochs=1, nsamples=tokens.shape[0],
                      seqlen=tokens.shape[1])
    full, _ = _run(["lwc", PAR], tokens, epochs=1,
                   checkpoint=CalibrationCheckpoint(tmp_path / "a", cfg, "tiny", "t", 2, resume=False))
    real_learn = tq.TesseraQ.learn
    calls = []

    def killed_in_block_1(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during PAR")
        return real_learn(self, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(tq.TesseraQ, "learn", killed_in_block_1)
        with pytest.raises(KeyboardInterrupt):
            _run(["lwc", PAR], tokens, epochs=1,
                 checkpoint=CalibrationCheckpoint(tmp_path / "b", cfg, "tiny", "t", 2, resume=False))
    assert (tmp_path / "b" / "block_0000.safetensors").is_file()
    assert not (tmp_path / "b" / "block_0001.safetensors").exists()
    resumed, reports = _run(["lwc", PAR], tokens, epochs=1,
                            checkpoint=CalibrationCheckpoint(tmp_path / "b", cfg, "tiny", "t", 2, resume=True))
    assert reports[0].restored and not reports[1].restored
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state, _ = ckpt_module.CalibrationCheckpoint(tmp_path / "b", cfg, "tiny", "t", 2, resume=True).load(0)
    codes = [k for k in state if k.endswith(".codes")]
    assert len(codes) == 7 and all(state[k].dtype == torch.uint8 for k in codes)   # compact: one byte a code


def test_tesseraq_flags_and_refusals():
    cfg = QuantConfig(wbits=3, tesseraq=True, par_iters=3, par_batch=1, par_rounds=8)
    (stage,) = cfg.stages()
    assert stage.name == "tesseraq" and stage.steps == 24
    with pytest.raises(ValueError, match="keep one"):
        QuantConfig(wbits=3, tesseraq=True, gptq=True).validate()
    with pytest.raises(ValueError, match="iters must be at least 1"):
        QuantConfig(wbits=3, recipe=[{"tesseraq": {"iters": 0}}]).validate()
