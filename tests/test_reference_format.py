"""Parameter files of the reference code (AffineQuant / OmniQuant format) against the fixture the
reference AffineQuant code itself produced (../shared/fixtures/reference-affinequant, README there):
--resume FILE.pth --epochs 0 reproduces its quantized model's logits; --reference_compat training
reproduces its per-layer losses and parameters; --save_params writes a file that reads back to the
same model; a file for another model or configuration is refused before any weight is loaded."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from affinequant.models.adapters import get_adapter
from affinequant.pipeline.calibrate import quantize_blocks
from affinequant.pipeline.checkpoint import CalibrationCheckpoint
from affinequant.cli import run
from affinequant.config import ConfigError, QuantConfig
from affinequant.formats.export import load_quantized
from affinequant.formats.reference import ReferenceParams, ReferenceResume, read_reference_params

from conftest import write_text

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference-affinequant"
pytestmark = pytest.mark.skipif(not (FIXTURE / "model" / "model.safetensors").is_file(),
                                reason="../shared/fixtures/reference-affinequant not present")

RUNS = {  # the settings of each reference run (fixture README)
    "lwc_w3g64": dict(wbits=3, group_size=64, lwc=True),
    "affine_w4g64_ln": dict(wbits=4, group_size=64, lwc=True, let=True, use_ln_matrix=True, sf=1e-2),
}
RUN_FLAGS = {
    "lwc_w3g64": ["--wbits", "3", "--group_size", "64", "--lwc"],
    "affine_w4g64_ln": ["--wbits", "4", "--group_size", "64", "--lwc", "--let", "--use_ln_matrix", "--sf", "1e-2",
                        "--act-scales", str(FIXTURE / "act_scales.pt"), "--act-shifts", str(FIXTURE / "act_shifts.pt")],
}


def fixture_model():
    return AutoModelForCausalLM.from_pretrained(FIXTURE / "model", dtype=torch.float32).eval()


def statistics():
    return (torch.load(FIXTURE / "act_scales.pt", weights_only=True),
            torch.load(FIXTURE / "act_shifts.pt", weights_only=True))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(load_file(FIXTURE / "eval_tokens.safetensors")["input_ids"]).logits.float()


def quantize_fixture(tmp_path, run_name: str, epochs: int, params_file=None):
    """The fixture model quantized with the run's settings through the library; with `params_file`
    its blocks are rebuilt from that reference file. Returns (model, reports, checkpoint, cfg)."""
    model = fixture_model()
    adapter = get_adapter(model.config)
    cfg = QuantConfig(**RUNS[run_name], epochs=epochs, nsamples=8, seqlen=128, reference_compat=True)
    params = None
    if params_file is not None:
        params, cfg = ReferenceParams.open(params_file, cfg, model.config, adapter)
    checkpoint = CalibrationCheckpoint(tmp_path / "checkpoint", cfg, "fixture", "calib_tokens", 2, resume=False)
    source = checkpoint if params is None else ReferenceResume(params, checkpoint)
    scales, shifts = statistics()
    torch.manual_seed(2)
    reports = quantize_blocks(model, adapter, load_file(FIXTURE / "calib_tokens.safetensors")["input_ids"], cfg,
                              torch.device("cpu"), scales, shifts, checkpoint=source)
    return model, reports, checkpoint, cfg


@pytest.mark.parametrize("run_name", sorted(RUNS))
def test_resume_reference_file_reproduces_reference_logits(tmp_path, run_name):
    model, reports, _, _ = quantize_fixture(tmp_path, run_name, 0, FIXTURE / run_name / "affine_parameters.pth")
    assert all(r.losses == [] for r in reports)           # rebuilt, not trained
    ours, ref = logits(model), load_file(FIXTURE / run_name / "logits.safetensors")
    # same arithmetic as the reference's model after .float(): only summation order differs (measured 2.2e-5)
    assert (ours - ref["logits_fp32_forward"]).abs().max() < 1e-4
    # the reference's own float16 forward: the fixture README's tolerance
    assert (ours - ref["logits"]).abs().max() < 5e-3
    assert (ours - ref["logits"]).abs().mean() < 5e-4
    # and the quantization is real: far from the unquantized model
    assert (ours - load_file(FIXTURE / "fp_logits.safetensors")["logits_fp32"]).abs().max() > 0.1


@pytest.mark.parametrize("run_name", sorted(RUNS))
def test_reference_compat_training_reproduces_reference_run(tmp_path, run_name):
    """Our calibration under --reference_compat on the fixture's data and statistics gives the
    reference's per-layer losses (within 1%) and its parameters (the first layer closely; the second
    inherits a few rounding flips through its inputs)."""
    _, reports, checkpoint, cfg = quantize_fixture(tmp_path, run_name, 2)
    expected = json.loads((FIXTURE / run_name / "losses.json").read_text())["per_layer_epoch_losses"]
    for report in reports:
        want = [e["loss"] for e in expected[str(report.index)]]
        assert report.losses == pytest.approx(want, rel=1e-2)
    model = fixture_model()
    reference = ReferenceParams.open(FIXTURE / run_name / "affine_parameters.pth", cfg, model.config,
                                     get_adapter(model.config))[0]
    ours, _ = checkpoint.load(0)
    for key, value in reference.states[0].items():
        if key.startswith("lwc."):
            assert (ours[key] - value).abs().max() < 1e-3, key
        elif key.startswith("let."):
            assert (ours[key] - value).norm() / value.norm() < 1e-3, key


@pytest.mark.parametrize("run_name", sorted(RUNS))
def test_save_params_reads_back_to_the_same_model(tmp_path, run_name):
    source = FIXTURE / run_name / "affine_parameters.pth"
    model, _, checkpoint, cfg = quantize_fixture(tmp_path / "a", run_name, 0, source)
    from affinequant.formats.reference import write_reference_params
    out = tmp_path / "ours.pth"
    result = write_reference_params(out, checkpoint, cfg, model.config, get_adapter(model.config))
    assert result["layers"] == 2 and result["not_representable"] == []
    original, written = read_reference_params(source), read_reference_params(out)
    assert set(original) == set(written)
    for index in original:
        assert set(original[index]) == set(written[index])
        for key, value in original[index].items():
            if key == "out_smooth_scale":      # entries off the per-head blocks are masked out: written as 0
                mask = torch.block_diag(*[torch.ones(64, 64)] * 4).bool()
                value = torch.where(mask, value, torch.zeros_like(value))
            torch.testing.assert_close(written[index][key], value, rtol=1e-6, atol=1e-8)
    again, _, _, _ = quantize_fixture(tmp_path / "b", run_name, 0, out)
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=1e-6)


def test_cli_resume_reference_file_and_save(tmp_path, monkeypatch):
    """The command line: --resume FILE.pth --epochs 0, saved and reloaded, gives the reference's logits;
    --save_params writes the file again."""
    monkeypatch.chdir(tmp_path)
    run_name = "affine_w4g64_ln"
    results = run(["--model", str(FIXTURE / "model"), "--calib_dataset", write_text(tmp_path / "c.txt"),
                   *RUN_FLAGS[run_name], "--epochs", "0", "--nsamples", "2", "--seqlen", "64",
                   "--resume", str(FIXTURE / run_name / "affine_parameters.pth"),
                   "--save_dir", str(tmp_path / "saved"), "--save_params", str(tmp_path / "again.pth"),
                   "--output_dir", str(tmp_path / "log")])
    assert results["resumed_from"].endswith("affine_parameters.pth")
    assert results["config"]["reference_compat"] is True and results["saved"]["format"] == "runtime"
    model = load_quantized(str(tmp_path / "saved"))
    ref = load_file(FIXTURE / run_name / "logits.safetensors")
    assert (logits(model) - ref["logits_fp32_forward"]).abs().max() < 1e-4
    assert set(read_reference_params(tmp_path / "again.pth")) == {0, 1}


def _edited(tmp_path, run_name, edit) -> Path:
    params = read_reference_params(FIXTURE / run_name / "affine_parameters.pth")
    edit(params)
    path = tmp_path / "edited.pth"
    torch.save(params, path)
    return path


def _drop_layer(params):
    del params[1]


@pytest.mark.parametrize("edit, flags, message", [
    (lambda p: p[0].__setitem__("mystery_smooth_gain", torch.ones(3)), RUN_FLAGS["lwc_w3g64"], "unknown parameter"),
    (lambda p: p.__setitem__(7, p[0]), RUN_FLAGS["lwc_w3g64"], "layer 7 is not in this model"),
    (lambda p: None, ["--wbits", "3", "--group_size", "32", "--lwc"], "group size"),
    (lambda p: None, ["--wbits", "3", "--group_size", "64", "--lwc", "--let"], "run with --lwc"),
    (lambda p: p[0].__setitem__("self_attn.x_proj.weight_quantizer.upbound_factor", torch.ones(4, 1)),
     RUN_FLAGS["lwc_w3g64"], "another architecture"),
])
def test_foreign_reference_files_are_refused_before_loading(tmp_path, monkeypatch, capsys, edit, flags, message):
    monkeypatch.chdir(tmp_path)
    import affinequant.cli.commands as cli
    loaded = []
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: loaded.append(1) or (_ for _ in ()).throw(AssertionError))
    path = _edited(tmp_path, "lwc_w3g64", edit)
    with pytest.raises(SystemExit) as exc:
        run(["--model", str(FIXTURE / "model"), *flags, "--epochs", "0", "--resume", str(path),
             "--output_dir", str(tmp_path / "log")])
    assert exc.value.code == 2 and not loaded
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


def test_pickle_payload_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({0: Payload()}, f)
    with pytest.raises(ConfigError, match="not a readable parameter file"):
        read_reference_params(path)
    assert not (tmp_path / "ran").exists()


def test_file_without_some_layers_trains_only_those(tmp_path):
    """AffineQuant's resume: layers in the file are rebuilt from it, the others are trained."""
    path = _edited(tmp_path, "lwc_w3g64", _drop_layer)
    _, reports, checkpoint, _ = quantize_fixture(tmp_path, "lwc_w3g64", 2, path)
    assert reports[0].losses == [] and len(reports[1].losses) == 2
    stored = read_reference_params(FIXTURE / "lwc_w3g64" / "affine_parameters.pth")[0]
    ours, _ = checkpoint.load(0)
    torch.testing.assert_close(ours["lwc.self_attn.q_proj.upbound_factor"].reshape(-1, 1),
                               stored["self_attn.q_proj.weight_quantizer.upbound_factor"])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_our_transforms_are_written_exactly(tmp_path, family):
    """A run in our own formulation (RoPE-tied q <-> k complex scales, per-KV-head v -> o blocks, the
    gradual mask with our sf) written with --save_params and read back under the reference's
    conventions gives the same transformed weights, biases and norm outputs (before the reference's
    truncation, which write_reference_params reports)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from affinequant.pipeline.calibrate import BlockQuantizer
    from affinequant.formats.reference import write_reference_params
    from affinequant.pipeline.stats import collect_act_stats

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=4)).eval()
    else:                    # OPT: multi-head, LayerNorms with biases, linears with biases
        from conftest import tiny_model
        model = tiny_model("opt")
    adapter = get_adapter(model.config)
    tokens = torch.randint(0, 96, (4, 32))
    scales, shifts = collect_act_stats(model, adapter, tokens, torch.device("cpu"))
    fresh = copy.deepcopy(model)
    cfg = QuantConfig(wbits=4, group_size=16, lwc=True, let=True, use_ln_matrix=True, use_matrix=True, let_lr=2e-2,
                      epochs=2, nsamples=4, seqlen=32)
    checkpoint = CalibrationCheckpoint(tmp_path / "ck", cfg, "tiny", "random", 2, resume=False)
    quantize_blocks(model, adapter, tokens, cfg, torch.device("cpu"), scales, shifts, checkpoint=checkpoint)
    state, report = checkpoint.load(0)
    state["let.qk_param"] = torch.randn_like(state["let.qk_param"]) + 1.5   # complex scales far from |c| = 1
    checkpoint.save(0, state, report)
    write_reference_params(tmp_path / "ours.pth", checkpoint, cfg, model.config, adapter)
    params, ref_cfg = ReferenceParams.open(tmp_path / "ours.pth", cfg, model.config, adapter)
    prefix = f"{adapter.layers_path}.0."
    stats = [{k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)} for d in (scales, shifts)]
    views, x = [], torch.randn(3, 64)
    for run_cfg, state in ((cfg, checkpoint.load(0)[0]), (ref_cfg, params.states[0])):
        block = copy.deepcopy(adapter.layers(fresh)[0])
        bq = BlockQuantizer(block, adapter, model.config, run_cfg, *stats)
        bq.load_state(state)
        bq.let.apply(block, merge=False)
        norms = {n: block.get_submodule(n)(x) for n, _ in adapter.norm_groups}
        linears = {n: (q.temp_weight, q.temp_bias if q.temp_bias is not None else torch.zeros(q.out_features))
                   for n, q in bq.linears.items() if q.temp_weight is not None}
        views.append((norms, linears))
    (norms_a, lin_a), (norms_b, lin_b) = views
    assert set(lin_a) == set(lin_b) and len(lin_a) == (6 if family == "llama" else 5)
    for name in lin_a:
        torch.testing.assert_close(lin_b[name][0], lin_a[name][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lin_b[name][1], lin_a[name][1], rtol=1e-4, atol=1e-6)
    for name in norms_a:
        torch.testing.assert_close(norms_b[name], norms_a[name], rtol=1e-4, atol=1e-6)
