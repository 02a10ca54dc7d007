"""Every bad input stops before any work with a message that names the problem and the fix."""
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from affinequant.cli import run
from affinequant.config import QuantConfig

from conftest import save_tiny, write_text


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        run(argv)
    return (capsys.readouterr().err + str(exc.value.code)).lower()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def calib(tmp_path):
    return write_text(tmp_path / "calib.txt")


def base(tiny_dir, calib, tmp_path, *extra):
    return ["--model", tiny_dir, "--calib_dataset", calib, "--nsamples", "4", "--seqlen", "32",
            "--output_dir", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("flags, expect", [
    (["--wbits", "9"], "--wbits 9 is not supported"),
    (["--wbits", "1"], "use one of 2..8 or 16"),
    (["--abits", "12"], "--abits 12 is not supported"),
    (["--epochs", "3"], "trains nothing without --lwc or --let"),
    (["--wbits", "16", "--abits", "8", "--lwc"], "drop --lwc"),
    (["--nsamples", "5", "--batch_size", "2"], "not a multiple"),
    (["--use_ln_matrix"], "add --let"),
    (["--let", "--use_matrix", "--sf", "2"], "--sf must lie in (0, 1]"),
    (["--real_quant", "--abits", "8"], "--real_quant packs 2, 3, 4 or 8-bit weights of weight-only models"),
    (["--wbits", "16", "--abits", "16"], "give --eval_ppl or --tasks"),
    (["--wbits", "16", "--abits", "16", "--let"], "nothing to transform"),
    (["--recipe", "no-such-recipe.yaml"], "--recipe no-such-recipe.yaml: no such file"),
    (["--act_order"], "add --gptq"),
    (["--no_act_order"], "add --gptq"),
    (["--gptq", "--act_order", "--no_act_order"], "contradict each other"),
])
def test_bad_flags(capsys, tiny_dir, calib, tmp_path, flags, expect):
    assert expect in _error(capsys, base(tiny_dir, calib, tmp_path, *flags))


def test_group_size_larger_than_layer(capsys, tiny_dir, calib, tmp_path):
    msg = _error(capsys, base(tiny_dir, calib, tmp_path, "--group_size", "128"))
    assert "larger than" in msg and "in_features 64" in msg and "at most 64" in msg


def test_unknown_model_type_lists_supported(capsys, tmp_path, calib):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2ish")
    msg = _error(capsys, ["--model", str(tmp_path / "gpt2ish"), "--calib_dataset", calib])
    assert "model_type 'gpt2' is not supported" in msg and "gemma2, gemma3_text, llama, mistral, mixtral, olmoe, opt, phi3, qwen2" in msg


def test_missing_statistics_file(capsys, tiny_dir, calib, tmp_path):
    msg = _error(capsys, base(tiny_dir, calib, tmp_path, "--let", "--act-scales", str(tmp_path / "nope.pt")))
    assert "no such file" in msg and "generate_act_scale_shift.py" in msg


def test_corrupt_statistics_file(capsys, tiny_dir, calib, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    (tmp_path / "shifts.pt").write_bytes(b"also not")
    msg = _error(capsys, base(tiny_dir, calib, tmp_path, "--let", "--act-scales", str(bad),
                              "--act-shifts", str(tmp_path / "shifts.pt")))
    assert "cannot be read" in msg and "regenerate" in msg


def test_statistics_of_another_model_refused(capsys, tiny_dir, calib, tmp_path):
    torch.save({"model.layers.0.self_attn.q_proj": torch.ones(999)}, tmp_path / "s.pt")
    torch.save({"model.layers.0.self_attn.q_proj": torch.ones(999)}, tmp_path / "h.pt")
    msg = _error(capsys, base(tiny_dir, calib, tmp_path, "--let", "--act-scales", str(tmp_path / "s.pt"),
                              "--act-shifts", str(tmp_path / "h.pt")))
    assert "does not hold statistics for this model" in msg


def test_missing_calibration_file(capsys, tiny_dir, tmp_path):
    msg = _error(capsys, ["--model", tiny_dir, "--seqlen", "32", "--calib_dataset", str(tmp_path / "none.txt")])
    assert "no such file" in msg


def test_end_to_end_let_lwc_writes_results_and_stats(tiny_dir, calib, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    res = run(base(tiny_dir, calib, tmp_path, "--wbits", "4", "--abits", "8", "--lwc", "--let", "--epochs", "2",
                   "--group_size", "32"))
    assert (tmp_path / "act_scales" / "tiny-llama.pt").is_file()
    written = json.loads((out / "results.json").read_text())
    assert written["config"]["let"] and len(written["blocks"]) == 2
    assert all(len(b["losses"]) == 2 for b in written["blocks"])
    assert res["calibration"].startswith("file:")


def test_weight_only_save_reloads_with_stock_transformers(tiny_dir, calib, tmp_path):
    from transformers import AutoModelForCausalLM
    model = _run_keeping_model(base(tiny_dir, calib, tmp_path, "--wbits", "3", "--group_size", "16",
                                    "--save_dir", str(tmp_path / "q")))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ids = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


def _run_keeping_model(argv):
    from affinequant.cli import calibration as cli
    captured = {}
    real = cli.quantize_blocks

    def keep(model, *a, **k):
        captured["model"] = model
        return real(model, *a, **k)
    cli.quantize_blocks = keep
    try:
        run(argv)
    finally:
        cli.quantize_blocks = real
    return captured["model"]


@pytest.mark.parametrize("flags", [["--abits", "8"], ["--let", "--use_ln_matrix", "--lwc", "--epochs", "2"]])
def test_runtime_modules_round_trip_and_refuse_stock_loading(tiny_dir, calib, tmp_path, monkeypatch, flags):
    from transformers import AutoModelForCausalLM

    from affinequant import load_quantized
    monkeypatch.chdir(tmp_path)
    model = _run_keeping_model(base(tiny_dir, calib, tmp_path, "--wbits", "4", *flags, "--save_dir", str(tmp_path / "q")))
    manifest = json.loads((tmp_path / "q" / "affinequant.json").read_text())
    assert manifest["format"] == "runtime"
    with pytest.raises(OSError):      # no standard weight file: stock loading fails loudly, not silently wrong
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    reloaded = load_quantized(str(tmp_path / "q"))
    ids = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("wbits, group", [(4, "16"), (3, "24"), (2, None)])
def test_real_quant_gptq_export_round_trip(tiny_dir, calib, tmp_path, wbits, group):
    from safetensors import safe_open

    from affinequant import load_quantized
    from affinequant.quant.packing import PackedLinear
    grouping = ["--group_size", group] if group else []      # none: one grid per output channel
    model = _run_keeping_model(base(tiny_dir, calib, tmp_path, "--wbits", str(wbits), *grouping,
                                    "--lwc", "--epochs", "1", "--real_quant", "--save_dir", str(tmp_path / "q")))
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == wbits and cfg["desc_act"] is False
    assert cfg["group_size"] == (int(group) if group else -1)
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.int32
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
    assert "model.layers.0.mlp.down_proj.g_idx" in keys and "model.layers.0.mlp.down_proj.weight" not in keys
    reloaded = load_quantized(str(tmp_path / "q"))
    ids = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_packed_model_equals_fake_quant_model(tiny_dir, calib, tmp_path, monkeypatch):
    """The same calibration with and without --real_quant: identical logits (the packed weights
    unpack to exactly the fake-quantized ones)."""
    monkeypatch.chdir(tmp_path)
    flags = ["--wbits", "3", "--group_size", "24", "--lwc", "--let", "--epochs", "1"]
    fake = _run_keeping_model(base(tiny_dir, calib, tmp_path, *flags))
    packed = _run_keeping_model(base(tiny_dir, calib, tmp_path, *flags, "--real_quant"))
    ids = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.equal(fake(ids).logits, packed(ids).logits)


def test_out_of_memory_names_the_flags_that_help(tiny_dir, calib, tmp_path, monkeypatch):
    from affinequant.cli import calibration as cli

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(cli, "quantize_blocks", oom)
    with pytest.raises(SystemExit) as exc:
        run(base(tiny_dir, calib, tmp_path, "--lwc", "--epochs", "1"))
    msg = str(exc.value)
    assert "out of memory" in msg and "--nsamples" in msg and "--seqlen" in msg and "--resume" in msg


def test_multigpu_without_gpus_says_so_and_runs(tiny_dir, calib, tmp_path, capsys, monkeypatch):
    """With fewer than two GPUs --multigpu says so, never tries to spread the model, and the run gives
    exactly the figures of the same run without the flag."""
    import accelerate
    monkeypatch.setattr(accelerate, "dispatch_model", lambda *a, **k: pytest.fail("dispatch_model called"))
    eval_flags = ["--eval_ppl", "--ppl_datasets", "wikitext2", "--limit", "1", "--seqlen", "32",
                  "--data_dir", str(Path(calib).parent)]
    Path(calib).with_name("wiki.test.raw").write_text(Path(calib).read_text())
    res = run(base(tiny_dir, calib, tmp_path / "multi", "--multigpu", *eval_flags))
    assert "CUDA device(s) visible, nothing to spread" in capsys.readouterr().out
    plain = run(base(tiny_dir, calib, tmp_path / "plain", *eval_flags))
    assert res["ppl"]["wikitext2"]["ppl"] == plain["ppl"]["wikitext2"]["ppl"]
    assert [b["final_mse"] for b in res["blocks"]] == [b["final_mse"] for b in plain["blocks"]]


def test_full_precision_baseline_evaluates_the_unquantized_model(tiny_dir, calib, tmp_path):
    """W16A16 skips calibration and its perplexity is the FP reference of a quantized run on the same windows."""
    ppl = ["--eval_ppl", "--ppl_datasets", "wikitext2", "--limit", "2", "--data_dir", str(Path(calib).parent)]
    Path(calib).with_name("wiki.test.raw").write_text(Path(calib).read_text())
    fp = run(base(tiny_dir, calib, tmp_path, "--wbits", "16", "--abits", "16", *ppl))
    rtn = run(base(tiny_dir, calib, tmp_path / "rtn", "--wbits", "4", *ppl))
    assert "blocks" not in fp and "kl" not in fp["ppl"]["wikitext2"]
    assert fp["ppl"]["wikitext2"]["ppl"] == pytest.approx(rtn["ppl"]["wikitext2"]["fp_ppl"], rel=1e-5)
    assert rtn["ppl"]["wikitext2"]["ppl"] != pytest.approx(fp["ppl"]["wikitext2"]["ppl"], rel=1e-3)


def test_int4_cpu_kernel_in_evaluation_and_loading(tiny_dir, calib, tmp_path, monkeypatch):
    """--packed_kernel int4_cpu runs every 4-bit layer whose group divides in_features through torch's int4 CPU
    kernel: perplexity within 1% of the exact packed model's, the export unchanged, load_quantized(kernel=...)
    the same switch."""
    from affinequant import load_quantized
    from affinequant.quant.packing import PackedLinear
    monkeypatch.chdir(tmp_path)
    Path(calib).with_name("wiki.test.raw").write_text(Path(calib).read_text())
    flags = ["--wbits", "4", "--group_size", "32", "--real_quant", "--eval_ppl", "--ppl_datasets", "wikitext2",
             "--limit", "2", "--data_dir", str(Path(calib).parent), "--no_kl"]
    exact = run(base(tiny_dir, calib, tmp_path / "exact", *flags))
    fast = run(base(tiny_dir, calib, tmp_path / "fast", *flags, "--packed_kernel", "int4_cpu", "--save_dir",
                    str(tmp_path / "q")))
    assert fast["packed_kernel"] == {"kernel": "int4_cpu", "layers": 14, "packed_layers": 14}
    a, b = exact["ppl"]["wikitext2"]["ppl"], fast["ppl"]["wikitext2"]["ppl"]
    assert a != b and abs(a - b) / a < 1e-2
    model = load_quantized(str(tmp_path / "q"), kernel="int4_cpu")
    assert {m.kernel for m in model.modules() if isinstance(m, PackedLinear)} == {"int4_cpu"}
    assert {m.kernel for m in load_quantized(str(tmp_path / "q")).modules() if isinstance(m, PackedLinear)} == {"exact"}


def test_every_script_and_recipe_is_a_valid_run():
    """The shell scripts' flags parse and validate, and every recipe file resolves: a renamed flag or stage
    option fails here, not on a user's GPU box."""
    import shlex

    from affinequant.cli import build_parser, config_from_args
    from affinequant.recipe import load_recipe_file
    root = Path(__file__).resolve().parents[1]
    checked = 0
    for script in sorted((root / "scripts").glob("*.sh")):
        line = next((ln for ln in script.read_text().splitlines() if ln.startswith("$PY main.py")), None)
        if line is None:
            continue
        argv = [a for a in shlex.split(line)[2:] if a != "$@"]
        argv = ["x" if a == "$MODEL" else a for a in argv]
        config_from_args(build_parser().parse_args(argv))
        checked += 1
    assert checked >= 40
    for recipe in sorted((root / "recipes").glob("*.yaml")):
        QuantConfig(wbits=3, recipe=load_recipe_file(recipe)).validate()


def test_kl_reference_on_disk_gives_the_same_figures_without_a_model_copy(tiny_dir, calib, tmp_path, monkeypatch):
    """--kl_reference disk: the FP log-probabilities recorded before quantization replace the FP copy of the
    model; perplexity, FP perplexity, KL and top-1 are those against the copy, bit for bit, and the recorded
    file is gone afterwards."""
    import types

    from affinequant.cli import calibration as cli
    ppl = ["--eval_ppl", "--ppl_datasets", "wikitext2", "--limit", "3", "--data_dir", str(Path(calib).parent)]
    Path(calib).with_name("wiki.test.raw").write_text(Path(calib).read_text())
    flags = ["--wbits", "3", "--abits", "8", "--lwc", "--let", "--epochs", "1", *ppl]
    copied = run(base(tiny_dir, calib, tmp_path / "copy", *flags))
    monkeypatch.setattr(cli, "copy", types.SimpleNamespace(deepcopy=lambda m: pytest.fail("model copied")))
    disk = run(base(tiny_dir, calib, tmp_path / "disk", *flags, "--kl_reference", "disk"))
    for key in ("ppl", "fp_ppl", "kl", "top1_agreement", "window_nll"):
        assert disk["ppl"]["wikitext2"][key] == copied["ppl"]["wikitext2"][key], key
    assert disk["ppl"]["wikitext2"]["kl"] > 0
    assert not (tmp_path / "disk" / "out" / "fp_reference").exists()


def test_kl_reference_on_disk_checks_the_space_first(tiny_dir, calib, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    ppl = ["--eval_ppl", "--ppl_datasets", "wikitext2", "--limit", "3", "--data_dir", str(Path(calib).parent)]
    Path(calib).with_name("wiki.test.raw").write_text(Path(calib).read_text())
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(10, 10, 1000))
    with pytest.raises(SystemExit, match="--kl_reference disk needs .* GiB .* free"):
        run(base(tiny_dir, calib, tmp_path, "--wbits", "3", *ppl, "--kl_reference", "disk"))


def test_gptq_export_is_complete_for_the_engines(calib, tmp_path):
    """What vLLM needs with no hand edits (issue 31): `architectures` in config.json (a config built from a GGUF
    has none), generation_config.json, and a tied embedding under both its names (vLLM does not re-tie on load);
    our own loader still reads it back to the same logits."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from affinequant import load_quantized
    model_dir = save_tiny(tmp_path / "tied")
    config = LlamaConfig.from_pretrained(model_dir)
    config.tie_word_embeddings, config.architectures = True, None
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)       # saved once, as SmolLM2's GGUF has it
    config.save_pretrained(model_dir)                         # without architectures, as a GGUF's config
    model = _run_keeping_model(base(model_dir, calib, tmp_path, "--wbits", "4", "--group_size", "16", "--symmetric",
                                    "--real_quant", "--save_dir", str(tmp_path / "q")))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and (tmp_path / "q" / "generation_config.json").is_file()
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), f.get_tensor("lm_head.weight"))
    reloaded = load_quantized(str(tmp_path / "q"))
    ids = torch.randint(0, 40, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
