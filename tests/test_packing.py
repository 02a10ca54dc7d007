import pytest
import torch

from affinequant.quant.packing import PackedLinear, dequantize, pack_bits, unpack_bits
from affinequant.quant.quantizer import WeightQuantizer


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [32, 40, 576, 7, 97])
def test_pack_unpack_roundtrip(bits, n):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (n, 5), dtype=torch.int32)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (-(-n * bits // 32), 5)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_three_bit_layout_matches_gptq():
    """GPTQ packs 3-bit codes as one bit stream: word 0 holds codes 0..9 and the low 2 bits of
    code 10, word 1 starts with its high bit."""
    codes = torch.arange(32, dtype=torch.int32)[:, None] % 8
    words = pack_bits(codes, 3).to(torch.int64) & 0xFFFFFFFF
    expected0 = sum(int(codes[j]) << (3 * j) for j in range(10)) | ((int(codes[10]) & 3) << 30)
    assert int(words[0, 0]) == expected0
    assert int(words[1, 0]) & 1 == (int(codes[10]) >> 2) & 1
    assert (int(words[1, 0]) >> 1) & 7 == int(codes[11])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 16, 24])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("zero_offset", [1, 0])
def test_packed_linear_reproduces_fake_quant_bit_for_bit(bits, group, symmetric, zero_offset):
    torch.manual_seed(0)
    w = torch.randn(12, 40)
    w[0] = w[0].abs()                              # an all-positive row: asymmetric zero point 0
    wq = WeightQuantizer((12, 40), bits, group, symmetric, lwc=True)
    with torch.no_grad():
        wq.upbound_factor.uniform_(0, 4)
    codes, scale, zero = wq.integer_codes(w)
    scale16 = scale.half().float()
    fake = dequantize(codes, scale16, zero, group, torch.float32)
    bias = torch.randn(12)
    if zero_offset == 1 and int(zero.min()) == 0:
        with pytest.raises(ValueError, match="gptq_v2"):   # v1 cannot store it: refuse, never wrap around
            PackedLinear.from_codes(codes, scale16, zero, bits, group, bias, zero_offset)
        zero_offset = 0
    packed = PackedLinear.from_codes(codes, scale16, zero, bits, group, bias, zero_offset)
    assert torch.equal(packed.codes(), codes)
    assert torch.equal(packed.zeros(), zero.to(torch.int32))
    assert torch.equal(packed.weight(torch.float32), fake)
    x = torch.randn(3, 40)
    assert torch.equal(packed(x), torch.nn.functional.linear(x, fake, bias))


@pytest.mark.parametrize("bits", [3, 4])
def test_exact_kernel_in_row_tiles_with_a_shared_buffer_stays_bit_exact(bits):
    """The exact kernel dequantizes a tile of output rows at a time (a wide layer: 2^18 // 16400 = 15 rows per tile,
    so 40 rows take three tiles, the last one short, with a shorter last group too) into one buffer that every layer
    reuses outside autograd: two layers run in turn, and again, give their own products; float16 casts as
    `dequantize` does; with autograd the weight is not the shared buffer, so the input's gradient is right."""
    from affinequant.quant import packing
    torch.manual_seed(bits)
    layers, weights = [], []
    for out_f, in_f, group in ((40, 16400, 24), (7, 96, 32)):
        codes = torch.randint(0, 2**bits, (out_f, in_f), dtype=torch.int32)
        groups = -(-in_f // group)
        scale = (torch.rand(out_f, groups) * 0.01 + 1e-3).half().float()
        zero = torch.randint(0, 2**bits, (out_f, groups)).float()
        layers.append(PackedLinear.from_codes(codes, scale, zero, bits, group, None, zero_offset=0))
        weights.append(dequantize(codes, scale, zero, group, torch.float32))
        assert torch.equal(layers[-1].weight(torch.float16), dequantize(codes, scale, zero, group, torch.float16))
    assert len(packing._row_tiles(40, 16400)) == 3
    xs = [torch.randn(2, w.shape[1]) for w in weights]
    with torch.no_grad():
        for _ in range(2):
            for layer, w, x in zip(layers, weights, xs):
                assert torch.equal(layer(x), torch.nn.functional.linear(x, w))
    x = xs[0].clone().requires_grad_()
    y = layers[0](x)
    layers[1](xs[1])                         # overwrites the shared buffer, if layer 0 had used it
    y.sum().backward()
    assert torch.allclose(x.grad, weights[0].sum(0).expand_as(x), rtol=1e-5, atol=1e-6)


def test_zero_offset_reencoding_keeps_weights():
    torch.manual_seed(1)
    w = torch.randn(8, 48)
    codes, scale, zero = WeightQuantizer((8, 48), 3, 16).integer_codes(w)
    v2 = PackedLinear.from_codes(codes, scale, zero, 3, 16, None, zero_offset=0)
    before = v2.weight(torch.float32)
    v2.set_zero_offset(1)
    assert v2.zero_offset == 1 and torch.equal(v2.weight(torch.float32), before)
    stored_v1 = unpack_bits(v2.qzeros.T.contiguous(), 3, 8).T
    assert torch.equal(stored_v1.to(torch.int64), (zero.to(torch.int64).T - 1) & 7)


def test_int4_cpu_kernel_is_close_to_the_exact_packed_layer_and_used_only_where_it_can_run():
    """torch's int4 CPU kernel runs 4-bit layers with bfloat16 activations, scales and offsets: not bit-exact.
    The tolerance: relative error of the output below 1% (bfloat16 keeps 8 bits of mantissa). 2/3-bit codes and a
    shorter last group run on it too; 8-bit layers and group sizes the kernel does not take stay exact."""
    from affinequant.quant.packing import PackedLinear, use_packed_kernel
    from affinequant.quant.quantizer import WeightQuantizer
    torch.manual_seed(0)
    weight = torch.randn(96, 256)
    codes, scale, zero = WeightQuantizer((96, 256), 4, 64).integer_codes(weight)
    layer = PackedLinear.from_codes(codes, scale.half().float(), zero, 4, 64, torch.randn(96), zero_offset=0)
    x = torch.randn(3, 5, 256)
    exact = layer(x)
    assert layer.use_kernel("int4_cpu")
    fast = layer(x)
    assert fast.shape == exact.shape and not torch.equal(fast, exact)
    assert ((fast - exact).norm() / exact.norm()).item() < 1e-2
    for bits in (2, 3):             # lower bit-widths are int4 codes too
        low = PackedLinear.from_codes(*WeightQuantizer((96, 256), bits, 64).integer_codes(weight), bits, 64, None,
                                      zero_offset=0)
        exact_low = low(x)
        assert low.use_kernel("int4_cpu")
        assert ((low(x) - exact_low).norm() / exact_low.norm()).item() < 1e-2
    eight = PackedLinear.from_codes(*WeightQuantizer((96, 256), 8, 64).integer_codes(weight), 8, 64, None, zero_offset=0)
    odd_group = PackedLinear.from_codes(*WeightQuantizer((96, 256), 4, 48).integer_codes(weight), 4, 48, None,
                                        zero_offset=0)
    assert not eight.use_kernel("int4_cpu") and not odd_group.use_kernel("int4_cpu") and eight.kernel == "exact"
    # a shorter last group (200 = 3 x 64 + 8): the kernel gets whole groups, the missing columns padded
    ragged = PackedLinear.from_codes(*WeightQuantizer((96, 200), 4, 64).integer_codes(weight[:, :200]), 4, 64, None,
                                     zero_offset=0)
    exact_ragged = ragged(x[..., :200])
    assert ragged.use_kernel("int4_cpu")
    assert ((ragged(x[..., :200]) - exact_ragged).norm() / exact_ragged.norm()).item() < 1e-2
    model = torch.nn.Sequential(layer, eight)
    assert use_packed_kernel(model, "exact") == (2, 2) and layer.kernel == "exact"
    assert use_packed_kernel(model, "int4_cpu") == (1, 2)


@pytest.mark.parametrize("bf16_hardware", [False, True])
def test_int4_cpu_kernel_takes_long_inputs_only_with_bf16_hardware(bf16_hardware, monkeypatch):
    """Without bfloat16 matrix instructions the int4 kernel is slower than the exact one on long inputs, so inputs of
    more than INT4_CPU_MAX_ROWS_WITHOUT_BF16 rows take the exact path there (bit for bit); with them, the int4 kernel."""
    from affinequant.quant import packing
    from affinequant.quant.quantizer import WeightQuantizer
    monkeypatch.setattr(packing, "cpu_has_bf16_matmul", lambda: bf16_hardware)
    torch.manual_seed(0)
    args = (*WeightQuantizer((32, 64), 4, 32).integer_codes(torch.randn(32, 64)), 4, 32, None)
    exact, fast = PackedLinear.from_codes(*args, zero_offset=0), PackedLinear.from_codes(*args, zero_offset=0)
    assert fast.use_kernel("cpu")
    short, long = torch.randn(4, 64), torch.randn(packing.INT4_CPU_MAX_ROWS_WITHOUT_BF16 + 1, 64)
    assert not torch.equal(fast(short), exact(short))
    assert torch.equal(fast(long), exact(long)) != bf16_hardware


@pytest.mark.parametrize("group", [None, 64])
def test_int8_cpu_kernel_is_close_to_the_exact_8bit_layer(group):
    """8-bit layers on torch's int8 CPU kernel: codes shifted to signed, the zero points a per-group correction
    term; bfloat16 activations, so within 1% of the exact layer, not bit-exact. "cpu" picks int4 or int8 by bits."""
    from affinequant.quant.packing import PackedLinear, use_packed_kernel
    from affinequant.quant.quantizer import WeightQuantizer
    torch.manual_seed(0)
    weight = torch.randn(96, 256) + 0.5            # asymmetric ranges: zero points far from 128
    layer = PackedLinear.from_codes(*WeightQuantizer((96, 256), 8, group).integer_codes(weight), 8, group,
                                    torch.randn(96), zero_offset=0)
    x = torch.randn(3, 5, 256)
    exact = layer(x)
    assert layer.use_kernel("int8_cpu") and layer.kernel == "int8_cpu"
    fast = layer(x)
    assert not torch.equal(fast, exact) and ((fast - exact).norm() / exact.norm()).item() < 1e-2
    long = torch.randn(2, 40, 256)                 # more rows than INT8_CPU_MAX_ROWS: the exact path, bit for bit
    assert torch.equal(layer(long), PackedLinear.from_codes(*WeightQuantizer((96, 256), 8, group).integer_codes(
        weight), 8, group, layer.bias, zero_offset=0)(long))
    four = PackedLinear.from_codes(*WeightQuantizer((96, 256), 4, 64).integer_codes(weight), 4, 64, None,
                                   zero_offset=0)
    assert not four.use_kernel("int8_cpu") and four.kernel == "exact"
    use_packed_kernel(torch.nn.Sequential(layer, four), "cpu")
    assert (layer.kernel, four.kernel) == ("int8_cpu", "int4_cpu")
