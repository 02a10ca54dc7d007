"""A run killed mid-way and resumed ends with exactly the model of an uninterrupted run (CPU);
--resume --epochs 0 rebuilds it without training; foreign or corrupt checkpoints are refused."""
from pathlib import Path

import pytest
import torch

from affinequant import checkpoint as ckpt_module
from affinequant.cli import run

from conftest import save_tiny, write_text
from test_cli import _run_keeping_model

def flags(wbits=3, epochs=3):
    return ["--wbits", str(wbits), "--group_size", "16", "--abits", "8", "--lwc", "--let", "--use_ln_matrix",
            "--epochs", str(epochs), "--nsamples", "4", "--seqlen", "32"]


FLAGS = flags()


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir = save_tiny(tmp_path / "tiny-llama")
    return ["--model", model_dir, "--calib_dataset", write_text(tmp_path / "c.txt")]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_killed_run_resumes_to_identical_model(setup, tmp_path, monkeypatch):
    full = _state(_run_keeping_model(setup + FLAGS + ["--output_dir", str(tmp_path / "a")]))

    real_save = ckpt_module.CalibrationCheckpoint.save

    def crash_after_block_0(self, index, *a, **k):
        real_save(self, index, *a, **k)
        if index == 0:
            raise KeyboardInterrupt("killed")
    with monkeypatch.context() as patch:       # scoped: undo() would also undo the fixture's chdir
        patch.setattr(ckpt_module.CalibrationCheckpoint, "save", crash_after_block_0)
        with pytest.raises(KeyboardInterrupt):
            run(setup + FLAGS + ["--output_dir", str(tmp_path / "b")])
    assert (tmp_path / "b" / "checkpoint" / "block_0000.safetensors").is_file()
    assert not (tmp_path / "b" / "checkpoint" / "block_0001.safetensors").exists()

    trained = []
    from affinequant import calibrate
    real_train_block = calibrate.train_block

    def count(bq, *a, **k):
        trained.append(a[-1])
        return real_train_block(bq, *a, **k)
    monkeypatch.setattr(calibrate, "train_block", count)
    assert Path.cwd() == tmp_path
    resumed = _state(_run_keeping_model(setup + FLAGS + ["--output_dir", str(tmp_path / "b"), "--resume"]))
    assert trained == ["block 1"]                       # block 0 came from its checkpoint
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.equal(resumed[k], full[k]), k

    # --epochs 0 --resume rebuilds the finished run from its parameters, without training
    trained.clear()
    rebuilt = _state(_run_keeping_model(setup + flags(epochs=0) + ["--output_dir", str(tmp_path / "b"), "--resume"]))
    assert trained == []
    for k in full:
        assert torch.equal(rebuilt[k], full[k]), k
    # ... and leaves the checkpoint resumable with the flags that trained it
    again = _state(_run_keeping_model(setup + FLAGS + ["--output_dir", str(tmp_path / "b"), "--resume"]))
    assert trained == []
    for k in full:
        assert torch.equal(again[k], full[k]), k


def test_foreign_and_corrupt_checkpoints_are_refused(setup, tmp_path, capsys):
    run(setup + FLAGS + ["--output_dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit) as exc:
        run(setup + flags(wbits=4) + ["--output_dir", str(tmp_path / "a"), "--resume"])
    assert "another configuration" in str(exc.value) and "wbits" in str(exc.value)
    (tmp_path / "a" / "checkpoint" / "block_0001.safetensors").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exc:
        run(setup + FLAGS + ["--output_dir", str(tmp_path / "a"), "--resume"])
    assert "corrupt" in str(exc.value) and "block_0001" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        run(setup + FLAGS + ["--output_dir", str(tmp_path / "nothing"), "--resume"])
    assert "no calibration checkpoint" in str(exc.value)


def test_manifest_from_before_a_config_key_existed(setup, tmp_path):
    """A checkpoint written before --loss existed was trained with its default (mse): it resumes with
    that and is refused with another loss."""
    import json
    run(setup + FLAGS + ["--output_dir", str(tmp_path / "a")])
    manifest = tmp_path / "a" / "checkpoint" / "manifest.json"
    saved = json.loads(manifest.read_text())
    del saved["config"]["loss"]
    manifest.write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as exc:
        run(setup + FLAGS + ["--loss", "token_rel", "--output_dir", str(tmp_path / "a"), "--resume"])
    assert "loss: checkpoint 'mse' vs now 'token_rel'" in str(exc.value)
    run(setup + FLAGS + ["--output_dir", str(tmp_path / "a"), "--resume"])
