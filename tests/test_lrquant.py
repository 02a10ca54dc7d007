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


def _quantized_w4a4(tokens):
    from affinequant.models.adapters import get_adapter
    from affinequant.pipeline.calibrate import quantize_blocks
    from affinequant.pipeline.stats import collect_act_stats
    from conftest import tiny_model
    import copy

    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    adapter = get_adapter(model.config)
    stats = collect_act_stats(model, adapter, tokens, CPU)
    cfg = QuantConfig(wbits=4, abits=4, lwc=True, let=True, epochs=1, nsamples=tokens.shape[0])
    quantize_blocks(model, adapter, tokens, cfg, CPU, *stats)
    return model, reference, adapter, cfg, stats


def test_tta_trains_on_the_blocks_real_inputs_with_activation_quantization_on(tokens, monkeypatch):
    """The two faults of the reference's TTA: its last block trains on the embeddings, and runs with FP
    activations afterwards. Here the block's training inputs are the quantized model's hidden states at
    that block, and its activation quantizers run in training and in the adapted model's evaluation."""
    from affinequant.pipeline import calibrate, tta
    from affinequant.quant.qmodules import QuantLinear
    from affinequant.quant.quantizer import ActQuantizer

    model, reference, adapter, cfg, stats = _quantized_w4a4(tokens)
    windows = torch.randint(0, 96, (3, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states     # [embeddings, block 0 out, ...]
    seen = {}
    real_quantize = calibrate.BlockRunner.quantize

    def spy(self, block, index, q_inps, fp_inps, kwargs, *a, **k):
        seen["index"], seen["inputs"], seen["fp_inputs"] = index, q_inps.clone(), fp_inps.clone()
        calls = []
        real_forward = ActQuantizer.forward

        def counted(quantizer, x):          # the quantizers are installed inside quantize: count at the class
            calls.append(torch.is_grad_enabled())
            return real_forward(quantizer, x)
        ActQuantizer.forward = counted
        try:
            out = real_quantize(self, block, index, q_inps, fp_inps, kwargs, *a, **k)
        finally:
            ActQuantizer.forward = real_forward
        seen["act_quantizer_calls_in_training"] = sum(calls)
        return out
    monkeypatch.setattr(calibrate.BlockRunner, "quantize", spy)
    adapted, report = tta.adapt(model, reference, adapter, windows, cfg, tta.TTAConfig(blocks=1, epochs=2), CPU,
                                torch.float16, *stats)
    assert seen["index"] == 1 and list(adapted) == [1]
    assert torch.allclose(seen["inputs"], hidden[1], atol=1e-5)          # the quantized model's, at block 1
    assert not torch.allclose(seen["inputs"], hidden[0], atol=1e-2)      # not the embeddings
    with torch.no_grad():
        fp_hidden = reference(windows, output_hidden_states=True).hidden_states
    assert torch.allclose(seen["fp_inputs"], fp_hidden[1], atol=1e-5)   # targets from the FP chain
    assert seen["act_quantizer_calls_in_training"] > 0 and len(report["blocks"][0]["losses"]) == 2
    block = adapted[1]
    linears = [m for m in block.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 7 and all(m.act_quantizer is not None and m.act_quantizer.bits == 4 for m in linears)
    assert block.get_submodule(adapter.attention).qkv_quantizers is not None
    # in evaluation too: the swapped-in block quantizes its activations, and the originals come back
    original = adapter.layers(model)[1]
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in block.modules()
               if isinstance(m, ActQuantizer)]
    with torch.no_grad(), tta.swapped_blocks(model, adapter, adapted, CPU):
        assert adapter.layers(model)[1] is block
        model(windows)
    for h in handles:
        h.remove()
    assert calls and adapter.layers(model)[1] is original


def test_tta_is_reported_beside_the_plain_figure_and_never_replaces_it(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from affinequant.cli import run
    from conftest import save_tiny, write_text
    from test_cli import base

    monkeypatch.chdir(tmp_path)
    tiny = save_tiny(tmp_path / "tiny-llama")
    calib = write_text(tmp_path / "calib.txt")
    Path(calib).with_name("wiki.test.raw").write_text(write_text(tmp_path / "eval.txt", seed=7) and
                                                      (tmp_path / "eval.txt").read_text())
    flags = ["--wbits", "4", "--abits", "4", "--lwc", "--let", "--epochs", "1", "--eval_ppl", "--ppl_datasets",
             "wikitext2", "--limit", "3", "--data_dir", str(tmp_path)]
    plain = run(base(tiny, calib, tmp_path / "plain", *flags))
    with_tta = run(base(tiny, calib, tmp_path / "tta", *flags, "--tta", "--tta_epochs", "2", "--save_dir",
                        str(tmp_path / "saved")))
    assert with_tta["ppl"]["wikitext2"]["ppl"] == plain["ppl"]["wikitext2"]["ppl"]
    tta = with_tta["ppl_tta"]["wikitext2"]
    assert tta["ppl"] != plain["ppl"]["wikitext2"]["ppl"] and tta["windows"] == 3 and "kl" in tta
    assert tta["tta"]["blocks"][0]["index"] == 1 and len(tta["tta"]["blocks"][0]["losses"]) == 2
    saved = json.loads((tmp_path / "tta" / "out" / "results.json").read_text())
    assert saved["ppl_tta"]["wikitext2"]["ppl"] == tta["ppl"]
    # the saved model is the plain one
    from affinequant.formats.export import load_quantized
    reloaded = load_quantized(str(tmp_path / "saved"))
    from affinequant.eval.data import eval_tokens
    from affinequant.eval.perplexity import perplexity
    from transformers import AutoTokenizer
    tokens, _ = eval_tokens("wikitext2", AutoTokenizer.from_pretrained(tiny), 32, tmp_path)
    assert perplexity(reloaded, tokens, 32, CPU, 3)["ppl"] == pytest.approx(plain["ppl"]["wikitext2"]["ppl"], rel=1e-5)


@pytest.mark.parametrize("flags, expect", [
    (["--tta", "--lwc", "--epochs", "1"], "add --eval_ppl"),
    (["--tta", "--eval_ppl"], "this run learns none"),
    (["--tta", "--eval_ppl", "--lwc", "--epochs", "1", "--tta_blocks", "3"], "--tta_blocks 3: give 1 to 2"),
    (["--tta", "--eval_ppl", "--lwc", "--epochs", "1", "--tta_epochs", "0"], "at least 1 epoch"),
])
def test_tta_refuses_what_cannot_run_before_any_work(capsys, tmp_path, flags, expect):
    from conftest import save_tiny, write_text
    from test_cli import _error, base
    tiny = save_tiny(tmp_path / "tiny-llama")
    assert expect.lower() in _error(capsys, base(tiny, write_text(tmp_path / "c.txt"), tmp_path, *flags))


def test_tta_fp_block_target_is_the_fp_block_on_the_quantized_inputs(tokens, monkeypatch):
    from affinequant.pipeline import calibrate, tta
    model, reference, adapter, cfg, stats = _quantized_w4a4(tokens)
    windows = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(6))
    seen = {}
    real_quantize = calibrate.BlockRunner.quantize

    def spy(self, block, index, q_inps, fp_inps, kwargs, *a, **k):
        seen["same"] = torch.equal(q_inps, fp_inps)
        return real_quantize(self, block, index, q_inps, fp_inps, kwargs, *a, **k)
    monkeypatch.setattr(calibrate.BlockRunner, "quantize", spy)
    tta.adapt(model, reference, adapter, windows, cfg, tta.TTAConfig(epochs=1, target="fp_block"), CPU,
              torch.float16, *stats)
    assert seen["same"]
