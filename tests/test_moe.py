"""Mixture-of-experts blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the 3-D expert parameters unpack into
per-expert linears that compute the same thing, every expert is quantized, the router (and Qwen2-MoE's
shared-expert gate) stays in full precision, an expert no calibration token reaches is rounded to nearest and
reported, and the exports load back."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from affinequant.models.adapters import get_adapter
from affinequant.pipeline.calibrate import quantize_blocks
from affinequant.config import QuantConfig
from affinequant.formats.export import load_quantized
from affinequant.models.moe import ExpertLinears, unpack_experts
from affinequant.quant.quantizer import WeightQuantizer
from affinequant.pipeline.stats import collect_act_stats

from conftest import MOE_FAMILIES, save_tiny, tiny_model, write_text
from test_cli import _run_keeping_model, base

CPU = torch.device("cpu")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_unpacked_experts_compute_what_the_3d_experts_compute(family, tokens):
    model = tiny_model(family)
    with torch.no_grad():
        expected = model(tokens[:2]).logits
        assert unpack_experts(model, get_adapter(model.config)) == 2
        assert torch.allclose(model(tokens[:2]).logits, expected, atol=1e-6)


def _on_grid(weight: torch.Tensor, bits: int, group: int) -> bool:
    groups = weight.reshape(weight.shape[0], -1, group)
    return max(len(g.unique()) for row in groups for g in row) <= 2 ** bits


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("rounder", ["rtn", "gptq"])
def test_every_expert_is_quantized_and_the_router_is_not(family, rounder, tokens):
    model = tiny_model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = get_adapter(model.config)
    stats = collect_act_stats(model, adapter, tokens, CPU)
    cfg = QuantConfig(wbits=3, group_size=16, lwc=True, let=True, epochs=1, nsamples=8, gptq=rounder == "gptq")
    reports = quantize_blocks(model, adapter, tokens, cfg.validate(), CPU, *stats)
    for index, block in enumerate(adapter.layers(model)):
        experts = block.get_submodule(adapter.experts)
        assert isinstance(experts, ExpertLinears)
        for e in range(experts.num_experts):
            for proj in ("gate_up_proj", "down_proj"):
                w = getattr(experts[e], proj).weight
                assert _on_grid(w, 3, 16), f"block {index} expert {e} {proj} is not quantized"
                packed = original[f"model.layers.{index}.mlp.experts.{proj}"][e]
                assert not torch.equal(w, packed)
        for name, p in block.named_parameters():
            if name.startswith("mlp.gate.") or name.startswith("mlp.shared_expert_gate."):
                assert torch.equal(p, original[f"model.layers.{index}.{name}"]), name      # full precision
        counts = reports[index].experts["tokens_per_expert"]
        assert sum(counts) == tokens.numel() * 2         # every token goes to 2 experts
    if family == "qwen2_moe":
        shared = adapter.layers(model)[0].get_submodule("mlp.shared_expert.down_proj").weight
        assert _on_grid(shared, 3, 16)


def test_an_expert_no_token_reaches_is_rounded_to_nearest_and_reported(tokens, caplog):
    model = tiny_model("mixtral")
    adapter = get_adapter(model.config)
    original = model.model.layers[0].mlp.experts.down_proj[3].detach().clone()
    for block in adapter.layers(model):       # the router never picks expert 3
        router = block.mlp.gate

        def forward(hidden, router=router):
            logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
            logits[:, 3] = float("-inf")
            probs = logits.float().softmax(-1)
            top, idx = probs.topk(router.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), idx
        router.forward = forward
    stats = collect_act_stats(model, adapter, tokens, CPU)
    cfg = QuantConfig(wbits=3, group_size=16, lwc=True, epochs=2, nsamples=8, lwc_lr=5e-2, gptq=True).validate()
    reports = quantize_blocks(model, adapter, tokens, cfg, CPU, *stats)
    assert reports[0].experts["unseen"] == [3] and reports[0].experts["tokens_per_expert"][3] == 0
    assert "experts [3] saw none of the calibration tokens" in caplog.text
    rtn = WeightQuantizer(tuple(original.shape), 3, 16)
    codes, scale, zero = rtn.integer_codes(original)
    from affinequant.quant.packing import dequantize
    expected = dequantize(codes, scale.half().float(), zero, 16, original.dtype)
    assert torch.equal(model.model.layers[0].mlp.experts[3].down_proj.weight, expected)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_exports_load_back(family, tmp_path, monkeypatch):
    """Weight-only fake-quant: the experts go back into transformers' 3-D layout, and stock transformers loads
    the model with the same logits; with activation quantization or packed weights, load_quantized does."""
    monkeypatch.chdir(tmp_path)
    tiny = save_tiny(tmp_path / f"tiny-{family}", family)
    calib = write_text(tmp_path / "calib.txt")
    ids = torch.randint(0, 40, (1, 16))
    for name, flags in [("w3", ["--wbits", "3", "--group_size", "16", "--lwc", "--epochs", "1"]),
                        ("w4a8", ["--wbits", "4", "--abits", "8", "--lwc", "--let", "--epochs", "1"]),
                        ("packed", ["--wbits", "4", "--group_size", "16", "--real_quant"])]:
        model = _run_keeping_model(base(tiny, calib, tmp_path / name, *flags, "--save_dir", str(tmp_path / name / "q")))
        manifest = json.loads((tmp_path / name / "q" / "affinequant.json").read_text())
        with torch.no_grad():
            expected = model(ids).logits
            reloaded = load_quantized(str(tmp_path / name / "q"))(ids).logits
            if name == "w3":        # stock 3-D experts: the same weights, summed in another order
                assert manifest["format"] == "standard" and not manifest["unpacked_experts"]
                stock = AutoModelForCausalLM.from_pretrained(tmp_path / name / "q").eval()
                assert torch.allclose(stock(ids).logits, expected, atol=1e-5)
                assert torch.allclose(reloaded, expected, atol=1e-5)
            else:
                assert manifest["unpacked_experts"] and torch.equal(reloaded, expected), name
