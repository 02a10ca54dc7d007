"""Block objectives (losses.py): LRQuant's NLC, ABQ-LLM's distribution correction (two targets and the
attention-map KL), and their parsing from --loss."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from affinequant.models.adapters import get_adapter
from affinequant.pipeline.calibrate import quantize_blocks
from affinequant.models.blocks import block_output, capture_block_inputs
from affinequant.config import ConfigError, QuantConfig
from affinequant.stages.losses import BlockObjective, LossBatch
from affinequant.quant.qmodules import AttentionProbe, QKVQuantizers, use_quantized_attention
from affinequant.pipeline.stats import collect_act_stats

from conftest import tiny_model

CPU = torch.device("cpu")


def test_nlc_is_minus_log_of_the_absolute_mean_token_cosine():
    """Hand-computed: token cosines 1 and 0 average to 0.5, so NLC = log 2; cosines -1 and -0.5 average to
    -0.75, and LRQuant takes the absolute value after the mean: -log 0.75."""
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    out = torch.tensor([[[2.0, 0.0], [3.0, 0.0]]])               # cos 1 (scaled), cos 0 (orthogonal)
    nlc = BlockObjective.parse("nlc")
    assert nlc(LossBatch(out, [target])).item() == pytest.approx(math.log(2), rel=1e-6)
    out = torch.tensor([[[-1.0, 0.0], [math.sqrt(3), -1.0]]])  # cos -1, and cos(120 degrees) = -0.5
    assert nlc(LossBatch(out, [target])).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    # LRQuant's objective is MSE + NLC, 1:1, and each target term sums over the targets
    both = BlockObjective.parse("mse+nlc")(LossBatch(out, [target, target])).item()
    assert both == pytest.approx(2 * (F.mse_loss(out, target).item() - math.log(0.75)), rel=1e-6)


def test_loss_specs_parse_weights_presets_and_refuse_unknown_terms():
    spec = BlockObjective.parse("mse+0.5*nlc")
    assert spec.terms == (("mse", 1.0), ("nlc", 0.5)) and not spec.two_targets and not spec.needs_attention
    dc = BlockObjective.parse("dc")
    assert dc.terms == (("mse", 1.0), ("nlc", 1.0), ("attn_kl", 1.0)) and dc.two_targets and dc.needs_attention
    assert QuantConfig(loss="dc").two_targets and not QuantConfig(loss="mse+nlc").two_targets
    for bad in ("msee", "mse+", "mse*2", "0*mse"):
        with pytest.raises(ConfigError, match="--loss"):
            QuantConfig(loss=bad).validate()


def _first_block(family="llama", seed=0):
    model = tiny_model(family, seed)
    adapter = get_adapter(model.config)
    use_quantized_attention(model)
    torch.manual_seed(3)
    inputs, kwargs = capture_block_inputs(model, adapter, torch.randint(0, 96, (2, 24)), CPU, torch.float32)
    return model, adapter, adapter.layers(model)[0], inputs, kwargs


def _reads(block, inputs, kwargs, stop=False):
    with torch.no_grad(), AttentionProbe(stop=stop) as reads:
        block(inputs, **kwargs)
    return reads


def test_attention_maps_recorded_are_the_ones_eager_attention_computes():
    """The map rebuilt from what attention read (q, k after RoPE, GQA groups, mask, scaling) equals the
    attention weights of transformers' eager attention on the same block."""
    model, adapter, block, inputs, kwargs = _first_block()
    (read,) = _reads(block, inputs, kwargs)
    assert kwargs["attention_mask"] is None      # SDPA's causal path: the map's causal mask is ours to build
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    for module in eager.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = "eager"
    attn = adapter.layers(eager)[0].get_submodule(adapter.attention)
    torch.manual_seed(3)
    eager_inputs, eager_kwargs = capture_block_inputs(eager, adapter, torch.randint(0, 96, (2, 24)), CPU,
                                                      torch.float32)
    assert torch.equal(eager_inputs, inputs)
    captured = {}
    handle = attn.register_forward_hook(lambda m, a, out: captured.update(w=out[1]))
    with torch.no_grad():
        adapter.layers(eager)[0](inputs, **eager_kwargs)
    handle.remove()
    assert read.groups == 2          # tiny llama: 4 query heads on 2 key/value heads
    assert torch.allclose(read.log_probs().exp(), captured["w"], atol=1e-6)


def test_attention_kl_is_zero_without_quantization_and_positive_with_it():
    model, adapter, block, inputs, kwargs = _first_block()
    objective = BlockObjective.parse("attn_kl")
    fp_reads = _reads(copy.deepcopy(block), inputs, kwargs, stop=True)
    assert len(fp_reads) == 1        # stop=True ends the FP forward at its attention call
    out = block_output(block(inputs, **kwargs))
    same = objective(LossBatch(out, [out], _reads(block, inputs, kwargs), fp_reads)).item()
    assert abs(same) < 1e-9
    block.get_submodule(adapter.attention).qkv_quantizers = QKVQuantizers(3)
    quantized = objective(LossBatch(out, [out], _reads(block, inputs, kwargs), fp_reads)).item()
    assert quantized > 1e-6        # near-uniform maps of a random model: small, but 1000x the FP level
    # symmetric: KL(P||Q) + KL(Q||P), checked against an independent computation of both directions
    p = fp_reads[0].log_probs()
    q = _reads(block, inputs, kwargs)[0].log_probs()
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    kl = lambda a, b: (a.exp() * (a - b)).masked_fill(~causal, 0).sum(-1).mean()  # noqa: E731
    assert quantized == pytest.approx((kl(p, q) + kl(q, p)).item(), rel=1e-5)


@pytest.mark.parametrize("family, loss", [("llama", "dc"), ("opt", "dc"), ("qwen2", "mse+nlc")])
def test_block_objectives_train_end_to_end(tokens, family, loss):
    """W2A4 LWC+LET under LRQuant's and ABQ-LLM's objectives: every block trains with finite, decreasing
    losses, and the distribution-correction run learns something else than plain MSE."""
    results = {}
    for objective in ("mse", loss):
        model = tiny_model(family)
        adapter = get_adapter(model.config)
        scales, shifts = collect_act_stats(model, adapter, tokens, CPU)
        cfg = QuantConfig(wbits=2, abits=4, group_size=16, lwc=True, let=True, epochs=6, nsamples=8, lwc_lr=5e-2,
                          loss=objective)
        reports = quantize_blocks(model, adapter, tokens, cfg, CPU, scales, shifts)
        for r in reports:
            assert all(math.isfinite(x) for x in r.losses) and r.losses[-1] < r.losses[0], r.losses
            assert not r.fell_back_to_rtn
        results[objective] = [r.losses for r in reports]
    assert results["mse"] != results[loss]
