"""GGUF export: decoder weights on a legacy type's grid (symmetric Q4_0/Q5_0/Q8_0, and Q4_1/Q5_1 with a minimum
per block) are written with their own codes, so the file, dequantized by the gguf package's reference code, holds
our weights bit for bit; metadata comes from the source."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from affinequant.config import ConfigError, QuantConfig
from affinequant.formats.gguf import GGUF_TYPES, check_gguf_target, dequantized_state, save_gguf
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


def _model(bits, symmetric=True, scale_bits=11):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    for name, mod in model.model.layers.named_modules():
        if bits < 16 and isinstance(mod, torch.nn.Linear):
            wq = WeightQuantizer(tuple(mod.weight.shape), bits, 32, symmetric=symmetric)
            codes, scale, zero = wq.integer_codes(mod.weight.data)
            mod.weight.data.copy_(dequantize(codes, fp16_scale(scale, scale_bits), zero, 32, torch.float32))
    return model


def _interleaved(w, heads):
    """llama.cpp's rotary row order, computed row by row: in each head, row i of the first half, then row i of
    the second half."""
    hd = w.shape[0] // heads
    order = [h * hd + half * hd // 2 + i for h in range(heads) for i in range(hd // 2) for half in (0, 1)]
    return w[order]


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"])
def test_decoder_weights_written_exactly(tmp_path, type_name):
    gtype = GGUF_TYPES[type_name]
    model = _model(gtype.bits, gtype.symmetric, gtype.scale_bits)
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
    # llama.cpp's LLAMA_FTYPE_MOSTLY_* (llama.h)
    assert reader.fields["general.file_type"].contents() == {"Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9,
                                                             "Q8_0": 7}[type_name]
    assert gguf.GGMLQuantizationType[type_name] in {t.tensor_type for t in reader.tensors}


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_and_head_get_llama_cpp_types(tmp_path, tied):
    """As llama.cpp's quantizer: the head (or the embedding tied to it) in Q8_0, an untied embedding in the file's
    type, each quantized from the full-precision weights by the reference code."""
    model = _model(4)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.02)
    save_gguf(model, _source(tmp_path / "src.gguf"), str(tmp_path / "m.gguf"), "Q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["token_embd.weight"] == ("Q8_0" if tied else "Q4_0")
    assert types.get("output.weight") == (None if tied else "Q8_0")
    back = dequantized_state(str(tmp_path / "m.gguf"))
    embedding = model.model.embed_tokens.weight.detach()
    expected = gguf.quants.dequantize(gguf.quants.quantize(embedding.numpy(), gguf.GGMLQuantizationType[types[
        "token_embd.weight"]]), gguf.GGMLQuantizationType[types["token_embd.weight"]])
    assert torch.equal(back["token_embd.weight"], torch.from_numpy(expected))


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


@pytest.mark.parametrize("type_name", ["Q4_1", "Q5_1"])
def test_full_fp16_scales_are_off_the_offset_grid(tmp_path, type_name):
    """Why scale_bits exists: with float16's 11 significant bits, many blocks' minima s·z are no float16 values,
    so those blocks could not be written exactly."""
    gtype = GGUF_TYPES[type_name]
    model = _model(gtype.bits, symmetric=False, scale_bits=11)
    report = save_gguf(model, _source(tmp_path / "src.gguf"), str(tmp_path / "m.gguf"), type_name)
    assert report["requantized_blocks"] > 0


@pytest.mark.parametrize("significant_bits", [6, 7])
def test_fp16_scale_keeps_the_significant_bits_asked(significant_bits):
    scale = torch.rand(4096) * 0.1 + 1e-3
    stored = fp16_scale(scale, significant_bits)
    mantissa, _ = torch.frexp(stored)
    assert torch.equal(mantissa * 2 ** significant_bits, (mantissa * 2 ** significant_bits).round())
    assert torch.equal(stored, stored.half().float())
    assert float(((stored - scale).abs() / scale).max()) <= 2.0 ** -significant_bits + 2.0 ** -11
    assert torch.equal(fp16_scale(stored, significant_bits), stored)        # idempotent


@pytest.mark.parametrize("type_name", ["Q4_1", "Q5_1"])
@pytest.mark.parametrize("rounder", ["gptq", "tesseraq"])
@pytest.mark.parametrize("e2e_steps", [0, 2])
def test_asymmetric_run_writes_the_offset_type_exactly(tmp_path, type_name, rounder, e2e_steps):
    """The calibration path: with the type's scale_bits, the rounder and E2E's refined scales commit a grid the
    offset type holds, so the file has our calibrated weights bit for bit."""
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.calibrate import quantize_blocks
    gtype = GGUF_TYPES[type_name]
    model = _model(16)          # full precision
    samples = torch.randint(0, 96, (2, 16))
    cfg = QuantConfig(wbits=gtype.bits, group_size=32, nsamples=2, seqlen=16, scale_bits=gtype.scale_bits,
                      e2e_steps=e2e_steps, e2e_lr=0.05, par_iters=2, par_rounds=2, par_batch=1, **{rounder: True})
    quantize_blocks(model, get_adapter(model.config), samples, cfg, torch.device("cpu"))
    report = save_gguf(model, _source(tmp_path / "src.gguf"), str(tmp_path / "m.gguf"), type_name)
    assert report["requantized_blocks"] == 0 and report["max_abs_diff"] == 0.0
    back = dequantized_state(str(tmp_path / "m.gguf"))
    assert torch.equal(back["blk.1.ffn_down.weight"], model.model.layers[1].mlp.down_proj.weight.float())


@pytest.mark.parametrize("flags, scale_bits", [(["--gguf_type", "Q4_1"], 7), (["--gguf_type", "Q5_1", "--wbits", "5"], 6),
                                               ([], 7), (["--wbits", "5"], 6), (["--symmetric"], 11)])
def test_the_gguf_type_sets_the_scales_precision(flags, scale_bits):
    from affinequant.cli.args import build_parser, config_from_args
    args = build_parser().parse_args(["--model", "m.gguf", "--wbits", "4", "--group_size", "32",
                                      "--save_gguf", "o.gguf", *flags])
    assert config_from_args(args).scale_bits == scale_bits
    assert args.gguf_type == {7: "Q4_1", 6: "Q5_1", 11: "Q4_0"}[scale_bits]


def test_asymmetric_q4_0_is_refused_with_the_type_that_fits(tmp_path):
    with pytest.raises(ConfigError, match="pick --gguf_type Q4_1"):
        check_gguf_target(str(tmp_path / "m.gguf"), "Q4_0", QuantConfig(wbits=4, group_size=32, scale_bits=7),
                          "model.gguf")
    with pytest.raises(ConfigError, match="at most 7 significant bits"):
        check_gguf_target(str(tmp_path / "m.gguf"), "Q4_1", QuantConfig(wbits=4, group_size=32), "model.gguf")


def _k_model():
    """Rows of 256 (q/k/v/o/gate/up: whole super-blocks) and of 320 (down: llama.cpp's fallback type)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("type_name", ["Q3_K", "Q6_K"])
@pytest.mark.parametrize("rounder, e2e_steps", [("rtn", 0), ("gptq", 0), ("tesseraq", 0), ("gptq", 2)])
def test_k_quant_run_writes_its_file_exactly(tmp_path, type_name, rounder, e2e_steps):
    """Calibrated on the K-quant's own grid (double-quantized scales included) where rows are whole super-blocks
    and on the fallback's elsewhere, the file holds the calibrated weights bit for bit, in those types."""
    from affinequant.models.adapters import get_adapter
    from affinequant.formats.gguf import gguf_layer_grids
    from affinequant.pipeline.allocate import quantized_linears
    from affinequant.pipeline.calibrate import quantize_blocks
    gtype = GGUF_TYPES[type_name]
    model = _k_model()
    adapter = get_adapter(model.config)
    cfg = QuantConfig(wbits=gtype.bits, group_size=16, symmetric=True, nsamples=2, seqlen=16, e2e_steps=e2e_steps,
                      e2e_lr=0.05, par_iters=2, par_rounds=2, par_batch=1,
                      **({rounder: True} if rounder != "rtn" else {}))
    cfg.layer_grids = gguf_layer_grids(type_name, {n: m.in_features for n, m in quantized_linears(model, adapter).items()})
    quantize_blocks(model, adapter, torch.randint(0, 96, (2, 16)), cfg, torch.device("cpu"))
    report = save_gguf(model, _source(tmp_path / "src.gguf"), str(tmp_path / "m.gguf"), type_name)
    assert report["requantized_blocks"] == 0 and report["max_abs_diff"] == 0.0
    fallback = gtype.fallback
    # token_embd (the tied head): Q6_K, rounded to nearest
    assert report["tensor_types"] == ({"F32": 5, type_name: 12, fallback: 2, "Q6_K": 1} if type_name == "Q3_K"
                                      else {"F32": 5, "Q6_K": 13, "Q8_0": 2})
    back = dequantized_state(str(tmp_path / "m.gguf"))
    layer = model.model.layers[1]
    assert torch.equal(back["blk.1.ffn_up.weight"], layer.mlp.up_proj.weight.float())
    assert torch.equal(back["blk.1.ffn_down.weight"], layer.mlp.down_proj.weight.float())
    assert torch.equal(back["blk.1.attn_q.weight"], _interleaved(layer.self_attn.q_proj.weight.float(), 4))


@pytest.mark.parametrize("sub_max", [31, 127])
@pytest.mark.parametrize("magnitude", [1e-2, 1e-4])
def test_superblock_scales_are_a_float16_step_times_small_integers(sub_max, magnitude):
    """At 1e-4 the step d = largest scale / sub_max is a float16 subnormal (as in Qwen's down_proj): it must stay
    one, not be raised to the smallest normal, which leaves the largest group only a few of sub_max's steps."""
    from affinequant.quant.quantizer import superblock_steps
    torch.manual_seed(0)
    scale = torch.rand(8, 32) * magnitude + magnitude / 100
    d, k = superblock_steps(scale, 16, sub_max)
    runs = scale.reshape(8, 2, 16)
    top = runs.amax(-1)
    assert torch.equal(d, d.half().float()) and torch.equal(k, k.round()) and k.min() >= 1 and k.max() <= sub_max
    # d is float16's nearest to top / sub_max, or the next one up where the nearest would put top past
    # sub_max + 1/2: the largest scale then moves by at most d/2, as every scale of at least d does
    nearest = (top / sub_max).half().float()
    up = (nearest.half().view(torch.int16) + 1).view(torch.float16).float()
    assert torch.equal(d, torch.where(top > nearest * (sub_max + 0.5), up, nearest))
    stored = d[..., None] * k
    free = runs >= d[..., None]
    assert float(((stored - runs).abs() - (d[..., None] / 2 + runs * 2.0 ** -20))[free].max()) <= 0
    assert torch.equal(stored[~free], d[..., None].expand_as(stored)[~free])     # a smaller one is d (k = 1)


@pytest.mark.parametrize("type_name", ["Q3_K", "Q6_K"])
def test_superblock_encoding_is_recovered_from_the_weights(type_name):
    """(d, k, q) drawn at random, with what made the recovery fail on Qwen's down_proj: steps d that are float16
    subnormals, and groups (the largest one included) whose codes share a factor or stop short of the range, so
    that the group's finest step is not its own. The weights (d·k)·q must be found exact, as the file holds them."""
    from affinequant.formats.gguf import _exact_superblocks
    gtype = GGUF_TYPES[type_name]
    G, gs, low = gtype.super_groups, gtype.group_size, -(2 ** (gtype.bits - 1))
    rng = np.random.default_rng(0)
    n = 400
    d = (10.0 ** rng.uniform(-7, -2, n)).astype(np.float16).astype(np.float32)       # normal and subnormal
    k = rng.integers(1, gtype.sub_max + 1, (n, G))
    k[np.arange(n), rng.integers(0, G, n)] = rng.integers(gtype.sub_max - 3, gtype.sub_max + 1, n)
    q = rng.integers(low, -low, (n, G, gs))
    factor = rng.choice([1, 1, 2, 3], (n, G))                     # codes that are all multiples of 2 or 3
    q = np.clip(q // factor[..., None] * factor[..., None], low, -low - 1)
    q[rng.random((n, G)) < 0.2] //= 2                              # codes in half the range
    q[:5, 3] = 0                                                   # an all-zero group
    w = ((d[:, None] * k.astype(np.float32))[:, :, None] * q).astype(np.float32).reshape(n // 4, 4 * G * gs)
    d2, k2, q2, off = _exact_superblocks(w, gtype)
    assert not off.any()
    back = (d2[:, None] * k2.astype(np.float32))[:, :, None] * q2.reshape(n, G, gs)
    assert np.array_equal(back.reshape(w.shape), w)
    assert k2.min() >= 1 and k2.max() <= gtype.sub_max and q2.min() >= low and q2.max() <= -low - 1


def test_k_quant_refuses_real_quant(tmp_path):
    cfg = QuantConfig(wbits=6, group_size=16, symmetric=True, real_quant=True)
    with pytest.raises(ConfigError, match="drop --real_quant"):
        check_gguf_target(str(tmp_path / "m.gguf"), "Q6_K", cfg, "model.gguf")
