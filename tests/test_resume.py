"""A run killed mid-way and resumed ends with exactly the model of an uninterrupted run (CPU);
--resume --epochs 0 rebuilds it without training; foreign or corrupt checkpoints are refused."""
import json
from pathlib import Path

import pytest
import torch

from affinequant.pipeline import checkpoint as ckpt_module
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


def run_killed_after_block_0(argv, monkeypatch):
    """Run main.py with `argv`, killed (KeyboardInterrupt) right after block 0's checkpoint is written."""
    real_save = ckpt_module.CalibrationCheckpoint.save

    def crash_after_block_0(self, index, *a, **k):
        real_save(self, index, *a, **k)
        if index == 0:
            raise KeyboardInterrupt("killed")
    with monkeypatch.context() as patch:       # scoped: undo() would also undo the fixture's chdir
        patch.setattr(ckpt_module.CalibrationCheckpoint, "save", crash_after_block_0)
        with pytest.raises(KeyboardInterrupt):
            run(argv)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_killed_run_resumes_to_identical_model(setup, tmp_path, monkeypatch):
    full = _state(_run_keeping_model(setup + FLAGS + ["--output_dir", str(tmp_path / "a")]))

    run_killed_after_block_0(setup + FLAGS + ["--output_dir", str(tmp_path / "b")], monkeypatch)
    assert (tmp_path / "b" / "checkpoint" / "block_0000.safetensors").is_file()
    assert not (tmp_path / "b" / "checkpoint" / "block_0001.safetensors").exists()

    trained = []
    from affinequant.pipeline import calibrate
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


def test_checkpoint_from_before_a_stage_option_existed(setup, tmp_path):
    """A recipe recorded before a stage option existed (LET's init) had that option's default: it resumes."""
    import json
    run(setup + FLAGS + ["--output_dir", str(tmp_path / "a")])
    manifest = tmp_path / "a" / "checkpoint" / "manifest.json"
    saved = json.loads(manifest.read_text())
    let = next(e for e in saved["recipe"] if e["stage"] == "let")
    del let["init"]
    manifest.write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as exc:
        run(setup + FLAGS + ["--let_init", "log", "--output_dir", str(tmp_path / "a"), "--resume"])
    assert "let.init: checkpoint 'smoothquant' vs now 'log'" in str(exc.value)
    res = run(setup + FLAGS + ["--output_dir", str(tmp_path / "a"), "--resume"])
    assert res["blocks_restored"] == 2


RECIPE_FLAGS = ["--wbits", "3", "--group_size", "16", "--epochs", "2", "--nsamples", "4", "--seqlen", "32"]
RECIPE = {"version": 1, "stages": [{"let": {"ln_matrix": True, "lr": 5e-3}}, "clip_search", {"lwc": {"lr": 5e-2}},
                                   {"gptq": {"act_order": True}}]}
SAME_AS_FLAGS = ["--let", "--use_ln_matrix", "--clip_search", "--lwc", "--lwc_lr", "5e-2", "--gptq", "--act_order"]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_file_and_flags_give_identical_models(setup, tmp_path, suffix):
    import yaml
    path = tmp_path / f"recipe{suffix}"
    path.write_text(yaml.safe_dump(RECIPE) if suffix == ".yaml" else json.dumps(RECIPE))
    from_file = _run_keeping_model(setup + RECIPE_FLAGS + ["--recipe", str(path), "--output_dir", str(tmp_path / "f")])
    from_flags = _run_keeping_model(setup + RECIPE_FLAGS + SAME_AS_FLAGS + ["--output_dir", str(tmp_path / "g")])
    a, b = _state(from_file), _state(from_flags)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    results = json.loads((tmp_path / "f" / "results.json").read_text())
    assert [e["stage"] for e in results["recipe"]] == ["let", "clip_search", "lwc", "gptq"]
    manifest = json.loads((tmp_path / "f" / "checkpoint" / "manifest.json").read_text())
    assert manifest["recipe"] == results["recipe"]


def test_killed_recipe_with_gptq_resumes_to_identical_model(setup, tmp_path, monkeypatch):
    flags = setup + RECIPE_FLAGS + SAME_AS_FLAGS
    full = _state(_run_keeping_model(flags + ["--output_dir", str(tmp_path / "a")]))
    run_killed_after_block_0(flags + ["--output_dir", str(tmp_path / "b")], monkeypatch)
    resumed = _state(_run_keeping_model(flags + ["--output_dir", str(tmp_path / "b"), "--resume"]))
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    # the whole recipe is compared: another GPTQ option is another run
    with pytest.raises(SystemExit) as exc:
        run(setup + RECIPE_FLAGS + SAME_AS_FLAGS[:-1] + ["--no_act_order", "--output_dir", str(tmp_path / "b"),
                                                        "--resume"])
    assert "gptq.act_order: checkpoint True vs now False" in str(exc.value)
    # ... but a rebuild without training may round the learned parameters another way
    rebuilt = _state(_run_keeping_model(setup + RECIPE_FLAGS[:4] + ["--epochs", "0", "--nsamples", "4", "--seqlen",
                                                                     "32"] + SAME_AS_FLAGS[:-2]
                                        + ["--output_dir", str(tmp_path / "b"), "--resume"]))
    assert any(not torch.equal(rebuilt[k], full[k]) for k in full)


def test_checkpoint_from_before_recipes_resumes(setup, tmp_path):
    """A manifest written before recipes existed (no "recipe") is read through its flags."""
    run(setup + FLAGS + ["--output_dir", str(tmp_path / "a")])
    manifest = tmp_path / "a" / "checkpoint" / "manifest.json"
    saved = json.loads(manifest.read_text())
    del saved["recipe"]
    for key in ("clip_search", "gptq", "percdamp", "act_order", "recipe"):
        del saved["config"][key]
    manifest.write_text(json.dumps(saved))
    run(setup + FLAGS + ["--output_dir", str(tmp_path / "a"), "--resume"])
    with pytest.raises(SystemExit) as exc:
        run(setup + [f for f in FLAGS if f != "--use_ln_matrix"] + ["--output_dir", str(tmp_path / "a"), "--resume"])
    assert "let.ln_matrix: checkpoint True vs now False" in str(exc.value)
