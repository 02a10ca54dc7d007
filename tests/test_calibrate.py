import copy

import pytest
import torch
import torch.nn.functional as F

from affinequant import calibrate
from affinequant.adapters import get_adapter
from affinequant.calibrate import block_loss, quantize_blocks
from affinequant.config import QuantConfig
from affinequant.qmodules import QuantLinear, use_quantized_attention
from affinequant.stats import collect_act_stats

from conftest import FAMILIES, tiny_model
from test_quantizer import reference_rtn

CPU = torch.device("cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_weights_equal_minmax_of_original(family, tokens):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    adapter = get_adapter(model.config)
    quantize_blocks(model, adapter, tokens, QuantConfig(wbits=3, group_size=16), CPU)
    for (name, lin), (_, orig) in zip(adapter.layers(model).named_modules(), adapter.layers(original).named_modules()):
        if isinstance(orig, torch.nn.Linear):
            assert type(lin) is torch.nn.Linear, "weight-only models keep plain nn.Linear"
            expected = torch.from_numpy(reference_rtn(orig.weight.detach().numpy(), 3, 16, False, fp16_scales=True))
            assert torch.equal(lin.weight, expected), name


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_attention_keeps_causal_mask(family, tokens):
    """Routing attention through our registered function, with no quantizer attached, must give
    exactly the stock logits (a missing mask function would silently drop the causal mask)."""
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(tokens[:2]).logits
        use_quantized_attention(model)
        got = model(tokens[:2]).logits
    assert torch.allclose(got, ref, atol=1e-5)
    # and a later token cannot change an earlier position's output
    changed = tokens[:1].clone()
    changed[0, -1] = (changed[0, -1] + 1) % 96
    with torch.no_grad():
        assert torch.allclose(model(changed).logits[0, :-1], got[0, :-1], atol=1e-5)


@pytest.mark.parametrize("loss", ["mse", "token_rel", "token_cos"])
def test_loss_decreases_with_lwc_and_let(tokens, loss):
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    scales, shifts = collect_act_stats(model, adapter, tokens, CPU)
    cfg = QuantConfig(wbits=2, abits=16, group_size=16, lwc=True, let=True, epochs=8, nsamples=8, lwc_lr=5e-2,
                      loss=loss)
    reports = quantize_blocks(model, adapter, tokens, cfg, CPU, scales, shifts)
    for r in reports:
        assert len(r.losses) == 8
        assert r.losses[-1] < 0.95 * r.losses[0], r.losses


def test_token_relative_loss_weighs_every_token_alike():
    """Under token_rel a token with a 1000x larger residual (an attention sink) counts as much as any
    other at the same relative error; under MSE it swamps the rest."""
    target = torch.randn(1, 6, 32)
    target[0, 0] *= 1000
    out = target * 1.1                      # 10% error on every token: relative error 0.01 each
    assert block_loss(out, target, "token_rel").item() == pytest.approx(0.01, rel=1e-5)
    out2 = out.clone()
    out2[0, 1:] = target[0, 1:]             # exact on all but the sink: token_rel drops by 5/6, MSE barely
    assert block_loss(out2, target, "token_rel").item() == pytest.approx(0.01 / 6, rel=1e-4)
    assert block_loss(out2, target, "mse").item() > 0.99 * block_loss(out, target, "mse").item()
    assert block_loss(out, target, "mse").item() == pytest.approx(F.mse_loss(out, target).item())


def test_token_cos_loss_is_bounded_per_token_and_ignores_scale():
    """token_cos: 1 - cos per token, averaged. A token blown up along another direction (a spurious
    sink) costs at most 2, however large it is; a token right in direction but off in scale costs 0."""
    target = torch.randn(1, 4, 32)
    assert block_loss(target * 3.0, target, "token_cos").item() == pytest.approx(0.0, abs=1e-6)
    out = target.clone()
    out[0, 1] = -1e6 * target[0, 1]          # opposite direction, 1e6x the norm
    assert block_loss(out, target, "token_cos").item() == pytest.approx(2 / 4, rel=1e-5)
    assert block_loss(out, target, "token_rel").item() > 1e11     # token_rel is swamped by that one token
    expected = (1 - F.cosine_similarity(out + 0.1, target, dim=-1)).mean()
    assert block_loss(out + 0.1, target, "token_cos").item() == pytest.approx(expected.item(), rel=1e-6)


def test_training_beats_rtn_on_block_output(tokens):
    base = tiny_model("qwen2")
    adapter = get_adapter(base.config)
    rtn = quantize_blocks(copy.deepcopy(base), adapter, tokens, QuantConfig(wbits=2, group_size=16), CPU)
    lwc = quantize_blocks(copy.deepcopy(base), adapter, tokens,
                          QuantConfig(wbits=2, group_size=16, lwc=True, epochs=6, lwc_lr=5e-2), CPU)
    assert lwc[0].final_mse < rtn[0].final_mse


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_w4a4_with_gqa_runs_and_quantizes_activations(family, tokens):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    scales, shifts = collect_act_stats(model, adapter, tokens, CPU)
    with torch.no_grad():
        ref = model(tokens[:2]).logits
    quantize_blocks(model, adapter, tokens, QuantConfig(wbits=4, abits=4, lwc=True, let=True, epochs=2), CPU,
                    scales, shifts)
    attn = adapter.layers(model)[0].get_submodule(adapter.attention)
    assert attn.qkv_quantizers is not None
    assert all(isinstance(m, QuantLinear) and m.act_quantizer is not None
               for m in adapter.layers(model).modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        got = model(tokens[:2]).logits
    assert torch.isfinite(got).all() and not torch.allclose(got, ref)


def test_transient_nan_is_rolled_back_and_training_continues(tokens, monkeypatch):
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    calls = {"n": 0}
    real_mse = F.mse_loss

    def flaky(a, b):
        calls["n"] += 1
        loss = real_mse(a, b)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(calibrate.F, "mse_loss", flaky)
    reports = quantize_blocks(model, adapter, tokens, QuantConfig(wbits=3, lwc=True, epochs=2), CPU)
    assert reports[0].nan_events == 1 and not reports[0].fell_back_to_rtn
    assert len(reports[0].losses) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_nan_falls_back_to_rtn(tokens, monkeypatch):
    model = tiny_model("llama")
    rtn_model = copy.deepcopy(model)
    adapter = get_adapter(model.config)
    with monkeypatch.context() as patch:
        patch.setattr(calibrate.F, "mse_loss", lambda a, b: (a - b).pow(2).mean() * float("inf"))
        reports = quantize_blocks(model, adapter, tokens, QuantConfig(wbits=3, lwc=True, epochs=2), CPU)
    quantize_blocks(rtn_model, adapter, tokens, QuantConfig(wbits=3, lwc=True, epochs=0), CPU)
    assert all(r.fell_back_to_rtn for r in reports)
    for a, b in zip(model.parameters(), rtn_model.parameters()):
        assert torch.equal(a, b)


def test_one_call_api_computes_statistics_for_let(tokens):
    from affinequant import QuantConfig as Cfg, quantize
    model = tiny_model("mistral")
    reports = quantize(model, tokens, Cfg(wbits=4, abits=8, lwc=True, let=True, epochs=1), device="cpu")
    assert len(reports) == 2 and all(len(r.losses) == 1 for r in reports)


def test_let_init_guard_falls_back_to_identity_when_smoothing_hurts(tokens):
    """Absurd statistics make the SmoothQuant initialisation useless: training starts from the identity."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    scales, shifts = collect_act_stats(model, adapter, tokens, CPU)
    absurd = {k: torch.where(torch.arange(v.numel()) % 7 == 0, torch.full_like(v, 1e6), torch.full_like(v, 1e-6))
              for k, v in scales.items()}
    reports = quantize_blocks(model, adapter, tokens, QuantConfig(wbits=4, abits=4, lwc=True, let=True, epochs=1),
                              CPU, absurd, shifts)
    assert all(r.let_init == "identity" for r in reports)
    sane = quantize_blocks(tiny_model("llama"), adapter, tokens,
                           QuantConfig(wbits=4, abits=4, lwc=True, let=True, epochs=1), CPU, scales, shifts)
    assert all(r.let_init in ("smoothquant", "identity") for r in sane)
