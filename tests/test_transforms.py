"""LET leaves every block's function unchanged before quantization, on each family (GQA included),
and the differentiable application used in training equals the merged weights."""
import pytest
import torch

from affinequant.calibrate import _block_output
from affinequant.config import QuantConfig
from affinequant.qmodules import QuantLinear, TransformedNorm

from conftest import FAMILIES, assert_transform_exact, prepared_block


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
    assert "self_attn.q_proj" in changed and "self_attn.k_proj" in changed and "self_attn.v_proj" in changed


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
    out = _block_output(block(inputs, **kwargs))
    (out - reference).pow(2).mean().add(out.pow(2).mean()).backward()
    for name, p in bq.let.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
