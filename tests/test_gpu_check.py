"""bench/gpu_check.sh, the one script a lent GPU runs, in its CI mode: every check on a tiny random model on the
CPU, so the script cannot rot before a GPU is there to run it."""
import json
import math
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_check_on_the_cpu_with_a_tiny_model(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--work",
                           str(tmp_path / "work"), "--out", str(tmp_path / "report.json")],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["checks"]) == {"readme_command", "affinequant_w3g128", "flatquant_w4a4kv4", "rtn_w4_float16",
                                     "rtn_w4_float32", "gptq_export"}
    for name, row in report["checks"].items():
        assert row["returncode"] == 0 and math.isfinite(row["ppl"]) and row["seconds_per_block"] > 0, name
    export = report["checks"]["gptq_export"]
    assert export["reloaded_ppl"] == export["ppl"]       # the packed export reads back to the same model, exactly
