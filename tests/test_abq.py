"""ABQ-LLM's quantizer options: bit balance (W2*, 5 levels, reported as 2.32 bits) and the rank-1
compensation of down_proj."""
import json
import math

import pytest
import torch

from affinequant.models.adapters import get_adapter
from affinequant.pipeline.calibrate import BlockQuantizer, quantize_blocks
from affinequant.models.blocks import capture_block_inputs
from affinequant.config import ConfigError, QuantConfig
from affinequant.quant.packing import PackedLinear
from affinequant.quant.quantizer import WeightQuantizer
from affinequant.stages.compensation import CompensationConfig
from affinequant.stages.rounding import RTNConfig
from affinequant.pipeline.stats import collect_act_stats

from conftest import save_tiny, tiny_model, write_text
from test_cli import _run_keeping_model, base


def test_bit_balance_quantizes_onto_five_levels():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    balanced = WeightQuantizer((16, 64), 2, 32, balanced=True)
    plain = WeightQuantizer((16, 64), 2, 32)
    codes, scale, zero = balanced.integer_codes(weight)
    assert balanced.qmax == 4 and balanced.storage_bits == 3 and plain.qmax == 3
    assert set(codes.unique().tolist()) == {0, 1, 2, 3, 4}
    assert set(plain.integer_codes(weight)[0].unique().tolist()) == {0, 1, 2, 3}
    # every group's fake-quantized values are 5 points of its grid, and the grid spans the group's range
    fq = balanced(weight).reshape(16, 2, 32)
    assert max(len(g.unique()) for g in fq.reshape(32, 32)) == 5
    w = weight.reshape(16, 2, 32)
    span = w.amax(-1).clamp(min=0) - w.amin(-1).clamp(max=0)
    assert torch.allclose(scale, span / 4, rtol=1e-6)
    # a finer grid: less error than 4 levels on the same weights
    assert (balanced(weight) - weight).pow(2).mean() < (plain(weight) - weight).pow(2).mean()


@pytest.mark.parametrize("flags, expect", [(dict(wbits=3), "--wbits 2"), (dict(wbits=2, symmetric=True), "symmetric")])
def test_bit_balance_is_refused_where_abq_does_not_define_it(flags, expect):
    with pytest.raises(ConfigError, match=expect):
        QuantConfig(bit_balance=True, **flags).validate()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_bit_balance_is_reported_as_2_32_bits_and_packs_in_3_bit_containers(tiny_dir, tmp_path, monkeypatch, capsys):
    """The results, the log and the export name W2* with its effective bits; --real_quant stores the 5 levels
    in 3-bit GPTQ containers that unpack to exactly the fake-quantized weights."""
    monkeypatch.chdir(tmp_path)
    calib = write_text(tmp_path / "calib.txt")
    flags = ["--wbits", "2", "--group_size", "32", "--bit_balance", "--lwc", "--epochs", "1"]
    fake = _run_keeping_model(base(tiny_dir, calib, tmp_path / "fake", *flags))
    results = json.loads((tmp_path / "fake" / "out" / "results.json").read_text())
    assert results["setting"] == "W2*A16g32" and results["effective_wbits"] == pytest.approx(math.log2(5))
    assert "2.32 bits of information per weight, not INT2" in capsys.readouterr().out
    packed = _run_keeping_model(base(tiny_dir, calib, tmp_path / "packed", *flags, "--real_quant", "--save_dir",
                                     str(tmp_path / "q")))
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.bits == 3 for m in layers)
    assert max(int(m.codes().max()) for m in layers) == 4
    ids = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.equal(fake(ids).logits, packed(ids).logits)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 3
    manifest = json.loads((tmp_path / "q" / "affinequant.json").read_text())
    assert manifest["setting"] == "W2*A16g32" and manifest["effective_weight_bits"] == pytest.approx(2.3219, abs=1e-4)


CPU = torch.device("cpu")


def test_compensation_merges_exactly_into_down_proj(tokens):
    """Training's weight (W + a b^T, rebuilt every step without accumulating) and the merged weight give the
    same block output; the merged down_proj is exactly W + a b^T."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    inputs, kwargs = capture_block_inputs(model, adapter, tokens[:2], CPU, torch.float32)
    block = adapter.layers(model)[0]
    with torch.no_grad():
        fp = block(inputs, **kwargs)[0]
    w0 = block.get_submodule("mlp.down_proj").weight.detach().clone()
    bq = BlockQuantizer(block, adapter, model.config, QuantConfig(wbits=16, abits=16), None, None,
                        [CompensationConfig(first=1, last=0), RTNConfig()], index=0)
    stage = bq.stages[0]
    torch.manual_seed(0)
    with torch.no_grad():
        stage.a.copy_(0.1 * torch.randn_like(stage.a))
        stage.b.copy_(torch.randn_like(stage.b))
        for _ in range(3):              # every step starts again from the stored weight
            bq.refresh()
        trained = block(inputs, **kwargs)[0]
        bq.finalize()
        merged = block(inputs, **kwargs)[0]
    assert (trained - fp).abs().max() > 1e-3
    assert torch.allclose(merged, trained, atol=1e-6)
    assert torch.equal(block.get_submodule("mlp.down_proj").weight, w0 + stage.a @ stage.b.T)


def test_compensation_learns_in_the_chosen_blocks_only(tokens):
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    w1 = adapter.layers(model)[1].get_submodule("mlp.down_proj").weight.detach().clone()
    cfg = QuantConfig(wbits=2, group_size=16, epochs=4, nsamples=8,
                      recipe=[{"compensation": {"first": 1, "last": 0, "lr": 5e-2}}, "rtn"])
    reports = quantize_blocks(model, adapter, tokens, cfg.validate(), CPU)
    assert reports[0].stages["compensation"]["relative_norm"] > 0 and reports[0].losses[-1] < reports[0].losses[0]
    assert "compensation" not in reports[1].stages and reports[1].losses == []      # nothing to learn in block 1
    expected = WeightQuantizer(tuple(w1.shape), 2, 16).to(torch.float32)
    assert torch.allclose(adapter.layers(model)[1].get_submodule("mlp.down_proj").weight, expected(w1), atol=1e-3)


@pytest.mark.parametrize("wbits, abits, balance", [(6, 6, False), (2, 8, False), (2, 8, True)])
def test_abq_settings_w6a6_and_w2a8_run(tokens, wbits, abits, balance):
    """ABQ-LLM's table has W6A6 and W2A8 (and W2*A8): they calibrate end to end with LWC+LET, every weight on
    its grid's 2^bits (or 5) levels per channel."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    stats = collect_act_stats(model, adapter, tokens, CPU)
    cfg = QuantConfig(wbits=wbits, abits=abits, lwc=True, let=True, epochs=2, nsamples=8, bit_balance=balance)
    reports = quantize_blocks(model, adapter, tokens, cfg.validate(), CPU, *stats)
    assert all(math.isfinite(x) for r in reports for x in r.losses)
    levels = 5 if balance else 2 ** wbits
    down = adapter.layers(model)[0].get_submodule("mlp.down_proj")
    assert down.act_quantizer.bits == abits
    assert max(len(row.unique()) for row in down.weight) <= levels
    assert max(len(row.unique()) for row in down.weight) > (levels + 1) // 2
