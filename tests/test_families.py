"""Families beyond Llama/Qwen2/Mistral/OPT (Qwen3, Gemma-2, Gemma-3 text, Phi-3): each block gets its own
arguments (Gemma's sliding-window and global layers), the quirks the adapters declare (Gemma's (1 + w)
norms, q/k norms, Phi-3's fused projections), and exports that load back with identical logits."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from affinequant.models.adapters import get_adapter
from affinequant.models.blocks import block_output, capture_block_arguments
from affinequant.config import ConfigError, QuantConfig
from affinequant.formats.export import load_quantized

from conftest import save_tiny, tiny_model, write_text
from test_cli import _run_keeping_model, base

CPU = torch.device("cpu")
NEW_FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3"]


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "llama"])
def test_every_block_runs_with_its_own_arguments(family, tokens):
    """Chaining the blocks with the captured arguments reproduces the model's hidden states; on Gemma, block
    0's arguments (a sliding-window layer's mask, and on Gemma-3 its local RoPE) would give block 1 (global)
    another output, which is what sharing block 0's arguments did."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    with torch.no_grad():
        hidden = model(tokens[:2], output_hidden_states=True).hidden_states
    inputs, kwargs = capture_block_arguments(model, adapter, tokens[:2], CPU, torch.float32)
    assert sorted(kwargs) == [0, 1] and torch.equal(inputs, hidden[0])
    layers = adapter.layers(model)
    with torch.no_grad():
        out0 = block_output(layers[0](hidden[0], **kwargs[0]))
        out1 = block_output(layers[1](out0, **kwargs[1]))
        shared = block_output(layers[1](out0, **kwargs[0]))
    assert torch.allclose(out0, hidden[1], atol=1e-5)
    # the model's last hidden state is after the final norm: compare block 1 before it
    final = model.model.norm
    assert torch.allclose(final(out1), hidden[2], atol=1e-4)
    if family != "llama":
        assert not torch.allclose(final(shared), hidden[2], atol=1e-2)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_q_k_norm_families_refuse_the_q_k_matrix(family, tokens):
    from conftest import prepared_block
    with pytest.raises(ConfigError, match="q_norm, k_norm"):
        prepared_block(family, tokens, QuantConfig(wbits=16, abits=8, let=True, use_matrix=True))
    block, bq, *_ = prepared_block(family, tokens, QuantConfig(wbits=16, abits=8, let=True))
    assert bq.let.qk_param is None


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_exports_of_new_families_load_back_identically(family, tmp_path, monkeypatch):
    """W4A8 LWC+LET (runtime format, load_quantized), W3 g16 packed (GPTQ layout, load_quantized) and W3 weight-only
    fake-quant (standard format, stock transformers): the same logits as the calibrated model."""
    monkeypatch.chdir(tmp_path)
    tiny = save_tiny(tmp_path / f"tiny-{family}", family)
    calib = write_text(tmp_path / "calib.txt")
    ids = torch.randint(0, 40, (1, 16))
    for name, flags in [("w4a8", ["--wbits", "4", "--abits", "8", "--lwc", "--let", "--epochs", "1"]),
                        ("w3packed", ["--wbits", "3", "--group_size", "16", "--lwc", "--epochs", "1", "--real_quant"]),
                        ("w3", ["--wbits", "3", "--group_size", "16", "--let", "--lwc", "--epochs", "1"])]:
        model = _run_keeping_model(base(tiny, calib, tmp_path / name, *flags, "--save_dir", str(tmp_path / name / "q")))
        manifest = json.loads((tmp_path / name / "q" / "affinequant.json").read_text())
        reloaded = load_quantized(str(tmp_path / name / "q"))
        with torch.no_grad():
            expected = model(ids).logits
            assert torch.equal(reloaded(ids).logits, expected), name
            if name == "w3":
                assert manifest["format"] == "standard"
                stock = AutoModelForCausalLM.from_pretrained(tmp_path / name / "q").eval()
                assert torch.allclose(stock(ids).logits, expected, atol=1e-5)


def test_the_block_loop_passes_each_block_its_own_arguments(tokens, monkeypatch):
    """Calibration (and with it every exactness test of a transform) runs each Gemma block with the arguments
    the model gives that block: the sliding-window mask to block 0, the global one to block 1."""
    from affinequant.pipeline import calibrate
    model = tiny_model("gemma2")
    adapter = get_adapter(model.config)
    _, expected = capture_block_arguments(model, adapter, tokens[:1], CPU, torch.float32)
    masks = {}
    real = calibrate.BlockRunner.quantize

    def spy(self, block, index, q_inps, fp_inps, kwargs, *a, **k):
        masks[index] = kwargs["attention_mask"]
        return real(self, block, index, q_inps, fp_inps, kwargs, *a, **k)
    monkeypatch.setattr(calibrate.BlockRunner, "quantize", spy)
    calibrate.quantize_blocks(model, adapter, tokens, QuantConfig(wbits=4, nsamples=8), CPU)
    assert not torch.equal(expected[0]["attention_mask"], expected[1]["attention_mask"])
    for index in (0, 1):
        assert torch.equal(masks[index], expected[index]["attention_mask"])
