"""Resumable calibration: the learned parameters of each finished block in a file of its own,
written atomically, plus a manifest of the run's configuration.

    <dir>/manifest.json       configuration, model, calibration source, blocks finished
    <dir>/block_0007.safetensors

A run killed at any moment and started again with --resume replays the finished blocks from their
files (no training, same merge, same propagation) and continues at the first unfinished one, so
it ends with the same model as an uninterrupted run. Files are never rewritten: the work per block
is constant (the reference rewrites every earlier block's parameters after each block).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import QuantConfig
from ..recipe import STAGE_CONFIGS
from ..errors import AffineQuantError
from ..utils import atomic_write, tensor_digest, write_json

log = logging.getLogger("affinequant")

# What the stored parameters mean: these and the recipe's stages (less the rounder, which stores
# nothing) with their structural options must match for any resume.
STRUCTURE = ("wbits", "abits", "group_size", "symmetric", "reference_compat", "bit_balance", "target_bpw", "mixed_bits")
# What produced them: these and the whole recipe must match too when training continues (epochs > 0).
TRAINING = ("wd", "epochs", "nsamples", "batch_size", "seqlen", "aug_loss", "loss", "seed")
# Options that change what a stage stores (its tensors' meaning or shapes); other options change only
# how the values were reached, or, for the rounder, how a rebuild rounds.
STRUCTURAL_OPTIONS = {"let": ("ln_matrix", "qk_matrix", "out_matrix"),
                      "flatquant": ("parametrization", "diag", "key_transform", "lac")}


def _saved_recipe(saved: dict) -> list[dict]:
    """The manifest's recipe; a manifest from before recipes existed gets its flags' recipe."""
    if "recipe" in saved:
        return saved["recipe"]
    from dataclasses import fields
    known = {f.name for f in fields(QuantConfig)}
    return QuantConfig(**{k: v for k, v in saved["config"].items() if k in known}).recipe_data()


def recipe_differences(saved: list[dict], now: list[dict], whole: bool) -> dict:
    """{what: (checkpoint, now)} between two recipes; without `whole`, only what the stored tensors depend on."""
    def kept(recipe):
        # whole-model stages (end-to-end refinement) come after the block loop and store nothing in its blocks:
        # their own state file carries their configuration (save_refinement)
        return [e for e in recipe if not STAGE_CONFIGS[e["stage"]].model_level
                and (whole or not STAGE_CONFIGS[e["stage"]].is_rounder)]
    saved, now = kept(saved), kept(now)
    if [e["stage"] for e in saved] != [e["stage"] for e in now]:
        return {"recipe": (" -> ".join(e["stage"] for e in saved), " -> ".join(e["stage"] for e in now))}
    diff = {}
    for a, b in zip(saved, now):
        # an option added since the checkpoint was written had its default then
        a = {**STAGE_CONFIGS[a["stage"]]().to_dict(), **a}
        keys = set(a) | set(b) if whole else STRUCTURAL_OPTIONS.get(a["stage"], ())
        for k in sorted(keys):
            if a.get(k) != b.get(k):
                diff[f"{a['stage']}.{k}"] = (a.get(k), b.get(k))
    return diff



def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint file's tensors and its metadata (empty when it has none)."""
    from safetensors import safe_open
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        return tensors, f.metadata() or {}

class CheckpointError(AffineQuantError):
    """A checkpoint that does not belong to this run, or is corrupt."""


class CalibrationCheckpoint:
    def __init__(self, directory: str | Path, cfg: QuantConfig, model: str, calibration: str, n_blocks: int,
                 resume: bool, data_digest: str | None = None, writer: bool = True):
        """`writer`: False for the ranks other than 0 of a data-parallel run, which read the checkpoint (after
        rank 0 has set it up) and record the blocks they finish, but write nothing."""
        self.dir = Path(directory)
        self.writer = writer
        self.manifest_path = self.dir / "manifest.json"
        self.manifest = {"config": cfg.to_dict(), "recipe": cfg.recipe_data(), "model": model,
                         "calibration": calibration, "calibration_digest": data_digest, "n_blocks": n_blocks,
                         "finished": []}
        for stray in self.dir.glob("*.tmp") if writer else ():    # a write killed mid-way (atomic_write's file)
            stray.unlink()
        if resume:
            self._check_compatible(cfg.to_dict(), self.manifest["recipe"], model, n_blocks, data_digest,
                                   calibration)
        elif self.manifest_path.is_file() and writer:
            log.warning("%s holds a calibration checkpoint from an earlier run: starting afresh and replacing it "
                        "(pass --resume to continue it instead)", self.dir)
            for old in self.dir.glob("block_*.safetensors"):
                old.unlink()
        self._write_manifest()

    @classmethod
    def verify(cls, directory: str | Path, cfg: QuantConfig, model: str, n_blocks: int) -> None:
        """The checks of a resume, before the model is loaded (the calibration data is checked later,
        once it is drawn); writes nothing."""
        probe = cls.__new__(cls)
        probe.dir = Path(directory)
        probe.manifest_path = probe.dir / "manifest.json"
        probe.manifest = {}
        probe._check_compatible(cfg.to_dict(), cfg.recipe_data(), model, n_blocks)

    def _check_compatible(self, config: dict, recipe: list[dict], model: str, n_blocks: int,
                          data_digest: str | None = None, calibration: str = "") -> None:
        if not self.manifest_path.is_file():
            raise CheckpointError(f"--resume: no calibration checkpoint in {self.dir} (no manifest.json); "
                                  f"run without --resume to start one")
        try:
            saved = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"--resume: {self.manifest_path} is corrupt ({exc}); delete {self.dir} and "
                                  f"start again") from exc
        config = json.loads(json.dumps(config))         # as the manifest holds it (tuples are lists there)
        training = config.get("epochs", 0) > 0
        keys = STRUCTURE + (TRAINING if training else ())
        # a key that a manifest predates (--loss, added later) had its default then
        saved_config = {**json.loads(json.dumps(QuantConfig().to_dict())), **saved["config"]}
        diff = {k: (saved_config.get(k), config.get(k)) for k in keys if saved_config.get(k) != config.get(k)}
        saved_recipe = _saved_recipe(saved)
        diff.update(recipe_differences(saved_recipe, recipe, whole=training))
        if saved.get("n_blocks") != n_blocks:
            diff["blocks"] = (saved.get("n_blocks"), n_blocks)
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"--resume: the checkpoint in {self.dir} comes from another configuration "
                                  f"({detail}). Resume with the same flags (or --epochs 0 to rebuild without "
                                  f"training), or use another --output_dir")
        saved_digest = saved.get("calibration_digest")
        if data_digest and saved_digest and saved_digest != data_digest:
            if training:
                raise CheckpointError(f"--resume: the calibration samples differ from those the checkpoint in {self.dir} "
                                      f"was trained on ({saved.get('calibration')!r} then, {calibration!r} now): resume "
                                      f"with the same --calib_dataset, --nsamples, --seqlen and --seed, or use "
                                      f"--epochs 0 to rebuild without training")
            log.warning("--resume --epochs 0: calibration samples differ from the checkpoint's (%s); the stored "
                        "parameters are rebuilt as they are", saved.get("calibration"))
        if saved.get("model") != model:
            log.warning("--resume: checkpoint made from %s, resuming with %s", saved.get("model"), model)
        # the data the stored blocks were trained on, not this run's
        self.manifest["calibration"] = saved.get("calibration", calibration)
        self.manifest["calibration_digest"] = saved_digest or data_digest
        self.manifest["finished"] = sorted(saved.get("finished", []))
        # The stored parameters were produced by the saved configuration: keep it, so that a rebuild
        # with --epochs 0 does not turn the manifest into one that refuses the original flags later.
        self.manifest["config"] = saved["config"]
        self.manifest["recipe"] = saved_recipe
        if saved_recipe[-1]["stage"] != recipe[-1]["stage"]:
            log.info("--resume: rebuilding with rounder %s (the checkpoint's run rounded with %s)",
                     recipe[-1]["stage"], saved_recipe[-1]["stage"])
        log.info("--resume: %d of %d blocks finished in %s", len(self.manifest["finished"]), n_blocks, self.dir)

    def _write_manifest(self) -> None:
        if self.writer:
            write_json(self.manifest_path, self.manifest)

    def path(self, index: int) -> Path:
        return self.dir / f"block_{index:04d}.safetensors"

    def done(self, index: int) -> bool:
        return index in self.manifest["finished"]

    def save(self, index: int, state: dict[str, torch.Tensor], report: dict) -> None:
        if not self.writer:
            self.manifest["finished"] = sorted(set(self.manifest["finished"]) | {index})
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        metadata = {"report": json.dumps(report), "index": str(index), "digest": tensor_digest(tensors)}
        atomic_write(self.path(index), lambda tmp: save_file(tensors, tmp, metadata=metadata))
        self.manifest["finished"] = sorted(set(self.manifest["finished"]) | {index})
        self._write_manifest()       # after the block file: a crash between the two only loses this block

    def refinement_path(self, name: str) -> Path:
        return self.dir / f"refine_{name}.safetensors"

    def save_refinement(self, name: str, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """A whole-model stage's progress (its parameters, optimiser moments, step and configuration), replaced
        atomically each time: a run killed mid-refinement resumes at the last saved step."""
        if not self.writer:
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        metadata = {"state": json.dumps(state), "digest": tensor_digest(tensors)}
        atomic_write(self.refinement_path(name), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def load_refinement(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """What save_refinement wrote last, or None when nothing was (or the file is unreadable: logged)."""
        path = self.refinement_path(name)
        if not path.is_file():
            return None
        try:
            tensors, metadata = _read_safetensors(path)
            if metadata.get("digest") != tensor_digest(tensors):
                raise ValueError("digest mismatch")
            return tensors, json.loads(metadata["state"])
        except Exception as exc:
            log.warning("%s is unreadable (%s): the refinement starts again", path, exc)
            return None

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        path = self.path(index)
        try:
            tensors, metadata = _read_safetensors(path)
            report = json.loads(metadata.get("report", "{}"))
        except Exception as exc:
            raise CheckpointError(f"--resume: {path} is corrupt or unreadable ({exc}); delete it (and its index "
                                  f"from {self.manifest_path}'s 'finished') to recalibrate that block") from exc
        if "index" in metadata and int(metadata["index"]) != index:     # files before digests carry neither
            raise CheckpointError(f"--resume: {path} holds block {metadata['index']}, not block {index} (a file copied "
                                  f"over another?): delete it and its index from {self.manifest_path}'s 'finished' "
                                  f"to recalibrate that block")
        if "digest" in metadata and metadata["digest"] != tensor_digest(tensors):
            raise CheckpointError(f"--resume: {path} does not match its recorded digest (modified after it was "
                                  f"written): delete it and its index from {self.manifest_path}'s 'finished'")
        return tensors, report
