"""LET leaves every block's function unchanged before quantization, on each family (GQA included),
and the differentiable application used in training equals the merged weights."""
import pytest
import torch

from affinequant.models.blocks import block_output
from affinequant.config import QuantConfig
from affinequant.quant.qmodules import QuantLinear, TransformedNorm

from affinequant.models.adapters import get_adapter
from affinequant.pipeline.stats import collect_act_stats
from affinequant.stages.transforms import LET, expand_kv

from conftest import FAMILIES, assert_transform_exact, prepared_block, tiny_model


def _prepared_block(family, tokens):
    # wbits 16: the transform alone is under test.
    block, bq, inputs, kwargs, reference = prepared_block(family, tokens, QuantConfig(wbits=16, abits=8, let=True))
    # Move every LET parameter far from its init, so the test does not pass by scales being ~1.
    torch.manual_seed(3)
    with torch.no_grad():
        for p in bq.let.parameters():
            p.mul_(torch.empty_like(p).uniform_(0.3, 3.0)).add_(0.05 * torch.randn_like(p))
    return block, bq, inputs, kwargs, reference


@pytest.mark.parametrize("family", FAMILIES)
def test_let_preserves_block_output(family, tokens):
    block, bq, inputs, kwargs, reference = _prepared_block(family, tokens)
    assert bq.let.use_shift == (family == "opt")          # shifts only where the norm has a bias
    assert_transform_exact(block, bq, inputs, kwargs, reference, rtol=1e-5)
    # the merge left standard modules behind
    assert not any(isinstance(m, TransformedNorm) for m in block.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_let_actually_changes_weights(family, tokens):
    block, bq, inputs, kwargs, reference = _prepared_block(family, tokens)
    before = {n: m.weight.clone() for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    bq.finalize()
    changed = [n for n, m in block.named_modules() if isinstance(m, (QuantLinear, torch.nn.Linear))
               and not torch.allclose(m.weight, before[n])]
    consumers = {c for _, group in bq.adapter.norm_groups for c in group}
    assert consumers | {bq.adapter.out_pair[1]} <= set(changed)        # q/k/v (or qkv_proj), o, gate/up, fc1


def test_qk_scale_is_tied_across_rope_pairs(tokens):
    block, bq, *_ = _prepared_block("llama", tokens)
    s = bq.let.qk_rows()[1].view(bq.let.n_kv, -1)
    half = s.shape[1] // 2
    assert torch.equal(s[:, :half], s[:, half:])


def test_let_gradients_reach_all_parameters(tokens):
    block, bq, inputs, kwargs, reference = _prepared_block("llama", tokens)
    for q in bq.linears.values():
        q.act_quantizer = torch.nn.Identity()
    for p in bq.let.parameters():
        p.requires_grad_(True)
    bq.refresh()
    out = block_output(block(inputs, **kwargs))
    (out - reference).pow(2).mean().add(out.pow(2).mean()).backward()
    for name, p in bq.let.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_qk_scale_starts_from_q_and_k_statistics(family, tokens):
    """The q ↔ k scale starts SmoothQuant-style from max|q| and max|k| (per KV head, tied per RoPE
    pair): with alpha 0.5, q/s and k·s end up with equal maxima in every (pair of) channel(s), and the
    block's function is unchanged. Statistics without q/k outputs (older files) start it at 1."""
    from affinequant.stages.transforms import QK_OUTPUT
    block, bq, inputs, kwargs, reference = prepared_block(family, tokens, QuantConfig(wbits=16, abits=8, let=True))
    let = bq.let
    q_name, k_name = let.adapter.qk_pair
    with torch.no_grad():       # the recorded statistic is max |q_proj(x)| per output channel
        normed = block.get_submodule(let.adapter.norm_groups[0][0])(inputs)
        q = block.get_submodule(q_name)(normed).reshape(-1, let.n_heads * let.head_dim)
        k = block.get_submodule(k_name)(normed).reshape(-1, let.n_kv * let.head_dim)
    q_rows, k_rows = let.qk_rows()
    q_max = (q * expand_kv(q_rows, let.n_kv, let.n_heads)).abs().amax(0)
    q_max = q_max.view(let.n_kv, let.n_heads // let.n_kv, let.head_dim).amax(1)
    k_max = (k * k_rows).abs().amax(0).view(let.n_kv, let.head_dim)
    if let.adapter.rope:
        q_max, k_max = q_max.view(let.n_kv, 2, -1).amax(1), k_max.view(let.n_kv, 2, -1).amax(1)
    assert not torch.allclose(let.qk_param, torch.ones_like(let.qk_param))
    assert torch.allclose(q_max, k_max, rtol=1e-4)
    assert_transform_exact(block, bq, inputs, kwargs, reference, rtol=1e-5)

    model = tiny_model(family)
    adapter = get_adapter(model.config)
    scales, _ = collect_act_stats(model, adapter, tokens, torch.device("cpu"))
    assert f"model.layers.0.{q_name}{QK_OUTPUT}" in scales or f"model.decoder.layers.0.{q_name}{QK_OUTPUT}" in scales
    old = {k: v for k, v in scales.items() if not k.endswith(QK_OUTPUT)}
    prefix = adapter.layers_path + ".0."
    let_old = LET(adapter.layers(model)[0], adapter, model.config, 0.5,
                  {k[len(prefix):]: v for k, v in old.items() if k.startswith(prefix)}, None, False)
    assert torch.equal(let_old.qk_param, torch.ones_like(let_old.qk_param))
    let_ones = LET(adapter.layers(model)[0], adapter, model.config, 0.5,           # --qk_init ones
                   {k[len(prefix):]: v for k, v in scales.items() if k.startswith(prefix)}, None, False,
                   qk_from_stats=False)
    assert torch.equal(let_ones.qk_param, torch.ones_like(let_ones.qk_param))
