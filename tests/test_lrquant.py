"""LRQuant's additions: the log-activation initialisation of the LET scales, and test-time adaptation
done right (on the block's real inputs, with activation quantization on)."""
import pytest
import torch

from affinequant.config import QuantConfig

from conftest import FAMILIES, assert_transform_exact, prepared_block

CPU = torch.device("cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_log_activation_init_is_lrquants_formula_and_function_preserving(family, tokens):
    block, bq, inputs, kwargs, reference = prepared_block(family, tokens, QuantConfig(wbits=16, abits=8, let=True,
                                                                                      let_init="log"))
    stage = next(s for s in bq.stages if s.config.name == "let")
    act = stage.ctx.act_scales[bq.adapter.norm_groups[0][1][0]]
    assert torch.allclose(bq.let.norm_params[0], (act / torch.log2(2 + act)).clamp(min=1e-5))
    smooth_block, smooth_bq, *_ = prepared_block(family, tokens, QuantConfig(wbits=16, abits=8, let=True))
    assert not torch.allclose(bq.let.norm_params[0], smooth_bq.let.norm_params[0])
    assert_transform_exact(block, bq, inputs, kwargs, reference, rtol=1e-5)
