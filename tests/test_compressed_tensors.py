"""--save_format compressed-tensors: what llm-compressor's own reader (compressed-tensors 0.20) makes of our files
is our model, exactly; load_quantized reads it back; what the format cannot hold is refused before calibration."""
import json

import pytest
import torch
from safetensors.torch import load_file

from affinequant.quant.packing import PackedLinear

from test_cli import _error, _run_keeping_model, base, calib, tiny_dir  # noqa: F401 (fixtures)


def _export(tiny_dir, calib, tmp_path, *flags):
    return _run_keeping_model(base(tiny_dir, calib, tmp_path, *flags, "--lwc", "--epochs", "1", "--real_quant",
                                   "--save_format", "compressed-tensors", "--save_dir", str(tmp_path / "q")))


@pytest.mark.parametrize("flags", [["--wbits", "4", "--group_size", "16", "--symmetric"],
                                   ["--wbits", "4", "--group_size", "32"],
                                   ["--wbits", "3", "--group_size", "16"],
                                   ["--wbits", "8"],                     # per channel
                                   ["--wbits", "2", "--group_size", "32", "--symmetric"]])
def test_their_reader_gives_our_weights_exactly(tiny_dir, calib, tmp_path, flags):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = _export(tiny_dir, calib, tmp_path, *flags)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and (config.get("dtype") or config.get("torch_dtype"))
    qcfg = QuantizationConfig.model_validate(config["quantization_config"])       # their schema accepts it
    scheme = qcfg.config_groups["group_0"]
    symmetric = "--symmetric" in flags
    assert qcfg.format == "pack-quantized" and qcfg.ignore == ["lm_head"] and scheme.weights.symmetric == symmetric
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert layers and not any(k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for k in tensors)
    for name, layer in layers.items():
        local = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        assert ("zero_point" in " ".join(local)) == (not symmetric)
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        # (q − zero) · scale with |q − zero| < 2^8 and float16 scales: exact in float32, and both sides are its
        # one correct rounding to the scales' dtype, so equality is exact on every machine
        assert weight.dtype == torch.float16
        assert torch.equal(weight, layer.weight(torch.float32).to(torch.float16)), name


@pytest.mark.parametrize("symmetric", [[], ["--symmetric"]])
def test_load_quantized_reads_it_back_to_the_same_logits(tiny_dir, calib, tmp_path, symmetric):
    from affinequant import load_quantized
    model = _export(tiny_dir, calib, tmp_path, "--wbits", "4", "--group_size", "16", *symmetric)
    manifest = json.loads((tmp_path / "q" / "affinequant.json").read_text())
    assert manifest["format"] == "compressed-tensors"
    reloaded = load_quantized(str(tmp_path / "q"))
    ids = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("flags, expect", [
    (["--wbits", "4", "--group_size", "16", "--save_dir", "Q"], "add --real_quant"),
    (["--wbits", "4", "--let", "--use_ln_matrix", "--epochs", "1", "--real_quant", "--save_dir", "Q"],
     "--use_ln_matrix keeps modules at run time"),
    (["--wbits", "4", "--group_size", "24", "--real_quant", "--save_dir", "Q"], "does not divide"),
])
def test_what_it_cannot_hold_is_refused_before_calibration(tiny_dir, calib, tmp_path, capsys, monkeypatch, flags,
                                                           expect):
    from affinequant.cli import calibration as cli

    def never(*a, **k):
        raise AssertionError("calibration started")
    monkeypatch.setattr(cli, "quantize_blocks", never)
    flags = [str(tmp_path / "q") if f == "Q" else f for f in flags]
    assert expect.lower() in _error(capsys, base(tiny_dir, calib, tmp_path, *flags, "--save_format",
                                                 "compressed-tensors"))


def test_symmetric_export_refuses_zero_points_off_the_middle():
    """The reference's symmetric convention (zero 2^(bits-1) - 1) is not compressed-tensors' symmetric grid: written
    as symmetric, every weight would shift by one step, so it is refused (asymmetric stores it exactly)."""
    from affinequant.errors import OutputError
    from affinequant.formats.compressed_tensors import to_compressed
    codes = torch.randint(0, 16, (8, 32))
    layer = PackedLinear.from_codes(codes, torch.rand(8, 2) + 0.1, torch.full((8, 2), 7), 4, 16, None, zero_offset=0)
    state = {f"l.{k}": v for k, v in layer.state_dict().items()}
    assert "l.weight_zero_point" in to_compressed(state, {"l": [4, 16, 0]}, symmetric=False)
    with pytest.raises(OutputError, match="off the symmetric grid"):
        to_compressed(state, {"l": [4, 16, 0]}, symmetric=True)
