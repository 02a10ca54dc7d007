"""--stream: a model quantized block by block from its safetensors (a meta-device skeleton, finished blocks on
disk) equals the model quantized in memory, bit for bit on the CPU: the calibration, the perplexity and KL
against the FP blocks re-read from disk, and the export. Only one block holds weights at a time."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from affinequant.cli import run
from affinequant.formats.export import load_quantized
from affinequant.pipeline.streaming import StreamedModel, TensorFiles

from conftest import save_tiny, write_text

FLAGS = ["--wbits", "4", "--abits", "8", "--group_size", "16", "--lwc", "--let", "--epochs", "2", "--nsamples", "4",
         "--seqlen", "32", "--eval_ppl", "--ppl_datasets", "wikitext2", "--limit", "3"]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calib = write_text(tmp_path / "calib.txt")
    write_text(tmp_path / "wiki.test.raw", seed=5)
    return tmp_path, ["--calib_dataset", calib, "--data_dir", str(tmp_path)]


def _pair(tmp_path, common, flags, family="llama"):
    """The same run in memory and streamed, each computing its own activation statistics."""
    model = save_tiny(tmp_path / f"tiny-{family}", family)
    results = []
    for name, extra in (("memory", []), ("stream", ["--stream"])):
        shutil.rmtree(tmp_path / "act_scales", ignore_errors=True)
        shutil.rmtree(tmp_path / "act_shifts", ignore_errors=True)
        results.append(run(["--model", model, *common, *flags, *extra, "--output_dir", str(tmp_path / name),
                            "--save_dir", str(tmp_path / f"saved-{name}")]))
    return results


@pytest.mark.parametrize("family, flags", [
    ("llama", FLAGS),
    ("gemma2", FLAGS),                                        # per-layer masks, tied embeddings
    ("qwen2", ["--wbits", "4", "--abits", "4", "--kv_bits", "4", "--group_size", "16", "--flatquant", "--epochs", "1",
               "--nsamples", "4", "--seqlen", "32", "--eval_ppl", "--ppl_datasets", "wikitext2", "--limit", "3"]),
])
def test_streamed_run_equals_in_memory_run(setup, family, flags):
    tmp_path, common = setup
    memory, stream = _pair(tmp_path, common, flags, family)
    assert [b["final_mse"] for b in stream["blocks"]] == [b["final_mse"] for b in memory["blocks"]]
    assert [b["losses"] for b in stream["blocks"]] == [b["losses"] for b in memory["blocks"]]
    for key in ("ppl", "fp_ppl", "kl", "top1_agreement", "window_nll"):
        assert stream["ppl"]["wikitext2"][key] == memory["ppl"]["wikitext2"][key], key
    assert memory["ppl"]["wikitext2"]["kl"] > 0
    assert stream["saved"]["format"] == memory["saved"]["format"]
    a, b = (load_quantized(str(tmp_path / f"saved-{n}")).state_dict() for n in ("memory", "stream"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "stream" / "blocks").exists()       # the block files go once the run is over


def test_streamed_head_in_chunks_agrees_to_rounding(setup, monkeypatch):
    """A window longer than the head's chunk: the head's matmul blocks the rows otherwise, so the logits agree to
    float rounding (perplexity to 1e-6, KL, a small difference of close numbers, to 1e-3), not bit for bit."""
    from affinequant.eval import perplexity as evaluate
    monkeypatch.setattr(evaluate, "HEAD_CHUNK", 8)
    tmp_path, common = setup
    memory, stream = _pair(tmp_path, common, FLAGS)
    a, b = memory["ppl"]["wikitext2"], stream["ppl"]["wikitext2"]
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-6) and b["fp_ppl"] == pytest.approx(a["fp_ppl"], rel=1e-6)
    assert b["kl"] == pytest.approx(a["kl"], rel=1e-3) and b["top1_agreement"] == a["top1_agreement"]


def test_streamed_gptq_export_is_sharded_and_equal(setup):
    tmp_path, common = setup
    flags = ["--wbits", "4", "--group_size", "16", "--lwc", "--epochs", "1", "--nsamples", "4", "--seqlen", "32",
             "--real_quant", "--symmetric"]
    memory, stream = _pair(tmp_path, common, flags)
    assert stream["saved"]["format"] == "gptq"
    saved = tmp_path / "saved-stream"
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 1 + 2           # the non-block tensors, then one per block
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"
    a, b = (load_quantized(str(tmp_path / f"saved-{n}")).state_dict() for n in ("memory", "stream"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_only_one_block_holds_weights_at_a_time(setup, monkeypatch):
    tmp_path, common = setup
    model = save_tiny(tmp_path / "tiny", "llama")
    seen = []
    real = StreamedModel.block

    def block(self, index):
        others = [i for i, b in enumerate(self.adapter.layers(self.model)) if i != index]
        seen.append([any(not p.is_meta for p in self.adapter.layers(self.model)[i].parameters()) for i in others])
        seen.append(self.model.get_input_embeddings().weight.is_meta)
        return real(self, index)
    monkeypatch.setattr(StreamedModel, "block", block)
    run(["--model", model, *common, *FLAGS, "--stream", "--output_dir", str(tmp_path / "out")])
    assert seen == [[False], True, [False], True]


def test_tensor_files_read_exactly(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, 2).to(torch.bfloat16), "c": torch.arange(7, dtype=torch.int32),
               "d": torch.tensor(2.5, dtype=torch.float16), "e": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "model.safetensors")
    files = TensorFiles.of_checkpoint(tmp_path)
    for name, t in tensors.items():
        got = files.read(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    assert torch.equal(files.read("b", torch.float32), tensors["b"].float())
    assert files.read("c", torch.float32).dtype == torch.int32           # only floating tensors change dtype


@pytest.mark.parametrize("model, extra, expected", [
    ("m.gguf", [], "convert it once"),
    (None, ["--tasks", "arc_easy"], "--tasks"),
    (None, ["--calib_dataset", "generated"], "--calib_dataset generated"),
    ("mixtral", [], "mixture-of-experts"),
])
def test_stream_refuses_what_it_cannot_do(setup, capsys, model, extra, expected):
    tmp_path, common = setup
    if model == "m.gguf":
        (tmp_path / model).write_bytes(b"GGUF")
        model = str(tmp_path / model)
    else:
        model = save_tiny(tmp_path / "tiny", model or "llama")
    argv = ["--model", model, *common, *FLAGS,
            *extra, "--stream", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        run(argv)
    assert expected in capsys.readouterr().err


def test_stream_needs_safetensors(setup, capsys):
    tmp_path, common = setup
    model = Path(save_tiny(tmp_path / "tiny", "llama"))
    (model / "model.safetensors").rename(model / "pytorch_model.safetensors.bak")
    with pytest.raises(SystemExit):
        run(["--model", str(model), *common, *FLAGS, "--stream", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "neither model.safetensors" in err and "affinequant.convert" in err


@pytest.mark.parametrize("flags", [
    ["--lwc", "--let", "--epochs", "2", "--aug_loss", "--batch_size", "2"],
    ["--lwc", "--epochs", "1", "--tesseraq", "--par_iters", "4", "--par_rounds", "2", "--par_batch", "3"],
])
def test_activation_caches_on_disk_give_the_same_model(setup, flags):
    """--cache_dir (with and without --stream): the same model bit for bit, the same losses, and no cache file
    left behind."""
    from test_cli import _run_keeping_model
    tmp_path, common = setup
    model = save_tiny(tmp_path / "tiny", "llama")
    base = ["--model", model, *common, "--wbits", "3", "--abits", "8", "--group_size", "16", "--nsamples", "6",
            "--seqlen", "32", *flags]
    memory = _run_keeping_model(base + ["--output_dir", str(tmp_path / "m")])
    disk = _run_keeping_model(base + ["--output_dir", str(tmp_path / "d"), "--cache_dir", str(tmp_path / "cache")])
    a, b = memory.state_dict(), disk.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("m", "d"))
    assert [x["losses"] for x in ra["blocks"]] == [x["losses"] for x in rb["blocks"]]
    assert [x["final_mse"] for x in ra["blocks"]] == [x["final_mse"] for x in rb["blocks"]]
    assert not list((tmp_path / "cache").iterdir())
    streamed = run(base + ["--output_dir", str(tmp_path / "s"), "--cache_dir", str(tmp_path / "cache"), "--stream"])
    assert [x["losses"] for x in streamed["blocks"]] == [x["losses"] for x in ra["blocks"]]


def test_disk_activations_index_like_a_tensor(tmp_path):
    from affinequant.models.activations import DiskActivations, empty_like, mean_squared_error
    torch.manual_seed(0)
    t = torch.randn(7, 3, 4).to(torch.bfloat16)
    d = DiskActivations(tmp_path, t.shape, t.dtype)
    d[0:4] = t[0:4]
    d[4:7] = t[4:7]
    assert d.shape == t.shape and len(d) == 7
    for index in (2, -1, slice(1, 5), slice(None), torch.tensor([6, 0, 1, 2]), torch.arange(3, 5)):
        assert torch.equal(d[index], t[index])
    copy = d.clone()
    del d
    assert torch.equal(copy[:], t) and len(list(tmp_path.iterdir())) == 1
    other = empty_like(copy)
    other[:] = t + 1
    assert mean_squared_error(copy, other) == mean_squared_error(t, t + 1) == pytest.approx(1.0, rel=1e-2)
    path = copy.path
    del copy
    assert not path.exists()


def test_cache_dir_that_is_a_file_is_refused(setup, capsys):
    tmp_path, common = setup
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        run(["--model", save_tiny(tmp_path / "tiny", "llama"), *common, *FLAGS, "--cache_dir", str(tmp_path / "afile"),
             "--output_dir", str(tmp_path / "out")])
    assert "--cache_dir" in (err := capsys.readouterr().err) and "is a file" in err


def test_killed_streamed_run_resumes_to_the_same_export(setup, monkeypatch):
    """A streamed run killed after block 0 and resumed with --stream --resume exports the uninterrupted
    run's model."""
    from test_resume import run_killed_after_block_0
    tmp_path, common = setup
    model = save_tiny(tmp_path / "tiny", "llama")
    flags = ["--model", model, *common, "--wbits", "3", "--group_size", "16", "--lwc", "--epochs", "2",
             "--nsamples", "4", "--seqlen", "32", "--stream"]
    run(flags + ["--output_dir", str(tmp_path / "a"), "--save_dir", str(tmp_path / "sa")])
    run_killed_after_block_0(flags + ["--output_dir", str(tmp_path / "b"), "--save_dir", str(tmp_path / "sb")],
                             monkeypatch)
    resumed = run(flags + ["--output_dir", str(tmp_path / "b"), "--save_dir", str(tmp_path / "sb"), "--resume"])
    assert [b["restored"] for b in resumed["blocks"]] == [True, False]
    a, b = (load_quantized(str(tmp_path / n)).state_dict() for n in ("sa", "sb"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_call_api_streams_to_the_same_model(tmp_path):
    """affinequant.quantize_streamed + save_quantized(blocks=...) give the model affinequant.quantize gives in
    memory, with the activation caches on disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from affinequant import QuantConfig, quantize, quantize_streamed, save_quantized
    model_dir = save_tiny(tmp_path / "tiny", "qwen2")
    samples = torch.randint(4, 90, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = QuantConfig(wbits=4, abits=8, group_size=16, lwc=True, let=True, epochs=2, nsamples=4, seqlen=32)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    memory_reports = quantize(model, samples, cfg, "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    save_quantized(model, tokenizer, str(tmp_path / "memory"), cfg)
    blocks, reports = quantize_streamed(model_dir, samples, cfg, str(tmp_path / "work"), "cpu",
                                        cache_dir=str(tmp_path / "cache"))
    assert [r.losses for r in reports] == [r.losses for r in memory_reports]
    save_quantized(blocks.model, tokenizer, str(tmp_path / "stream"), cfg, blocks=blocks)
    a, b = (load_quantized(str(tmp_path / n)).state_dict() for n in ("memory", "stream"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_writes_a_checkpoint_stream_reads(tmp_path):
    """python -m affinequant.convert: the same tensors as the source model, as safetensors --stream reads; a
    non-empty target is refused in one line."""
    from affinequant.formats.convert import main as convert_main
    from affinequant.models.loading import load_model
    source = save_tiny(tmp_path / "tiny", "llama")
    convert_main([source, str(tmp_path / "converted")])
    files = TensorFiles.of_checkpoint(tmp_path / "converted")
    model, _, _ = load_model(source)
    for name, tensor in model.state_dict().items():
        if name in files:
            assert torch.equal(files.read(name), tensor), name
    assert len(files.entries) >= len(model.state_dict()) - 1          # all but a tied head
    with pytest.raises(SystemExit, match="not empty"):
        convert_main([source, str(tmp_path / "converted")])


def test_stream_downloads_a_hub_id_after_every_check(setup, monkeypatch):
    """--stream --model ORG/NAME: refused in one line when the hub is unreachable; when it is, the checkpoint is
    downloaded (snapshot_download) only after the checks, and the run streams from the download."""
    import huggingface_hub

    from affinequant.cli import commands as cli, preflight
    tmp_path, common = setup
    local = save_tiny(tmp_path / "tiny", "llama")
    argv = ["--model", "org/tiny-llama", *common, *FLAGS, "--stream", "--output_dir", str(tmp_path / "out")]
    monkeypatch.setattr(preflight, "hub_reachable", lambda: False)
    with pytest.raises(SystemExit):
        run(argv)
    downloads = []
    real_load_config = cli.load_config
    monkeypatch.setattr(preflight, "hub_reachable", lambda: True)
    monkeypatch.setattr(cli, "load_config", lambda model_id, trust=False: real_load_config(local))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **k: downloads.append(repo) or local)
    with pytest.raises(SystemExit):         # a bad flag: refused before anything is downloaded
        run(argv + ["--group_size", "1000"])
    assert downloads == []
    result = run(argv)
    assert downloads == ["org/tiny-llama"] and result["model"] == "org/tiny-llama" and result["ppl"]["wikitext2"]["ppl"] > 0


def test_streamed_compressed_tensors_export_equals_in_memory(setup):
    """--stream --save_format compressed-tensors (asymmetric: each block's zero points re-encoded as it is
    written): sharded files whose tensors equal the in-memory export's, name for name, bit for bit."""
    from safetensors.torch import load_file
    tmp_path, common = setup
    flags = ["--wbits", "4", "--group_size", "16", "--lwc", "--epochs", "1", "--nsamples", "4", "--seqlen", "32",
             "--real_quant", "--save_format", "compressed-tensors"]
    memory, stream = _pair(tmp_path, common, flags)
    assert stream["saved"]["format"] == memory["saved"]["format"] == "compressed-tensors"
    a = load_file(tmp_path / "saved-memory" / "model.safetensors")
    saved = tmp_path / "saved-stream"
    shards = set(json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"].values())
    b = {k: v for shard in shards for k, v in load_file(saved / shard).items()}
    assert a.keys() == b.keys() and any(k.endswith(".weight_zero_point") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
