"""End-to-end refinement (recipe stage e2e, pipeline/refine.py): the blockwise backward gives the gradient of
autograd through the whole model; zero steps change nothing; the integer codes never move; a killed refinement
resumes to the model of an uninterrupted one; streamed equals in memory; the refined model exports exactly; bad
recipes are refused before calibration."""
import copy
import contextlib

import pytest
import torch
import torch.nn.functional as F

from affinequant.cli import run
from affinequant.config import ConfigError, QuantConfig
from affinequant.models.adapters import get_adapter
from affinequant.models.blocks import capture_block_arguments, run_block
from affinequant.pipeline import refine
from affinequant.pipeline.calibrate import quantize_blocks
from affinequant.pipeline.refine import E2E, E2EConfig, RefineContext, ScaledCodes, TrainedGain, is_norm
from affinequant.pipeline.streaming import InMemoryBlocks
from affinequant.quant.packing import PackedLinear
from affinequant.quant.qmodules import set_submodule

from conftest import save_tiny, tiny_model, write_text
from test_cli import _run_keeping_model


def _packed_model(family="llama", wbits=3):
    """A tiny model rounded to nearest with its packed layers kept, its FP copy, and calibration token ids."""
    torch.manual_seed(1)
    model = tiny_model(family)
    fp = copy.deepcopy(model)
    samples = torch.randint(0, 96, (3, 24))
    cfg = QuantConfig(wbits=wbits, group_size=16, nsamples=3, seqlen=24, real_quant=True)
    adapter = get_adapter(model.config)
    quantize_blocks(model, adapter, samples, cfg, torch.device("cpu"))
    return model, fp, adapter, samples, cfg


def _context(model, fp, adapter, samples, cfg):
    inputs, kwargs = capture_block_arguments(model, adapter, samples, "cpu", torch.float32)
    fp_final = inputs
    for i, block in enumerate(adapter.layers(fp)):
        fp_final = run_block(block, fp_final, kwargs[i], 1, "cpu", contextlib.nullcontext)
    return RefineContext(model, adapter, InMemoryBlocks(model, adapter), samples, inputs, fp_final, kwargs, cfg,
                         torch.device("cpu"), contextlib.nullcontext)


@pytest.mark.parametrize("loss, norms", [("kl", False), ("ce", False), ("kl", True)])
def test_blockwise_backward_equals_autograd_through_the_whole_model(loss, norms):
    model, fp, adapter, samples, cfg = _packed_model()
    ctx = _context(model, fp, adapter, samples, cfg)
    e2e = E2E(E2EConfig(loss=loss, norms=norms))
    for index in range(len(ctx.blocks)):          # the δs, then a point away from δ = 0
        block, originals = e2e._open(ctx, index)
        e2e._close(ctx, index, block, originals, torch.float32)
    assert bool(e2e.gains) == norms
    trained = {**e2e.deltas, **{f"gain.{k}": g for k, g in e2e.gains.items()}}
    torch.manual_seed(3)
    with torch.no_grad():
        for d in trained.values():
            d.normal_(0, 0.05)
    idx = torch.tensor([2, 0])
    value = e2e._step_gradients(ctx, idx, torch.float32, 1.0)
    blockwise = {k: d.grad.clone() for k, d in trained.items()}

    # independent: the whole model with every packed layer (and norm) in training form, one autograd graph
    for d in trained.values():
        d.grad = None
    for i, block in enumerate(adapter.layers(model)):
        for name, m in list(block.named_modules()):
            if isinstance(m, PackedLinear):
                set_submodule(block, name, ScaledCodes(m, m.codes(), e2e.deltas[f"{i}.{name}"]))
            elif norms and is_norm(m):
                set_submodule(block, name, TrainedGain(m, e2e.gains[f"{i}.{name}"], 0.0))
    ids = samples[idx]
    logp = F.log_softmax(model(ids).logits.float(), -1)
    if loss == "kl":
        with torch.no_grad():
            ref = F.log_softmax(fp(ids).logits.float(), -1)
        direct = (ref.exp() * (ref - logp)).sum() / ids.numel()
    else:
        direct = F.nll_loss(logp[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / (ids.shape[0] * 23)
    direct.backward()
    assert value == pytest.approx(direct.item(), rel=1e-5)
    # the same float32 operations, grouped differently (chunked head, per-block graphs): agreement to float
    # rounding, relative to each gradient's size
    for k, g in blockwise.items():
        ref_g = trained[k].grad
        assert ref_g.abs().max() > 0
        torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-5 * float(ref_g.abs().max()))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir = save_tiny(tmp_path / "tiny-llama")
    write_text(tmp_path / "wiki.test.raw", seed=5)
    return tmp_path, ["--model", model_dir, "--calib_dataset", write_text(tmp_path / "c.txt"), "--data_dir",
                      str(tmp_path), "--wbits", "3", "--group_size", "16", "--nsamples", "4", "--seqlen", "32"]


def _linears(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and ".layers." in f".{n}"}


def test_zero_steps_leave_the_model_unchanged_and_steps_keep_the_codes(setup):
    tmp_path, common = setup
    plain = _linears(_run_keeping_model(common + ["--output_dir", str(tmp_path / "a")]))
    zero = _linears(_run_keeping_model(common + ["--output_dir", str(tmp_path / "b"), "--e2e_steps", "0"]))
    steps0 = _linears(_run_keeping_model(common + ["--output_dir", str(tmp_path / "c"), "--recipe",
                                                   _recipe(tmp_path, steps=0)]))
    refined = _linears(_run_keeping_model(common + ["--output_dir", str(tmp_path / "d"), "--e2e_steps", "3",
                                                    "--e2e_lr", "0.05"]))
    assert set(plain) == set(steps0) == set(refined) and plain
    assert all(torch.equal(plain[k], zero[k]) and torch.equal(plain[k], steps0[k]) for k in plain)
    assert any(not torch.equal(plain[k], refined[k]) for k in plain)
    for k in plain:         # a group's weights scale together: the codes (the ratios within a group) are kept
        a, b = plain[k].unflatten(1, (-1, 16)), refined[k].unflatten(1, (-1, 16))
        ratio = b.sum(-1) / a.sum(-1).where(a.sum(-1).abs() > 1e-6, torch.ones_like(a.sum(-1)))
        nonzero = a.sum(-1).abs() > 1e-6
        torch.testing.assert_close((a * ratio[..., None])[nonzero], b[nonzero], rtol=1e-3, atol=1e-6)


def _recipe(tmp_path, steps=4, **options):
    path = tmp_path / f"recipe-{steps}.yaml"
    extra = "".join(f", {k}: {v}" for k, v in options.items())
    path.write_text(f"stages:\n  - rtn\n  - e2e: {{steps: {steps}, lr: 0.02, batch: 2{extra}}}\n")
    return str(path)


def test_refinement_lowers_its_loss_and_is_recorded(setup):
    tmp_path, common = setup
    res = run(common + ["--output_dir", str(tmp_path / "r"), "--recipe", _recipe(tmp_path, steps=6, batch=4)])
    losses = res["refinement"]["e2e"]["losses"]
    # full batch (4 of 4 samples), Adam's first steps move every scale by ~lr against its gradient: the KL on the
    # same samples falls
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert res["recipe"][-1]["stage"] == "e2e"


def _norm_gains(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if is_norm(m) and ".layers." in f".{n}"}


@pytest.mark.parametrize("norms", [False, True])
def test_killed_refinement_resumes_to_the_uninterrupted_model(setup, monkeypatch, norms):
    tmp_path, common = setup
    recipe = ["--recipe", _recipe(tmp_path, steps=4, save_every=2, norms=str(norms).lower())]
    full_model = _run_keeping_model(common + recipe + ["--output_dir", str(tmp_path / "a")])
    full, full_gains = _linears(full_model), _norm_gains(full_model)
    real = E2E._step_gradients
    calls = []

    def killed_at_step_3(self, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)
    with monkeypatch.context() as patch:
        patch.setattr(E2E, "_step_gradients", killed_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            run(common + recipe + ["--output_dir", str(tmp_path / "b")])
    assert (tmp_path / "b" / "checkpoint" / "refine_e2e.safetensors").is_file()
    steps = []

    def count(self, *a, **k):
        steps.append(1)
        return real(self, *a, **k)
    with monkeypatch.context() as patch:
        patch.setattr(E2E, "_step_gradients", count)
        resumed_model = _run_keeping_model(common + recipe + ["--output_dir", str(tmp_path / "b"), "--resume"])
    resumed = _linears(resumed_model)
    assert len(steps) == 2                       # steps 2 and 3 only: 0 and 1 came from the saved state
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    gains = _norm_gains(resumed_model)
    assert all(torch.equal(full_gains[k], gains[k]) for k in full_gains)
    # the gains trained where asked, and only there
    untouched = _norm_gains(_run_keeping_model(common + ["--output_dir", str(tmp_path / "rtn")]))
    assert any(not torch.equal(untouched[k], gains[k]) for k in gains) == norms


def test_streamed_refinement_equals_in_memory(setup):
    from affinequant.formats.export import load_quantized
    tmp_path, common = setup
    recipe = ["--recipe", _recipe(tmp_path, steps=2, norms="true"), "--real_quant"]      # gains written back too
    states = []
    for name, extra in (("memory", []), ("stream", ["--stream"])):
        res = run(common + recipe + extra + ["--output_dir", str(tmp_path / name), "--save_dir",
                                             str(tmp_path / f"saved-{name}")])
        states.append(load_quantized(str(tmp_path / f"saved-{name}")).state_dict())
        assert res["refinement"]["e2e"]["losses"]
    a, b = states
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("scales") for k in a)


def test_refinement_with_activation_caches_on_disk_equals_in_memory(setup):
    tmp_path, common = setup
    recipe = ["--recipe", _recipe(tmp_path, steps=2)]
    memory = _linears(_run_keeping_model(common + recipe + ["--output_dir", str(tmp_path / "m")]))
    disk = _linears(_run_keeping_model(common + recipe + ["--output_dir", str(tmp_path / "d"), "--cache_dir",
                                                          str(tmp_path / "cache")]))
    assert all(torch.equal(memory[k], disk[k]) for k in memory)


def test_refined_packed_export_reads_back_to_the_refined_model(setup):
    from affinequant.formats.export import load_quantized
    tmp_path, common = setup
    model = _run_keeping_model(common + ["--recipe", _recipe(tmp_path, steps=2), "--real_quant", "--output_dir",
                                         str(tmp_path / "o"), "--save_dir", str(tmp_path / "saved")])
    back = load_quantized(str(tmp_path / "saved"))
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_refined_gguf_holds_the_refined_weights_exactly(setup):
    pytest.importorskip("gguf")
    from affinequant.formats.gguf import dequantized_state, save_gguf
    from test_gguf import _source
    tmp_path, common = setup
    common = [c if c != "3" else "4" for c in common]
    common[common.index("--group_size") + 1] = "32"
    model = _run_keeping_model(common + ["--symmetric", "--e2e_steps", "2", "--e2e_lr", "0.05", "--output_dir",
                                         str(tmp_path / "o")])
    report = save_gguf(model, _source(tmp_path / "src.gguf"), str(tmp_path / "m.gguf"), "Q4_0")
    # refined float16 scales times the same codes: still Q4_0's grid, written with no block requantized
    assert report["requantized_blocks"] == 0 and report["max_abs_diff"] == 0.0
    back = dequantized_state(str(tmp_path / "m.gguf"))
    assert torch.equal(back["blk.1.ffn_down.weight"], model.model.layers[1].mlp.down_proj.weight.float())


@pytest.mark.parametrize("recipe, expected", [
    ("stages: [e2e, rtn]", "comes before e2e"),
    ("stages: [rtn, {e2e: {loss: mse}}]", "loss is 'kl'"),
    ("stages: [rtn, {e2e: {steps: -1}}]", "steps >= 0"),
])
def test_bad_refinement_recipes_are_refused(tmp_path, recipe, expected):
    from affinequant.recipe import parse_recipe
    import yaml
    with pytest.raises(ConfigError, match=expected):
        QuantConfig(wbits=3, recipe=[s.to_dict() for s in parse_recipe(yaml.safe_load(recipe))]).validate()


def test_refinement_with_activation_quantizers_is_refused():
    with pytest.raises(ConfigError, match="weight-only"):
        QuantConfig(wbits=4, abits=8, e2e_steps=4).validate()


def test_registered_as_a_whole_model_stage():
    assert refine.REFINERS["e2e"] is E2E and E2EConfig.model_level


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_trained_gain_is_the_norm_with_its_gain_scaled(offset):
    """(offset + g0)·exp(δ) − offset: the norm itself at δ = 0, and a copy of it holding that gain elsewhere."""
    norm = torch.nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 8)
    delta = torch.zeros(8)
    assert torch.equal(TrainedGain(norm, delta, offset)(x), norm(x))
    delta = torch.linspace(-0.3, 0.3, 8)
    other = copy.deepcopy(norm)
    with torch.no_grad():
        other.weight.copy_((offset + norm.weight) * torch.exp(delta) - offset)
    torch.testing.assert_close(TrainedGain(norm, delta, offset)(x), other(x), rtol=1e-6, atol=1e-6)
    assert is_norm(norm) and not is_norm(torch.nn.Linear(2, 2))
