"""The parameter files of the reference code bases (OmniQuant's omni_parameters.pth, AffineQuant's
affine_parameters.pth, LRQuant's rlq_parameters.pth), read and written.

A file is {layer index: {name: tensor}} with every layer parameter named *smooth* or *bound_factor*:

    self_attn.q_proj.weight_quantizer.upbound_factor   (out·n_groups, 1), row-major: row·n_groups + group
    qkv_smooth_scale / fc1_smooth_scale                 norm -> consumers: vector (d) or raw matrix (d, d)
    qkv_smooth_shift / fc1_smooth_shift                 the shift after each norm (d)
    out_smooth_scale / out_smooth_shift                 v -> o: vector (d) or raw matrix (d, d)
    qkt_smooth_scale                                    q <-> k: vector (d) or raw matrix (d, d)

Matrices are stored raw (unmasked); the reference multiplies them by its final-epoch masks (full band,
`sf` off the diagonal, block-diagonal per head for v -> o and q <-> k) when it applies them. Here an
entry maps onto the stages' checkpoint state (let.*, lwc.*), so the block loop rebuilds a block from a
reference file exactly as from its own checkpoint. Reference semantics that our default formulation
does not have (shifts after an RMSNorm, per-channel q <-> k scales across RoPE pairs, its quantizer's
range) are applied the reference's way: reading a file turns on --reference_compat.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from ..config import ConfigError, QuantConfig
from ..models.loading import block_linear_shapes
from ..stages.transforms import REFERENCE_TRUNCATION, band_mask, rope_pair_blocks
from ..utils import atomic_write

log = logging.getLogger("affinequant")

LWC_SUFFIX = ".weight_quantizer."
LWC_SIDES = ("upbound_factor", "lowbound_factor")
NORM_PREFIXES = ("qkv", "fc1")          # the reference's names of the first and second norm group
LET_KEYS = {f"{p}_smooth_{k}" for p in (*NORM_PREFIXES, "out") for k in ("scale", "shift")} | {"qkt_smooth_scale"}


def _known(key: str) -> bool:
    return key in LET_KEYS or (LWC_SUFFIX in key and key.endswith(LWC_SIDES))


class ReferenceFormatError(ConfigError):
    """A reference parameter file that cannot be applied to this model and configuration."""


def read_reference_params(path: str | Path) -> dict[int, dict[str, torch.Tensor]]:
    """Load a reference parameter file safely (weights_only) and check its structure."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ReferenceFormatError(f"--resume {path}: not a readable parameter file of the reference code "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(data, dict) or not data or not all(isinstance(k, int) for k in data):
        raise ReferenceFormatError(f"--resume {path}: not a reference parameter file (expected {{layer index: "
                                   f"{{name: tensor}}}}, as omni_parameters.pth / affine_parameters.pth)")
    for index, layer in data.items():
        if not isinstance(layer, dict) or not all(isinstance(v, torch.Tensor) for v in layer.values()):
            raise ReferenceFormatError(f"--resume {path}: layer {index} is not a {{name: tensor}} mapping")
        unknown = [k for k in layer if not _known(k)]
        if unknown:
            raise ReferenceFormatError(f"--resume {path}: layer {index} has an unknown parameter {unknown[0]!r} (expected "
                                       f"{{qkv,fc1,out}}_smooth_{{scale,shift}}, qkt_smooth_scale or "
                                       f"<linear>.weight_quantizer.{{up,low}}bound_factor)")
    return dict(sorted(data.items()))


def file_stages(params: dict[int, dict[str, torch.Tensor]]) -> dict[str, dict]:
    """What a file's parameters are: {"lwc": {}} and/or {"let": {ln_matrix, qk_matrix, out_matrix}}."""
    keys = {k: v for layer in params.values() for k, v in layer.items()}
    found: dict[str, dict] = {}
    if any(k.endswith(LWC_SIDES) for k in keys):
        found["lwc"] = {}
    if any("smooth" in k for k in keys):
        def is_matrix(name):
            return name in keys and keys[name].dim() == 2 and keys[name].shape[0] > 1 and keys[name].shape[1] > 1
        found["let"] = {"ln_matrix": is_matrix("qkv_smooth_scale"), "qk_matrix": is_matrix("qkt_smooth_scale"),
                        "out_matrix": is_matrix("out_smooth_scale")}
    return found


def configure_for_file(cfg: QuantConfig, params: dict) -> QuantConfig:
    """The run's configuration made to match the file: the reference's conventions on, the stages the
    file holds checked against the flags (a stage or matrix option that differs is refused with the
    flags to use), and LET's v -> o form taken from the file."""
    from ..recipe import recipe_data
    found = file_stages(params)
    stages = cfg.stages()
    names = {s.name for s in stages}
    learned = {n for n in names if n in ("lwc", "let")}
    if learned != set(found):
        want = " ".join(f"--{n}" for n in sorted(found))
        if "let" in found:
            want += "".join(f" --{flag}" for flag, key in (("use_ln_matrix", "ln_matrix"), ("use_matrix", "qk_matrix"))
                            if found["let"][key])
        raise ReferenceFormatError(f"--resume: the file holds {' and '.join(sorted(found)).upper()} parameters but the "
                                   f"run's recipe learns {', '.join(sorted(learned)).upper() or 'nothing'}: run with "
                                   f"{want}")
    others = sorted(names - learned - {"rtn"})
    if others:
        raise ReferenceFormatError(f"--resume FILE.pth rebuilds the reference's model (LWC/LET, rounded to nearest); "
                                   f"drop {', '.join(others)} from the recipe")
    new_stages = []
    for stage in stages:
        if stage.name == "let":
            file_let = found["let"]
            for flag, key in (("--use_ln_matrix", "ln_matrix"), ("--use_matrix", "qk_matrix")):
                if getattr(stage, key) != file_let[key]:
                    raise ReferenceFormatError(
                        f"--resume: the file's LET {'has' if file_let[key] else 'has no'} {key.replace('_', ' ')} "
                        f"but the run {'does not' if file_let[key] else 'does'}: "
                        f"{'add' if file_let[key] else 'drop'} {flag}")
            if stage.out_matrix is not None and stage.out_matrix != file_let["out_matrix"]:
                raise ReferenceFormatError(f"--resume: the file's v -> o transform is a "
                                           f"{'matrix' if file_let['out_matrix'] else 'vector'}: set out_matrix "
                                           f"{str(file_let['out_matrix']).lower()} in the recipe")
            stage = replace(stage, out_matrix=file_let["out_matrix"], qk_init="ones")
        new_stages.append(stage)
    if not cfg.reference_compat:
        log.info("--resume FILE.pth: applying the file with the reference code's conventions (--reference_compat)")
    return replace(cfg, reference_compat=True, recipe=recipe_data(new_stages), lwc=False, let=False,
                   use_ln_matrix=False, use_matrix=False).validate()


class ReferenceParams:
    """A reference parameter file mapped onto this model's blocks and the run's stages. Every layer is
    converted when the file is opened, so a file for another model or configuration is refused before
    any weights are loaded."""

    def __init__(self, path: str | Path, params: dict, cfg: QuantConfig, model_config, adapter):
        self.path, self.cfg, self.adapter = Path(path), cfg, adapter
        self.n_heads, self.n_kv, self.head_dim = adapter.heads(model_config)
        self.shapes = block_linear_shapes(model_config, adapter)
        beyond = [i for i in params if not 0 <= i < len(self.shapes)]
        if beyond:
            raise ReferenceFormatError(f"--resume {self.path}: layer {beyond[0]} is not in this model "
                                       f"({len(self.shapes)} layers): the file belongs to another model")
        let = next((s for s in cfg.stages() if s.name == "let"), None)
        self.let = let
        self.sf = let.stability_factor(cfg.abits) if let is not None else None
        self.states = {i: self.to_state(i, layer) for i, layer in params.items()}
        missing = [i for i in range(len(self.shapes)) if i not in self.states]
        log.info("--resume %s: reference parameters for %d of %d layers%s", self.path, len(self.states),
                 len(self.shapes), f" (without {missing[:8]}{'...' if len(missing) > 8 else ''})" if missing else "")
        if let is not None and (let.ln_matrix or let.qk_matrix):
            log.info("--resume: the file's matrices are applied under the reference's final mask with sf %g (--sf): "
                     "give the value the reference run used", self.sf)

    @classmethod
    def open(cls, path, cfg: QuantConfig, model_config, adapter) -> tuple["ReferenceParams", QuantConfig]:
        params = read_reference_params(path)
        cfg = configure_for_file(cfg, params)
        return cls(path, params, cfg, model_config, adapter), cfg

    def layers(self) -> list[int]:
        return sorted(self.states)

    # ----- reference -> ours ----------------------------------------------------------------------
    def _fail(self, index: int, key: str, tensor: torch.Tensor, expected, why: str = "") -> None:
        raise ReferenceFormatError(f"--resume {self.path}: layer {index} {key} has shape {tuple(tensor.shape)}, this "
                                   f"model and configuration expect {tuple(expected)}{why}: the file belongs to "
                                   f"another model, group size or set of flags")

    def _blocks(self, index: int, key: str, t: torch.Tensor) -> torch.Tensor:
        """(d, d) with per-head blocks on the diagonal -> (n_kv, h, h); entries off the blocks are masked
        out by the reference and have no effect."""
        d = self.n_kv * self.head_dim
        if tuple(t.shape) != (d, d):
            self._fail(index, key, t, (d, d))
        return torch.stack([t[h * self.head_dim:(h + 1) * self.head_dim, h * self.head_dim:(h + 1) * self.head_dim]
                            for h in range(self.n_kv)])

    def to_state(self, index: int, layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes, group = self.shapes[index], self.cfg.group_size
        state: dict[str, torch.Tensor] = {}
        for key, tensor in layer.items():
            tensor = tensor.detach().float()
            if key.endswith(LWC_SIDES) and LWC_SUFFIX in key:
                linear, side = key.split(LWC_SUFFIX)
                if linear not in shapes:
                    raise ReferenceFormatError(f"--resume {self.path}: layer {index} names linear {linear!r}, which "
                                               f"this model's blocks do not have: the file belongs to another "
                                               f"architecture")
                out_f, in_f = shapes[linear]
                n_groups = -(-in_f // group) if group else 1
                if tensor.numel() != out_f * n_groups:
                    self._fail(index, key, tensor, (out_f * n_groups, 1),
                               f" ({out_f} rows x {n_groups} groups of --group_size {group})")
                state[f"lwc.{linear}.{side}"] = tensor.reshape(out_f, n_groups, 1)
            elif "smooth" in key:
                state.update(self._let_entry(index, key, tensor))
            else:
                raise ReferenceFormatError(f"--resume {self.path}: layer {index} has an unknown parameter {key!r} "
                                           f"(expected *smooth_scale/*smooth_shift or *.weight_quantizer.*bound_factor)")
        if self.let is not None:
            zeros = {f"let.norm_shifts.{i}": self.hidden_size(index) for i in range(len(self.adapter.norm_groups))}
            zeros["let.out_shift"] = self.n_kv * self.head_dim
            for key, size in zeros.items():      # a file without shifts: the reference's start, zero
                state.setdefault(key, torch.zeros(size))
            state.update({"mask.ln_bands": torch.tensor(self.hidden_size(index)),
                          "mask.head_bands": torch.tensor(self.head_dim),
                          "mask.ln_sf": torch.tensor(self.sf, dtype=torch.float64),
                          "mask.head_sf": torch.tensor(self.sf, dtype=torch.float64)})
        return state

    def hidden_size(self, index: int) -> int:
        return self.shapes[index][self.adapter.norm_groups[0][1][0]][1]

    def _let_entry(self, index: int, key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden, kv_dim = self.hidden_size(index), self.n_kv * self.head_dim
        prefix, _, kind = key.partition("_smooth_")
        if prefix in NORM_PREFIXES and kind in ("scale", "shift"):
            i = NORM_PREFIXES.index(prefix)
            if kind == "shift" or t.dim() == 1:
                if tuple(t.shape) != (hidden,):
                    self._fail(index, key, t, (hidden,))
            elif tuple(t.shape) != (hidden, hidden):
                self._fail(index, key, t, (hidden, hidden))
            return {f"let.norm_{'params' if kind == 'scale' else 'shifts'}.{i}": t}
        if prefix in ("out", "qkt") and kv_dim != self.n_heads * self.head_dim:
            raise ReferenceFormatError(f"--resume {self.path}: {key} needs multi-head attention; this model has "
                                       f"{self.n_kv} KV heads for {self.n_heads} query heads (GQA), which the "
                                       f"reference code cannot transform")
        if key == "out_smooth_shift":
            if tuple(t.shape) != (kv_dim,):
                self._fail(index, key, t, (kv_dim,))
            return {"let.out_shift": t}
        if key in ("out_smooth_scale", "qkt_smooth_scale"):
            name = "let.out_param" if key == "out_smooth_scale" else "let.qk_param"
            if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1:
                return {name: self._blocks(index, key, t)}
            if t.numel() != kv_dim:
                self._fail(index, key, t, (kv_dim,))
            return {name: t.reshape(-1) if key == "out_smooth_scale" else t.reshape(self.n_kv, self.head_dim)}
        raise ReferenceFormatError(f"--resume {self.path}: layer {index} has an unknown parameter {key!r}")


class ReferenceResume:
    """The block loop's checkpoint when resuming from a reference file: blocks the file holds are
    rebuilt from it (and recorded in the run's own checkpoint, so that it is complete); the others are
    trained (epochs > 0, as AffineQuant does) or take their initial parameters (epochs 0)."""

    def __init__(self, params: ReferenceParams, checkpoint):
        self.params, self.inner = params, checkpoint
        self.dir = checkpoint.dir

    def done(self, index: int) -> bool:
        return index in self.params.states or self.inner.done(index)

    def path(self, index: int):
        return self.params.path if index in self.params.states else self.inner.path(index)

    def load(self, index: int):
        if index not in self.params.states:
            return self.inner.load(index)
        report = {"source": str(self.params.path)}
        self.inner.save(index, self.params.states[index], report)
        return self.params.states[index], report

    def save(self, index: int, state, report) -> None:
        self.inner.save(index, state, report)


# ----- ours -> reference ------------------------------------------------------------------------
def write_reference_params(path: str | Path, checkpoint, cfg: QuantConfig, model_config, adapter) -> dict:
    """Write the run's learned parameters (its checkpoint's blocks) as a reference parameter file.
    Returns {"written": [...], "not_representable": [...]}, what the reference cannot reproduce."""
    stages = {s.name: s for s in cfg.stages()}
    n_heads, n_kv, head_dim = adapter.heads(model_config)
    let = stages.get("let")
    sf = let.stability_factor(cfg.abits) if let is not None else None
    notes: list[str] = []
    if "gptq" in stages:
        notes.append("the weights were rounded with GPTQ; the reference rounds to nearest")
    if not cfg.reference_compat:
        notes.append("the run used this tool's conventions (not --reference_compat): the reference applies its own "
                     "quantizer range and, on RoPE models, its own q <-> k scaling")
    if let is not None and n_kv != n_heads:
        notes.append(f"LET on a GQA model ({n_kv} KV heads for {n_heads}): the reference has no GQA, LET not written")
        let = None
    out: dict[int, OrderedDict] = {}
    snapped = 0
    for index in sorted(checkpoint.manifest["finished"]):
        state, _ = checkpoint.load(index)
        layer: OrderedDict = OrderedDict()
        if let is not None:
            entries, n = _let_to_reference(state, let, adapter, n_kv, head_dim, sf,
                                           adapter.rope and not cfg.reference_compat)
            layer.update(entries)
            snapped += n
        for key, value in state.items():
            if key.startswith("lwc."):
                linear, side = key[4:].rsplit(".", 1)
                clip = state.get(f"clip.{linear}")
                if clip is not None:     # the clipping search's ratio folded into LWC's factor
                    value = torch.logit((torch.sigmoid(value) * clip).clamp(max=1 - 1e-7))
                layer[f"{linear}{LWC_SUFFIX}{side}"] = value.reshape(-1, 1).float().contiguous()
        clip_only = [k for k in state if k.startswith("clip.") and f"lwc.{k[5:]}.upbound_factor" not in state]
        for key in clip_only:
            ratio = state[key].clamp(max=1 - 1e-7)
            factor = torch.logit(ratio).reshape(-1, 1).float().contiguous()
            for side in LWC_SIDES:
                layer[f"{key[5:]}{LWC_SUFFIX}{side}"] = factor.clone()
        if clip_only and index == min(checkpoint.manifest["finished"]):
            notes.append("clipping-search ratios written as LWC factors: run the reference with --lwc")
        out[index] = layer
    if snapped:
        notes.append(f"{snapped} matrix entries lie below the reference's truncation threshold "
                     f"({REFERENCE_TRUNCATION:g}): its truncate_number will move them")
    missing = [i for i in range(checkpoint.manifest["n_blocks"]) if i not in out]
    if missing:
        notes.append(f"layers {missing[:8]} are not finished and not written")
    atomic_write(Path(path), lambda tmp: torch.save(out, tmp))
    for note in notes:
        log.warning("--save_params: %s", note)
    log.info("--save_params: wrote %d layers to %s (reference format%s)", len(out), path,
             f"; apply with the reference's --sf {sf:g}" if let is not None and (let.ln_matrix or let.qk_matrix) else "")
    return {"path": str(path), "layers": len(out), "not_representable": notes}


def _unmask(effective: torch.Tensor, reference_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The raw matrix the reference stores, given the effective one and the mask it will apply."""
    raw = torch.where(reference_mask != 0, effective / torch.where(reference_mask != 0, reference_mask,
                                                                   torch.ones_like(reference_mask)),
                      torch.zeros_like(effective))
    small = int(((raw != 0) & (raw.abs() < REFERENCE_TRUNCATION)).sum())
    return raw, small


def _let_to_reference(state: dict, let, adapter, n_kv: int, head_dim: int, sf: float,
                      pairs: bool) -> tuple[dict, int]:
    """Our LET state -> the reference's *smooth* entries (effective transforms re-expressed as raw
    matrices under the reference's final masks). `pairs`: q <-> k scales tied per RoPE pair (our
    default formulation, not --reference_compat)."""
    entries: dict[str, torch.Tensor] = {}
    snapped = 0
    ln_bands, head_bands = int(state["mask.ln_bands"]), int(state["mask.head_bands"])
    ln_sf, head_sf = float(state["mask.ln_sf"]), float(state["mask.head_sf"])
    head_ref = band_mask(head_dim, head_dim, sf, "cpu")
    head_ours = band_mask(head_dim, head_bands, head_sf, "cpu")
    for i, prefix in enumerate(NORM_PREFIXES[:len(adapter.norm_groups)]):
        scale = state[f"let.norm_params.{i}"].float()
        if scale.dim() == 2:
            d = scale.shape[0]
            scale, n = _unmask(scale * band_mask(d, ln_bands, ln_sf, "cpu"), band_mask(d, d, sf, "cpu"))
            snapped += n
        entries[f"{prefix}_smooth_scale"] = scale.contiguous()
        shift = state.get(f"let.norm_shifts.{i}")
        entries[f"{prefix}_smooth_shift"] = (shift.float() if shift is not None else
                                            torch.zeros(scale.shape[0])).contiguous()
    out = state["let.out_param"].float()
    if out.dim() == 3:
        raw, n = _unmask(out * head_ours, head_ref)
        snapped += n
        out = torch.block_diag(*raw)
    entries["out_smooth_scale"] = out.contiguous()
    shift = state.get("let.out_shift")
    entries["out_smooth_shift"] = (shift.float() if shift is not None else torch.zeros(n_kv * head_dim)).contiguous()
    qk = state["let.qk_param"].float()
    if let.qk_matrix and pairs:                                     # a complex scale per RoPE pair
        c = qk
        k_blocks = rope_pair_blocks(c / (c[..., 0] ** 2 + c[..., 1] ** 2).clamp(min=1e-5)[..., None])
        raw, n = _unmask(k_blocks, head_ref)                        # reference: k·T, q·T^-T
        snapped += n
        qk = torch.block_diag(*raw)
    elif let.qk_matrix:
        raw, n = _unmask(qk * head_ours, head_ref)
        snapped += n
        qk = torch.block_diag(*raw)
    elif pairs:
        qk = torch.cat([qk, qk], dim=-1).reshape(-1)                # a scale per RoPE pair, on both channels
    else:
        qk = qk.reshape(-1)
    entries["qkt_smooth_scale"] = qk.contiguous()
    return entries, snapped
