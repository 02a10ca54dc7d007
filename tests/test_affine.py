"""AffineQuant's matrices: function-preserving before quantization for every matrix kind
(Llama with GQA, Qwen2, OPT, Gemma-2, Phi-3's fused qkv_proj), the gradual-mask schedule, invertibility under the sf used."""
import pytest
import torch

from affinequant.models.adapters import get_adapter
from affinequant.pipeline.calibrate import quantize_blocks
from affinequant.config import QuantConfig
from affinequant.quant.qmodules import TransformedNorm
from affinequant.pipeline.stats import collect_act_stats
from affinequant.stages.transforms import band_count, band_mask, diagonal_dominance

from conftest import assert_transform_exact, prepared_block, tiny_model

CPU = torch.device("cpu")
KINDS = {"ln_matrix": dict(use_ln_matrix=True), "qk_matrix": dict(use_matrix=True),
         "both": dict(use_ln_matrix=True, use_matrix=True)}


def _block_with_matrices(family, tokens, epochs=4, **kinds):
    cfg = QuantConfig(wbits=16, abits=8, let=True, epochs=epochs, sf=1.0, **kinds)
    block, bq, inputs, kwargs, reference = prepared_block(family, tokens, cfg)
    bq.let.set_epoch(epochs - 1, epochs)            # every band unlocked
    torch.manual_seed(5)
    with torch.no_grad():                          # dense, well-conditioned matrices far from diagonal
        for p in bq.let.parameters():
            if p.dim() >= 2:
                p.add_(0.1 * torch.randn_like(p) * p.diagonal(dim1=-2, dim2=-1).abs().mean()
                       if p.shape[-1] == p.shape[-2] else 0.3 * torch.randn_like(p))
            else:
                p.mul_(torch.empty_like(p).uniform_(0.5, 2.0))
    return block, bq, inputs, kwargs, reference


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gemma2", "phi3"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matrices_preserve_block_output(family, kind, tokens):
    block, bq, inputs, kwargs, reference = _block_with_matrices(family, tokens, **KINDS[kind])
    assert bq.let.affine                            # v→o is a per-head matrix in AffineQuant mode
    off_diag = bq.let.out_param - torch.diag_embed(bq.let.out_param.diagonal(dim1=-2, dim2=-1))
    assert off_diag.abs().max() > 0
    assert_transform_exact(block, bq, inputs, kwargs, reference, rtol=1e-4)
    runtime = [m for m in block.modules() if isinstance(m, TransformedNorm)]
    assert len(runtime) == (2 if "ln" in kind or kind == "both" else 0)
    assert all(m.inverse is not None and "inverse" in dict(m.named_buffers()) for m in runtime)


def test_band_schedule():
    assert [band_count(64, e, 4) for e in range(4)] == [1, 22, 43, 64]
    assert band_count(4096, 19, 20) == 4096              # integer arithmetic: the last epoch is full
    assert band_count(64, 0, 1) == 1 and band_count(64, 0, 0) == 1
    first, last = band_mask(8, band_count(8, 0, 5), 0.1, CPU), band_mask(8, band_count(8, 4, 5), 0.1, CPU)
    assert torch.equal(first, torch.eye(8))
    assert torch.equal(last, torch.full((8, 8), 0.1).fill_diagonal_(1.0))
    mid = band_mask(8, 3, 0.5, CPU)
    assert mid[0, 2] == 0.5 and mid[0, 3] == 0 and mid[5, 3] == 0.5 and mid[4, 4] == 1


@pytest.mark.parametrize("epochs", [2, 3])
def test_training_keeps_matrices_dominant(tokens, epochs):
    """Bands unlock over the epochs (off-diagonal entries appear and are trained) and every matrix stays
    strictly diagonally dominant, at each unlock and in the merged model's runtime inverse."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    scales, shifts = collect_act_stats(model, adapter, tokens, CPU)
    cfg = QuantConfig(wbits=3, abits=16, lwc=True, let=True, use_ln_matrix=True, epochs=epochs)
    assert cfg.stability_factor == 1e-2
    reports = quantize_blocks(model, adapter, tokens, cfg, CPU, scales, shifts)
    hidden = model.config.hidden_size
    for r in reports:
        health = r.stages["let"]["matrix_health"]
        assert len(health) == epochs and health[-1]["ln_bands"] == hidden     # every band unlocked at the end
        for h in health[2:]:           # trained off-diagonals, from the epoch after the first unlock on
            doms = [v["dominance"] for v in h.values() if isinstance(v, dict)]
            assert doms and all(1 < d < float("inf") for d in doms)
    with torch.no_grad():
        assert torch.isfinite(model(tokens[:1]).logits).all()
    norms = [m for m in model.modules() if isinstance(m, TransformedNorm)]
    assert len(norms) == 2 * len(reports)            # trained off-diagonals: the inverse stays a runtime op
    for norm in norms:
        matrix = torch.linalg.inv(norm.inverse.double())
        assert 1 < diagonal_dominance(matrix) < float("inf")


@pytest.mark.parametrize("epochs", [0, 1])
def test_diagonal_matrices_fold_into_the_norms(tokens, epochs):
    """With 0 or 1 epochs only the diagonal is unlocked: the matrices stay diagonal and fold like LET."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    scales, shifts = collect_act_stats(model, adapter, tokens, CPU)
    cfg = QuantConfig(wbits=3, abits=16, lwc=True, let=True, use_ln_matrix=True, epochs=epochs)
    reports = quantize_blocks(model, adapter, tokens, cfg, CPU, scales, shifts)
    assert all(len(r.stages.get("let", {}).get("matrix_health", [])) == epochs for r in reports)
    assert not any(isinstance(m, TransformedNorm) for m in model.modules())


def test_ill_conditioned_unlock_backs_off(tokens):
    block, bq, *_ = _block_with_matrices("llama", tokens, epochs=4, use_ln_matrix=True)
    with torch.no_grad():
        bq.let.norm_params[0].copy_(torch.ones_like(bq.let.norm_params[0]))   # rank one: singular when unlocked
    bq.let.ln_sf = bq.let.head_sf = 1.0
    bq.let.ln_bands = 1
    bq.let.set_epoch(0, 4)
    health = bq.let.set_epoch(3, 4)
    assert health["sf"][0] < 1.0 or health["ln_bands"] < 64
    assert health["norm0"]["cond"] < 1e4
    assert diagonal_dominance(torch.eye(3)) > 1
