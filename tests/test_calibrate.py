import copy

import pytest
import torch
import torch.nn.functional as F

from affinequant.models.adapters import get_adapter
from affinequant.pipeline.calibrate import quantize_blocks
from affinequant.stages.losses import block_loss
from affinequant.config import QuantConfig
from affinequant.quant.qmodules import QuantLinear, use_quantized_attention
from affinequant.pipeline.stats import collect_act_stats

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
    n_linears = sum(isinstance(m, torch.nn.Linear) for m in tiny_model(family).modules()) - 1   # less the head
    for block in adapter.layers(model):
        attn = block.get_submodule(adapter.attention)
        assert attn.qkv_quantizers is not None and attn.qkv_quantizers.q.bits == 4
    linears = [m for m in adapter.layers(model).modules() if isinstance(m, QuantLinear)]
    assert len(linears) == n_linears and all(m.act_quantizer is not None and m.act_quantizer.bits == 4
                                             for m in linears)
    with torch.no_grad():
        got = model(tokens[:2]).logits
        for m in linears:                   # the activation quantizers are what is running: without them
            m.act_quantizer.bits = 16       # the same weights give other logits
        for block in adapter.layers(model):
            block.get_submodule(adapter.attention).qkv_quantizers = None
        weight_only = model(tokens[:2]).logits
    assert torch.isfinite(got).all() and not torch.allclose(got, ref)
    assert not torch.allclose(got, weight_only, atol=1e-4)


def test_transient_nan_is_rolled_back_and_training_continues(tokens, monkeypatch):
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    calls = {"n": 0}
    real_mse = F.mse_loss

    def flaky(a, b):
        calls["n"] += 1
        loss = real_mse(a, b)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(F, "mse_loss", flaky)
    reports = quantize_blocks(model, adapter, tokens, QuantConfig(wbits=3, lwc=True, epochs=2), CPU)
    assert reports[0].nan_events == 1 and not reports[0].fell_back_to_rtn
    assert len(reports[0].losses) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_nan_falls_back_to_rtn(tokens, monkeypatch):
    model = tiny_model("llama")
    rtn_model = copy.deepcopy(model)
    adapter = get_adapter(model.config)
    with monkeypatch.context() as patch:
        patch.setattr(F, "mse_loss", lambda a, b: (a - b).pow(2).mean() * float("inf"))
        reports = quantize_blocks(model, adapter, tokens, QuantConfig(wbits=3, lwc=True, epochs=2), CPU)
    quantize_blocks(rtn_model, adapter, tokens, QuantConfig(wbits=3, lwc=True, epochs=0), CPU)
    assert all(r.fell_back_to_rtn for r in reports)
    for a, b in zip(model.parameters(), rtn_model.parameters()):
        assert torch.equal(a, b)


def test_one_call_api_computes_statistics_for_let(tokens, monkeypatch):
    """quantize() computes the LET statistics on the samples when none are given, and LET starts from
    them: the same call with those statistics passed in gives the same model."""
    from affinequant import QuantConfig as Cfg, api, quantize
    computed = []
    real = api.collect_act_stats

    def spy(*a, **k):
        computed.append(real(*a, **k))
        return computed[-1]
    monkeypatch.setattr(api, "collect_act_stats", spy)
    model, twin = tiny_model("mistral"), tiny_model("mistral")
    cfg = dict(wbits=4, abits=8, lwc=True, let=True, epochs=1)
    reports = quantize(model, tokens, Cfg(**cfg), device="cpu")
    assert len(computed) == 1 and any(k.endswith("q_proj") for k in computed[0][0])
    assert len(reports) == 2 and all(len(r.losses) == 1 and r.stages["let"]["init"] for r in reports)
    quantize(twin, tokens, Cfg(**cfg), device="cpu", act_stats=computed[0])
    assert len(computed) == 1                                        # given statistics are not recomputed
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    ones = ({k: torch.ones_like(v) for k, v in computed[0][0].items()}, computed[0][1])
    other = tiny_model("mistral")
    quantize(other, tokens, Cfg(**cfg), device="cpu", act_stats=ones)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def _guard_case(tokens, outlier: bool, absurd: bool):
    """Block 0 of a W4A4 LET+LWC run, ready for the LET init guard: (BlockQuantizer, LET stage, data)."""
    import contextlib
    from affinequant.pipeline.calibrate import BlockQuantizer
    from affinequant.models.blocks import block_output, capture_block_inputs
    from affinequant.stages import BlockData
    model = tiny_model("llama")
    if outlier:          # one massive channel into q/k/v: per-token 4-bit activations lose everything else
        with torch.no_grad():
            for block in model.model.layers:
                block.input_layernorm.weight[3] *= 40
    adapter = get_adapter(model.config)
    scales, shifts = collect_act_stats(model, adapter, tokens, CPU)
    if absurd:
        scales = {k: torch.where(torch.arange(v.numel()) % 7 == 0, torch.full_like(v, 1e6), torch.full_like(v, 1e-6))
                  for k, v in scales.items()}
    inputs, kwargs = capture_block_inputs(model, adapter, tokens, CPU, torch.float32)
    block = adapter.layers(model)[0]
    with torch.no_grad():
        target = block_output(block(inputs, **kwargs))
    strip = lambda d: {k[len("model.layers.0."):]: v for k, v in d.items() if k.startswith("model.layers.0.")}  # noqa
    cfg = QuantConfig(wbits=4, abits=4, lwc=True, let=True, epochs=1)
    bq = BlockQuantizer(block, adapter, model.config, cfg, strip(scales), strip(shifts))
    stage = next(s for s in bq.stages if s.config.name == "let")
    return bq, stage, BlockData(inputs, [target], kwargs, CPU, contextlib.nullcontext, 1, True)


@pytest.mark.parametrize("outlier, absurd, expected", [(False, True, "identity"), (True, False, "smoothquant")])
def test_let_init_guard_picks_the_start_with_the_lower_block_loss(tokens, outlier, absurd, expected):
    """The guard's choice equals an independent comparison of the two starts' block losses, and the LET
    parameters are those of the chosen start: absurd statistics lose to the identity, SmoothQuant's
    migration of a massive input channel beats it."""
    bq, stage, data = _guard_case(tokens, outlier, absurd)
    smooth_state = {k: v.clone() for k, v in stage.let.state_dict().items()}

    def probe_loss():
        with torch.no_grad():
            return sum(bq.loss(data, slice(i, i + 1)).item()
                       for i in range(4))
    smooth = probe_loss()
    stage.let.reset_to_identity()
    identity_state = {k: v.clone() for k, v in stage.let.state_dict().items()}
    identity = probe_loss()
    stage.let.load_state_dict(smooth_state)
    assert (smooth <= identity) == (expected == "smoothquant")          # the case is what it claims to be
    stage.prepare(bq, data)
    assert stage.init == expected
    chosen = smooth_state if expected == "smoothquant" else identity_state
    for k, v in stage.let.state_dict().items():
        assert torch.equal(v, chosen[k]), k


def test_let_init_guard_is_reported_per_block(tokens):
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    scales, shifts = collect_act_stats(model, adapter, tokens, CPU)
    reports = quantize_blocks(model, adapter, tokens, QuantConfig(wbits=4, abits=4, lwc=True, let=True, epochs=1),
                              CPU, scales, shifts)
    assert all(r.stages["let"]["init"] in ("smoothquant", "identity") for r in reports)


def _lwc_let_run(tokens, compile_block: bool):
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    cfg = QuantConfig(wbits=3, group_size=16, lwc=True, let=True, epochs=2)
    scales, shifts = collect_act_stats(model, adapter, tokens, CPU)
    reports = quantize_blocks(model, adapter, tokens, cfg, CPU, scales, shifts, compile_block=compile_block)
    return reports, model


def test_compiled_block_trains_as_the_eager_block(tokens):
    """--compile_block: the training steps run through torch.compile and give the eager run's losses and final
    block error to float rounding."""
    from torch._dynamo.utils import counters

    from affinequant.pipeline import trainer
    from affinequant.quant.quantizer import compile_available
    if not compile_available():
        pytest.skip("no C++ compiler for torch.compile")
    eager, _ = _lwc_let_run(tokens, False)
    counters.clear()
    compiled, _ = _lwc_let_run(tokens, True)
    if trainer.compile_failure():
        pytest.skip(f"torch.compile cannot build here: {trainer.compile_failure()}")
    assert counters["stats"]["unique_graphs"] >= 1             # the compiled path ran, not the eager one
    for a, b in zip(eager, compiled):
        assert a.losses == pytest.approx(b.losses, rel=1e-4)
        assert a.final_mse == pytest.approx(b.final_mse, rel=1e-3)


def test_compiled_block_that_cannot_build_trains_eager(tokens, monkeypatch, caplog):
    """A torch.compile that cannot build (no C++ compiler, no Triton) costs one warning; the run trains eager
    and gives the eager run's model bit for bit."""
    from affinequant.pipeline import trainer

    def broken_compile(module, **kwargs):
        def call(*args, **kw):
            raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found")
        return call
    eager_reports, eager_model = _lwc_let_run(tokens, False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(trainer, "_compile_failure", None)
    with caplog.at_level("WARNING"):
        reports, model = _lwc_let_run(tokens, True)
    assert "InvalidCxxCompiler" in trainer.compile_failure()
    assert caplog.text.count("cannot build the block") == 1        # once, not once per block
    assert [r.losses for r in reports] == [r.losses for r in eager_reports]
    for a, b in zip(model.state_dict().values(), eager_model.state_dict().values()):
        assert torch.equal(a, b)
