"""FlatQuant: Kronecker transforms that leave every block unchanged before quantization (with the k-cache
transform inside attention), exact inverses, learnable activation clipping, KV-cache quantization of what
attention reads, FP-input training, the cosine schedule, and exports that load back identically."""
import json
import math

import pytest
import torch

from affinequant.models.blocks import block_output
from affinequant.config import ConfigError, QuantConfig
from affinequant.quant.kronecker import DirectFactor, SVDFactor, decompose_dim, kron_matmul
from affinequant.quant.qmodules import (ATTN_IMPLEMENTATION, ATTN_IMPLEMENTATION_EAGER, OnlineTransform, QKVQuantizers,
                                  QuantLinear, TransformedNorm)
from affinequant.quant.quantizer import ActQuantizer

from conftest import FAMILIES, MOE_FAMILIES, VOCAB, prepared_block, save_tiny, tiny_model, write_text

CPU = torch.device("cpu")


def _flat_block(family, tokens, **cfg):
    """Block 0 under the flatquant stage with quantizers off, its parameters moved far from their start (scales
    and σ multiplied by 0.5..2, the skew parameters shifted), and attention's k-cache transform kept on."""
    block, bq, inputs, kwargs, reference = prepared_block(family, tokens, QuantConfig(
        wbits=16, abits=8, flatquant=True, **cfg))
    stage = bq.stages[0]
    attention = block.get_submodule(bq.adapter.attention)
    attention.qkv_quantizers = QKVQuantizers(16)          # no quantizer, only the k-cache transform
    attention.qkv_quantizers.k_transform = stage.key
    # through our attention function (which applies it), on top of the model's own: SDPA, or eager for Gemma-2
    attention.config._attn_implementation = (ATTN_IMPLEMENTATION_EAGER if attention.config._attn_implementation
                                             == "eager" else ATTN_IMPLEMENTATION)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in stage.transforms.named_parameters():
            if name.endswith(("scale", "sigma")):
                p.mul_(torch.empty_like(p).uniform_(0.5, 2.0))
            else:
                p.add_(0.2 * torch.randn_like(p))
    return block, bq, inputs, kwargs, reference


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES[:1])
def test_transforms_leave_the_block_unchanged_before_quantization(family, tokens):
    block, bq, inputs, kwargs, reference = _flat_block(family, tokens)
    stage = bq.stages[0]
    assert stage.key is not None
    with torch.no_grad():
        bq.refresh()
        trained = block_output(block(inputs, **kwargs))
        bq.finalize()
        merged = block_output(block(inputs, **kwargs))
    scale = reference.abs().max()
    assert (trained - reference).abs().max() / scale < 2e-5
    assert (merged - reference).abs().max() / scale < 2e-5
    # what stays online after the merge: the norms' transforms, o_proj's (heads) and down_proj's (not in MoE)
    online = {n for n, m in block.named_modules() if isinstance(m, OnlineTransform)}
    expected = {f"{norm}.online" for norm, _ in bq.adapter.norm_groups} | {f"{bq.adapter.out_pair[1]}.online"}
    if bq.adapter.mlp_out:
        expected.add(f"{bq.adapter.mlp_out}.online")
    assert online == expected
    assert all(m.train_factors is None for m in block.modules() if isinstance(m, OnlineTransform))


def test_the_transforms_really_change_what_the_linears_see(tokens):
    """Not the identity: q_proj's input after the norm is rotated, and its weight is not the original."""
    block, bq, inputs, kwargs, reference = _flat_block("llama", tokens)
    before = block.self_attn.q_proj.weight.clone()
    with torch.no_grad():
        normed = block.input_layernorm.norm(inputs)         # the stock norm, before the merge folds a scale in
        bq.finalize()
        seen = {}
        block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        block(inputs, **kwargs)
    assert not torch.allclose(seen["x"], normed, atol=1e-3)
    assert not torch.allclose(block.self_attn.q_proj.weight, before, atol=1e-3)


@pytest.mark.parametrize("factor", [SVDFactor, DirectFactor])
def test_factor_inverse_is_exact(factor):
    torch.manual_seed(0)
    f = factor(12)
    with torch.no_grad():
        for name, p in f.named_parameters():
            p.mul_(torch.empty_like(p).uniform_(0.5, 2.0)) if name == "sigma" else p.add_(0.3 * torch.randn_like(p))
    p, p_inv_t = f.pair()
    assert torch.allclose(p @ p_inv_t.T, torch.eye(12), atol=2e-6)
    if factor is SVDFactor:     # orthogonal factors stay orthogonal: P's singular values are exactly σ
        assert torch.allclose(torch.linalg.svdvals(p).sort().values, f.sigma.abs().sort().values, atol=1e-5)


def test_kronecker_matmul_is_the_kronecker_product_and_sizes_are_near_square():
    a, b, x = torch.randn(4, 4), torch.randn(6, 6), torch.randn(3, 5, 24)
    assert torch.allclose(kron_matmul(x, a, b), x @ torch.kron(a, b), atol=1e-5)
    assert torch.allclose(kron_matmul(x, a, None), x @ torch.kron(a, torch.eye(6)), atol=1e-5)
    assert decompose_dim(576) == (24, 24) and decompose_dim(4864) == (64, 76) and decompose_dim(896) == (28, 32)
    assert decompose_dim(13) == (1, 13)


def test_learnable_activation_clipping_narrows_the_token_range_and_learns():
    x = torch.tensor([[-4.0, -1.0, 0.5, 2.0, 4.0]])
    q = ActQuantizer(4)
    q.enable_lac()
    with torch.no_grad():
        q.clip_upper.fill_(0.0)          # sigmoid(0) = 0.5: the max is halved, the min kept
        q.clip_lower.fill_(20.0)
    out = q(x)
    assert out.max() <= 2.0 + 1e-6 and out.min() < -3.9
    q.clip_upper.data.fill_(4.0)
    q(torch.randn(4, 16)).pow(2).sum().backward()
    assert q.clip_upper.grad is not None and q.clip_upper.grad != 0


def _quantized_block(tokens, cfg, edit=None):
    """Block 0 of a tiny Llama under `cfg` with every quantizer on, and its FP output; `edit(model)` first."""
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.calibrate import BlockQuantizer
    from affinequant.models.blocks import capture_block_inputs
    from affinequant.quant.qmodules import use_quantized_attention
    from affinequant.pipeline.stats import collect_act_stats
    model = tiny_model("llama")
    if edit is not None:
        with torch.no_grad():
            edit(model)
    adapter = get_adapter(model.config)
    use_quantized_attention(model)
    scales, _ = collect_act_stats(model, adapter, tokens, CPU)
    inputs, kwargs = capture_block_inputs(model, adapter, tokens, CPU, torch.float32)
    block = adapter.layers(model)[0]
    with torch.no_grad():
        reference = block_output(block(inputs, **kwargs))
    stats = {k[len("model.layers.0."):]: v for k, v in scales.items() if k.startswith("model.layers.0.")}
    return block, BlockQuantizer(block, adapter, model.config, cfg, stats, None), inputs, kwargs, reference


def test_lac_and_transforms_receive_gradients(tokens):
    block, bq, inputs, kwargs, reference = _quantized_block(tokens, QuantConfig(wbits=4, abits=4, flatquant=True))
    assert [s.config.name for s in bq.stages] == ["flatquant", "lwc", "rtn"]
    stage = bq.stages[0]
    groups = bq.param_groups()
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    bq.refresh()
    out = block_output(block(inputs, **kwargs))
    (out - reference).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.transforms.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.lac_parameters())
    assert {g["schedule"] for g in groups} == {"cosine"}         # LWC too, as FlatQuant trains it
    assert len(stage.lac) == len(bq.linears) + 3        # every linear's input, and q, k, v in attention


def test_cosine_schedule_goes_from_lr_to_a_thousandth():
    from affinequant.pipeline.trainer import COSINE_FLOOR, scheduled_lr
    assert scheduled_lr(1.0, "cosine", 0, 100) == pytest.approx(1.0)
    assert scheduled_lr(1.0, "cosine", 50, 100) == pytest.approx((1 + COSINE_FLOOR) / 2)
    assert scheduled_lr(1.0, "cosine", 100, 100) == pytest.approx(COSINE_FLOOR)
    assert scheduled_lr(1.0, None, 100, 100) == 1.0


@pytest.mark.parametrize("kv_bits, q_bits", [(2, 16), (16, 16), (3, 3)])
def test_kv_quantizer_quantizes_what_attention_reads(tokens, kv_bits, q_bits):
    """Per token and head, the k attention reads takes at most 2^kv_bits values (after the k-cache transform),
    q at most 2^q_bits; 16 bits leaves them as they are."""
    from affinequant.quant.qmodules import AttentionProbe
    cfg = QuantConfig(wbits=16, abits=8, kv_bits=kv_bits, q_bits=q_bits, flatquant=True)
    block, bq, inputs, kwargs, _ = _quantized_block(tokens, cfg)
    qkv = getattr(block.self_attn, "qkv_quantizers", None)
    if kv_bits == q_bits == 16:
        assert qkv is None
    else:
        assert (qkv.k is None) == (kv_bits == 16) and (qkv.q is None) == (q_bits == 16)
    with torch.no_grad():
        bq.finalize()
        with AttentionProbe() as reads:
            block(inputs, **kwargs)
    distinct = lambda t: max(len(row.unique()) for row in t.reshape(-1, t.shape[-1]))  # noqa: E731
    head_dim = block.self_attn.head_dim
    assert distinct(reads[0].key) <= (2 ** kv_bits if kv_bits < 16 else head_dim)
    assert distinct(reads[0].query) <= (2 ** q_bits if q_bits < 16 else head_dim)
    if kv_bits == 16:
        assert distinct(reads[0].key) == head_dim
    else:   # the k attention reads is the transformed one: quantizing the untransformed k gives other values
        assert qkv.k_transform is not None and not torch.allclose(qkv.k_transform.key, torch.eye(head_dim))


def test_settings_name_the_kv_bits():
    assert QuantConfig(wbits=4, abits=4).setting == "W4A4KV4"
    assert QuantConfig(wbits=4, abits=4, kv_bits=16).setting == "W4A4KV16"
    assert QuantConfig(wbits=3, abits=16, group_size=128).setting == "W3A16g128"
    assert QuantConfig(wbits=4, abits=16, kv_bits=4).setting == "W4A16KV4"


@pytest.mark.parametrize("kwargs, message", [
    (dict(flatquant=True, real_quant=True, abits=16, epochs=1), "drop --real_quant"),
    (dict(flatquant=True, let=True, abits=4, epochs=1), "keep one"),
    (dict(kv_bits=9, abits=4), "--kv_bits 9"),
    (dict(train_inputs="float", abits=4), "--train_inputs"),
])
def test_bad_flatquant_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(wbits=4, **kwargs).validate()


def test_fp_train_inputs_feed_each_block_its_fp_inputs(tokens, monkeypatch):
    """--train_inputs fp: every block learns on the FP model's hidden states (FlatQuant); the default learns on
    the quantized model's (OmniQuant)."""
    from affinequant.pipeline import calibrate
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.stats import collect_act_stats
    seen = {}
    real = calibrate.train_block

    def spy(bq, data, cfg, report, desc, **kw):
        seen[cfg.train_inputs] = torch.equal(data.inputs, data.fp_inputs)
        return real(bq, data, cfg, report, desc, **kw)
    monkeypatch.setattr(calibrate, "train_block", spy)
    for train_inputs in ("fp", "quantized"):
        model = tiny_model("llama")
        adapter = get_adapter(model.config)
        stats = collect_act_stats(model, adapter, tokens, CPU)
        cfg = QuantConfig(wbits=4, abits=4, flatquant=True, epochs=1, nsamples=8, train_inputs=train_inputs)
        calibrate.quantize_blocks(model, adapter, tokens, cfg, CPU, *stats)     # the last block's inputs stay
    assert seen == {"fp": True, "quantized": False}


def test_gptq_after_flatquant_reads_the_transformed_inputs(tokens):
    """GPTQ's Hessian of o_proj and down_proj is that of the inputs their weights multiply: after the online
    transform."""
    from affinequant.stages import BlockData
    from affinequant.stages.base import linear_hessians
    import contextlib
    block, bq, inputs, kwargs, reference = prepared_block("llama", tokens, QuantConfig(wbits=4, abits=16, flatquant=True))
    bq.refresh()
    data = BlockData(inputs, [reference], kwargs, CPU, contextlib.nullcontext, 8)
    h = linear_hessians(bq.stages[0].ctx, data, ["mlp.down_proj"])["mlp.down_proj"].H
    seen = []
    handle = bq.linears["mlp.down_proj"].register_forward_pre_hook(lambda m, a: seen.append(m.online(a[0])))
    with torch.no_grad():
        block(inputs, **kwargs)
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1]).double()
    assert torch.allclose(h.double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("flags", [["--abits", "4", "--kv_bits", "4", "--q_bits", "16"], ["--abits", "16"],
                                   ["--abits", "4", "--kv_bits", "16", "--direct_inv", "--gptq"]])
def test_flatquant_exports_load_back_with_identical_logits(tmp_path, monkeypatch, flags):
    from transformers import AutoModelForCausalLM

    from affinequant import load_quantized
    from test_cli import _run_keeping_model, base
    monkeypatch.chdir(tmp_path)
    tiny, calib = save_tiny(tmp_path / "tiny"), write_text(tmp_path / "calib.txt")
    model = _run_keeping_model(base(tiny, calib, tmp_path, "--wbits", "4", "--flatquant", "--epochs", "1", *flags,
                                    "--save_dir", str(tmp_path / "q")))
    manifest = json.loads((tmp_path / "q" / "affinequant.json").read_text())
    assert manifest["format"] == "runtime" and manifest["online_transforms"]
    assert bool(manifest["key_transforms"]) == ("--kv_bits" in flags and flags[flags.index("--kv_bits") + 1] == "4")
    assert bool(manifest["lac_quantizers"]) == (flags[1] == "4")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    reloaded = load_quantized(str(tmp_path / "q"))
    ids = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert any(isinstance(m, QuantLinear) and m.online is not None for m in reloaded.modules())
    assert any(isinstance(m, TransformedNorm) and m.online is not None for m in reloaded.modules())


def test_resume_rebuilds_flatquant_exactly(tmp_path, monkeypatch):
    """A finished FlatQuant run rebuilt from its checkpoint with --epochs 0 gives the same logits."""
    from test_cli import _run_keeping_model, base
    monkeypatch.chdir(tmp_path)
    tiny, calib = save_tiny(tmp_path / "tiny"), write_text(tmp_path / "calib.txt")
    flags = ["--wbits", "4", "--abits", "4", "--flatquant", "--kv_bits", "4"]
    first = _run_keeping_model(base(tiny, calib, tmp_path, *flags, "--epochs", "2"))
    rebuilt = _run_keeping_model(base(tiny, calib, tmp_path, *flags, "--epochs", "0", "--resume"))
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(first(ids).logits, rebuilt(ids).logits)
    assert math.isfinite(first(ids).logits.sum().item())


def test_flatquant_defaults_to_its_15_epochs_and_the_rest_to_rtn():
    from affinequant.cli import build_parser, config_from_args
    parse = lambda *a: config_from_args(build_parser().parse_args(list(a)))  # noqa: E731
    assert parse("--abits", "4", "--flatquant").epochs == 15
    assert parse("--abits", "4", "--flatquant", "--epochs", "0").epochs == 0
    assert parse("--wbits", "3").epochs == 0


def test_flatquant_trains_under_bfloat16_autocast(tokens):
    """The GPU path (autocast) runs on the CPU in bfloat16: Cayley solves, Kronecker products and the online
    transforms in mixed precision, losses finite and decreasing."""
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.calibrate import quantize_blocks
    from affinequant.pipeline.stats import collect_act_stats
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    stats = collect_act_stats(model, adapter, tokens, CPU)
    cfg = QuantConfig(wbits=4, abits=4, kv_bits=4, flatquant=True, epochs=6, nsamples=8)
    reports = quantize_blocks(model, adapter, tokens, cfg, CPU, *stats, amp_dtype=torch.bfloat16)
    for report in reports:
        assert all(math.isfinite(x) for x in report.losses) and report.losses[-1] < report.losses[0]


@pytest.mark.parametrize("outlier, expected", [(1.0, "rotation"), (30.0, "identity")])
def test_key_transform_starts_where_the_block_loss_is_lower(tokens, outlier, expected):
    """The k-cache transform starts at FlatQuant's random rotation or at the identity, whichever gives the lower
    block loss: with two k channels 30x the rest (as Qwen2.5's) the identity, otherwise the rotation here."""
    import contextlib
    from affinequant.stages import BlockData
    from affinequant.stages.base import probe_loss

    def boost(model):
        model.model.layers[0].self_attn.k_proj.weight[[3, 21]] *= outlier
    block, bq, inputs, kwargs, reference = _quantized_block(
        tokens, QuantConfig(wbits=16, abits=16, kv_bits=3, q_bits=16, flatquant=True), edit=boost)
    stage = bq.stages[0]
    data = BlockData(inputs, [reference], kwargs, CPU, contextlib.nullcontext, 1)
    factor = stage.transforms["key"]
    rotated = {k: v.clone() for k, v in factor.state_dict().items()}
    losses = {"rotation": probe_loss(bq, data)}
    factor.reset_to_identity()
    losses["identity"] = probe_loss(bq, data)
    factor.load_state_dict(rotated)
    stage.prepare(bq, data)
    assert stage.key_start == expected == min(losses, key=losses.get)
    assert stage.report()["key_start"] == expected
    p, _ = factor.pair()
    assert torch.allclose(p, torch.eye(p.shape[0]), atol=1e-6) == (expected == "identity")
