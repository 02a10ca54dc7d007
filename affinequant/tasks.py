"""Zero-shot (and few-shot) evaluation with lm-eval 0.4 on the in-memory quantized model.

Online, tasks load their standard hub datasets. Offline, a task whose data is in the data
directory runs through a generated task file that includes lm-eval's own definition and points
it at the local file (lm-eval's include_path); results are reported under the usual name.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from .utils import hub_reachable

log = logging.getLogger("affinequant")

ALIASES = {"hendrycksTest": "mmlu"}           # AffineQuant's (lm-eval 0.3) name for MMLU
DEFAULT_FEWSHOT = {"mmlu": 5}                 # as AffineQuant evaluates it
# task: (lm-eval config to include, local file, split); the files are in the HF schema
LOCAL_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", "ARC-Easy-Test.jsonl", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ARC-Challenge-Test.jsonl", "test"),
}


def _local_task_dir(names: list[str], data_dir: Path | None, out: Path) -> dict[str, str]:
    """Write task files for the tasks that have local data; returns {task: local task name}."""
    import lm_eval
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    renamed = {}
    for name in names:
        if name not in LOCAL_TASKS:
            continue
        config, fname, split = LOCAL_TASKS[name]
        path = data_dir / fname if data_dir else None
        if path is None or not path.is_file():
            continue
        local = f"{name}_local"
        (out / f"{local}.yaml").write_text(
            f"include: {tasks_root / config}\ntask: {local}\ntag: []\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {path}\ntraining_split: null\nvalidation_split: null\n"
            f"test_split: {split}\n")
        renamed[name] = local
    return renamed


def run_tasks(model, tokenizer, task_list: str, num_fewshot: int | None, limit: int | None, device,
              data_dir: Path | None, batch_size: int = 8) -> dict:
    """{task: {metric: value}} for the comma-separated `task_list`."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise SystemExit("--tasks needs lm-eval 0.4: pip install 'lm_eval==0.4.*'") from exc
    names = [ALIASES.get(n.strip(), n.strip()) for n in task_list.split(",") if n.strip()]
    model.config.use_cache = False
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        renamed = {}
        if not hub_reachable():
            renamed = _local_task_dir(names, data_dir, Path(tmp))
            missing = [n for n in names if n not in renamed]
            if missing:
                raise SystemExit(f"--tasks {','.join(missing)}: the hub is not reachable and no local copy was found "
                                 f"(local copies are supported for {', '.join(LOCAL_TASKS)} in the data directory "
                                 f"{data_dir})")
        manager = TaskManager(include_path=tmp if renamed else None)
        by_shots: dict[int, list[str]] = {}
        for n in names:
            shots = num_fewshot if num_fewshot is not None else DEFAULT_FEWSHOT.get(n, 0)
            by_shots.setdefault(shots, []).append(n)
        for shots, group in by_shots.items():
            out = lm_eval.simple_evaluate(model=lm, tasks=[renamed.get(n, n) for n in group], num_fewshot=shots,
                                          limit=limit, task_manager=manager, log_samples=False)
            back = {v: k for k, v in renamed.items()}
            for task, metrics in out["results"].items():
                clean = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))
                         and not k.startswith("alias")}
                results[back.get(task, task)] = {**clean, "num_fewshot": shots,
                                                 "source": "local file" if task in back else "hub"}
    for task, m in results.items():
        log.info("%-16s acc %s  acc_norm %s  (%d-shot%s)", task, _fmt(m.get("acc")), _fmt(m.get("acc_norm")),
                 m["num_fewshot"], f", first {limit} examples" if limit else "")
    return results


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"
