"""Bad input ends as one line naming the problem and the fix, with a non-zero exit, before the model's
weights load wherever the check does not need them; nothing the user owns is overwritten; a diverging
block is caught; a resume refuses data and files that are not the checkpoint's."""
import json
from pathlib import Path

import pytest
import torch

import affinequant.cli.commands as cli
from affinequant.cli import run

from conftest import save_tiny, write_text


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def no_load(monkeypatch):
    """A spy on the model loader: the cases below must be refused before it runs."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(cli, "load_model", refuse)
    return calls


def _refused(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        run(argv)
    err = capsys.readouterr().err.strip()
    code = exc.value.code
    # argparse: usage + one "main.py: error:" line (exit 2); library errors: the one line itself (exit 1)
    line = err.splitlines()[-1] if isinstance(code, int) else str(code)
    return (code if isinstance(code, int) else 1), line


def _binary(path: Path) -> str:
    path.write_bytes(bytes(range(256)) * 64)
    return str(path)


def _dir_without_config(tmp: Path) -> str:
    (tmp / "not-a-model").mkdir()
    (tmp / "not-a-model" / "weights.bin").write_bytes(b"x")
    return str(tmp / "not-a-model")


def _gguf(tmp: Path, data: bytes) -> str:
    path = tmp / "m.gguf"
    path.write_bytes(data)
    return str(path)


def _a_file(tmp: Path) -> str:
    (tmp / "afile").write_text("x")
    return str(tmp / "afile")


def _foreign_dir(tmp: Path) -> str:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("my notes")
    return str(tmp / "mine")


def _stats_without_shifts(tmp: Path) -> str:
    torch.save({"model.layers.0.self_attn.q_proj": torch.ones(64)}, tmp / "scales.pt")
    return str(tmp / "scales.pt")


# (name, extra argv built from tmp, message fragment); every one refused before the model loads
EARLY = [
    ("negative lwc_lr", lambda t: ["--lwc", "--epochs", "1", "--lwc_lr", "-0.01"], "must be positive"),
    ("zero let_lr", lambda t: ["--let", "--epochs", "1", "--let_lr", "0"], "must be positive"),
    ("negative wd", lambda t: ["--lwc", "--epochs", "1", "--wd", "-1"], "--wd"),
    ("group size 0", lambda t: ["--group_size", "0"], "not a group size"),
    ("group size -1", lambda t: ["--group_size", "-1"], "not a group size"),
    ("group size beyond the layers", lambda t: ["--group_size", "512"], "larger than"),
    ("limit 0", lambda t: ["--eval_ppl", "--limit", "0"], "--limit 0"),
    ("missing data_dir", lambda t: ["--data_dir", str(t / "nowhere")], "is not a directory"),
    ("seqlen beyond the context", lambda t: ["--seqlen", "4096"], "longer than the model's context"),
    ("unknown ppl set", lambda t: ["--eval_ppl", "--ppl_datasets", "wikitext"], "not a perplexity set"),
    ("missing calibration file", lambda t: ["--calib_dataset", str(t / "none.txt")], "no such file"),
    ("binary calibration file .bin", lambda t: ["--calib_dataset", _binary(t / "c.bin")], "not UTF-8 text"),
    ("binary calibration file .txt", lambda t: ["--calib_dataset", _binary(t / "c.txt")], "not UTF-8 text"),
    ("missing act-scales", lambda t: ["--let", "--act-scales", str(t / "none.pt")], "no such file"),
    ("act-scales without shifts", lambda t: ["--let", "--act-scales", _stats_without_shifts(t)], "--act-shifts"),
    ("resume without a checkpoint", lambda t: ["--lwc", "--epochs", "1", "--resume", str(t / "nock")],
     "no calibration checkpoint"),
    ("save_dir not ours", lambda t: ["--save_dir", _foreign_dir(t)], "--overwrite"),
    ("save_dir is a file", lambda t: ["--save_dir", _a_file(t)], "is a file"),
    ("output_dir is a file", lambda t: ["--output_dir", _a_file(t)], "is a file"),
    ("output_dir cannot be created", lambda t: ["--output_dir", "/proc/affinequant/out"], "cannot be created"),
    ("unknown device", lambda t: ["--device", "tpu"], "--device tpu"),
    ("directory that is not a model", lambda t: ["--model", _dir_without_config(t)], "no config.json"),
    ("truncated GGUF", lambda t: ["--model", _gguf(t, b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)],
     "not a readable GGUF file"),
    ("random bytes named .gguf", lambda t: ["--model", _gguf(t, bytes(range(256)) * 4)], "not a readable GGUF file"),
]


@pytest.mark.parametrize("name, extra, fragment", EARLY, ids=[c[0] for c in EARLY])
def test_bad_input_is_refused_early_with_one_line(capsys, tmp_path, monkeypatch, tiny_dir, no_load, name, extra,
                                                  fragment):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AFFINEQUANT_DATA", str(tmp_path))      # a data folder that exists: never used instead
    argv = ["--model", tiny_dir, "--seqlen", "32", "--nsamples", "2", "--output_dir", str(tmp_path / "log"),
            *extra(tmp_path)]
    code, line = _refused(capsys, argv)
    assert code != 0 and fragment in line, line
    assert line.startswith("main.py: error:") and len(line) < 600
    assert not no_load


def test_named_statistics_file_is_never_overwritten(capsys, tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    path = _stats_without_shifts(tmp_path)
    before = Path(path).read_bytes()
    _refused(capsys, ["--model", tiny_dir, "--seqlen", "32", "--nsamples", "2", "--let", "--act-scales", path,
                      "--calib_dataset", write_text(tmp_path / "c.txt"), "--output_dir", str(tmp_path / "log")])
    assert Path(path).read_bytes() == before


def test_jsonl_without_text_field_is_named(capsys, tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": "the a of"}) for _ in range(5)))
    code, line = _refused(capsys, ["--model", tiny_dir, "--seqlen", "32", "--nsamples", "2", "--calib_dataset",
                                   str(tmp_path / "c.jsonl"), "--output_dir", str(tmp_path / "log")])
    assert code != 0 and "holds no text" in line and "--seqlen" not in line


def test_save_dir_replaces_our_export_completely(tmp_path, monkeypatch, tiny_dir):
    """An earlier export's files do not survive beside the new one (stock from_pretrained would load them)."""
    monkeypatch.chdir(tmp_path)
    base = ["--model", tiny_dir, "--seqlen", "32", "--nsamples", "2", "--calib_dataset",
            write_text(tmp_path / "c.txt"), "--output_dir", str(tmp_path / "log"), "--save_dir", str(tmp_path / "q")]
    run(base + ["--wbits", "4"])                                   # a standard export: model.safetensors
    assert (tmp_path / "q" / "model.safetensors").is_file()
    run(base + ["--wbits", "4", "--abits", "8"])                   # a runtime export: no model.safetensors
    assert not (tmp_path / "q" / "model.safetensors").exists()
    assert json.loads((tmp_path / "q" / "affinequant.json").read_text())["format"] == "runtime"
    assert not list(tmp_path.glob(".q.*"))                         # no temporary or old folder left


def test_overwrite_replaces_a_foreign_directory(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    target = _foreign_dir(tmp_path)
    run(["--model", tiny_dir, "--seqlen", "32", "--nsamples", "2", "--calib_dataset", write_text(tmp_path / "c.txt"),
         "--output_dir", str(tmp_path / "log"), "--save_dir", target, "--overwrite"])
    assert not (Path(target) / "notes.txt").exists() and (Path(target) / "affinequant.json").is_file()


class _ExplodingBlock:
    """A block whose loss grows with its parameter: a learning rate far too large diverges without NaN."""

    def __init__(self):
        self.p = torch.nn.Parameter(torch.zeros(()))

    def param_groups(self):
        return [{"params": [self.p], "lr": 10.0}]

    def start_epoch(self, epoch):
        return {}

    def loss(self, data, batch):
        return 1.0 + (self.p - 1.0) ** 2        # Adam at lr 10 overshoots the minimum by ~10 every step


def test_divergence_without_nan_rolls_back():
    from affinequant.pipeline.calibrate import BlockReport
    from affinequant.config import QuantConfig
    from affinequant.stages import BlockData
    from affinequant.pipeline.trainer import train_block
    import contextlib
    bq = _ExplodingBlock()
    data = BlockData(torch.zeros(4, 2, 3), [torch.zeros(4, 2, 3)], {}, torch.device("cpu"),
                     contextlib.nullcontext, 1, True)
    report = BlockReport(0)
    train_block(bq, data, QuantConfig(wbits=4, lwc=True, epochs=3, nsamples=4), report, "block 0")
    assert report.divergence_events > 0 and report.nan_events == 0
    # rolled back and retried at lower rates: the loss it ends with is near the start, not 40x above it
    assert len(report.losses) == 3 and report.losses[-1] < 10 * 2.0 and abs(bq.p.item()) < 10


def test_resume_refuses_other_calibration_data_and_swapped_block_files(capsys, tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    flags = ["--model", tiny_dir, "--seqlen", "32", "--nsamples", "2", "--wbits", "3", "--group_size", "16", "--lwc",
             "--epochs", "1", "--output_dir", str(tmp_path / "a")]
    calib = write_text(tmp_path / "c.txt")
    run(flags + ["--calib_dataset", calib])
    _, line = _refused(capsys, flags + ["--calib_dataset", write_text(tmp_path / "d.txt", seed=5), "--resume"])
    assert "calibration samples differ" in line
    ck = tmp_path / "a" / "checkpoint"
    (ck / "block_0000.safetensors").write_bytes((ck / "block_0001.safetensors").read_bytes())
    _, line = _refused(capsys, flags + ["--calib_dataset", calib, "--resume"])
    assert "holds block 1, not block 0" in line


def test_stray_temporary_file_is_cleaned_and_results_say_what_they_cover(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    flags = ["--model", tiny_dir, "--seqlen", "32", "--nsamples", "2", "--wbits", "3", "--group_size", "16", "--lwc",
             "--epochs", "1", "--output_dir", str(tmp_path / "a"), "--calib_dataset", write_text(tmp_path / "c.txt")]
    run(flags)
    stray = tmp_path / "a" / "checkpoint" / "block_0001.safetensors.abc123.tmp"
    stray.write_bytes(b"half a file")
    results = run(flags + ["--resume"])
    assert not stray.exists()
    assert results["blocks_restored"] == 2 and results["peak_memory_mib"] > 0
