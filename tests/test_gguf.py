"""GGUF export: decoder weights on the legacy symmetric grid are written with their own codes, so the file,
dequantized by the gguf package's reference code, holds our weights bit for bit; metadata comes from the source."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from affinequant.config import ConfigError, QuantConfig
from affinequant.formats.gguf import check_gguf_target, dequantized_state, save_gguf
from affinequant.quant.packing import dequantize
from affinequant.quant.quantizer import WeightQuantizer, fp16_scale

gguf = pytest.importorskip("gguf")


def _source(path):
    """A GGUF file with metadata only, as the model's source."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _model(bits):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            wq = WeightQuantizer(tuple(mod.weight.shape), bits, 32, symmetric=True)
            codes, scale, zero = wq.integer_codes(mod.weight.data)
            mod.weight.data.copy_(dequantize(codes, fp16_scale(scale), zero, 32, torch.float32))
    return model


def _interleaved(w, heads):
    """llama.cpp's rotary row order, computed row by row: in each head, row i of the first half, then row i of
    the second half."""
    hd = w.shape[0] // heads
    order = [h * hd + half * hd // 2 + i for h in range(heads) for i in range(hd // 2) for half in (0, 1)]
    return w[order]


@pytest.mark.parametrize("type_name,bits", [("Q4_0", 4), ("Q5_0", 5), ("Q8_0", 8)])
def test_decoder_weights_written_exactly(tmp_path, type_name, bits):
    model = _model(bits)
    report = save_gguf(model, _source(tmp_path / "src.gguf"), str(tmp_path / "m.gguf"), type_name)
    assert report["requantized_blocks"] == 0 and report["max_abs_diff"] == 0.0
    back = dequantized_state(str(tmp_path / "m.gguf"))
    layer = model.model.layers[1]
    assert torch.equal(back["blk.1.ffn_down.weight"], layer.mlp.down_proj.weight)
    assert torch.equal(back["blk.1.attn_v.weight"], layer.self_attn.v_proj.weight)
    assert torch.equal(back["blk.1.attn_q.weight"], _interleaved(layer.self_attn.q_proj.weight, 4))
    assert torch.equal(back["blk.1.attn_k.weight"], _interleaved(layer.self_attn.k_proj.weight, 2))
    assert "output.weight" not in back          # tied: llama.cpp reuses token_embd
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    assert reader.fields["general.file_type"].contents() == {"Q4_0": 2, "Q5_0": 8, "Q8_0": 7}[type_name]
    assert gguf.GGMLQuantizationType[type_name] in {t.tensor_type for t in reader.tensors}


def test_off_grid_blocks_are_requantized_and_counted(tmp_path):
    model = _model(4)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :32] += 1e-3 * torch.arange(32)   # one block off the grid
    report = save_gguf(model, _source(tmp_path / "src.gguf"), str(tmp_path / "m.gguf"), "Q4_0")
    assert report["requantized_blocks"] == 1 and report["max_abs_diff"] > 0


def test_wrong_grid_refused_before_calibration(tmp_path):
    cfg = QuantConfig(wbits=4, group_size=128, symmetric=True)
    with pytest.raises(ConfigError, match="--group_size 32"):
        check_gguf_target(str(tmp_path / "m.gguf"), "Q4_0", cfg, "model.gguf")
    with pytest.raises(ConfigError, match="loaded from"):
        check_gguf_target(str(tmp_path / "m.gguf"), "Q4_0", QuantConfig(wbits=4, group_size=32, symmetric=True),
                          "some/hf-dir")
