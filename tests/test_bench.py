"""The benchmark's bookkeeping: budget overrides per model and setting, the paired comparison."""
import importlib.util
import math
from argparse import Namespace
from pathlib import Path

spec = importlib.util.spec_from_file_location("run_bench", Path(__file__).resolve().parents[1] / "bench" / "run_bench.py")
run_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_bench)


def test_budget_overrides_model_then_setting():
    args = Namespace(nsamples=8, epochs=3, windows=20, par_steps=24,
                     model_overrides="big:nsamples=4,epochs=2,windows=10,par_steps=16;big/W4A4:windows=40")
    assert run_bench.budget(args, "small", "W4A4") == {"nsamples": 8, "epochs": 3, "windows": 20, "par_steps": 24}
    assert run_bench.budget(args, "big", "W3A16g128") == {"nsamples": 4, "epochs": 2, "windows": 10, "par_steps": 16}
    assert run_bench.budget(args, "big", "W4A4") == {"nsamples": 4, "epochs": 2, "windows": 40, "par_steps": 16}


def test_paired_difference_to_rtn():
    rtn = dict(model="m", setting="W4A4", method="RTN", window_nll=[5.0, 6.0, 7.0])
    better = dict(model="m", setting="W4A4", method="LWC+LET", window_nll=[4.9, 5.7, 6.9])
    diffs = [-0.1, -0.3, -0.1]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
    assert run_bench.paired_vs_rtn(better, [rtn, better]) == f"{mean:+.3f} ± {se:.3f}"
    assert run_bench.paired_vs_rtn(rtn, [rtn, better]) == "–"
    other_windows = dict(better, window_nll=[4.9, 5.7])
    assert run_bench.paired_vs_rtn(other_windows, [rtn, other_windows]) == "–"
    no_record = dict(better, window_nll=None)          # a run from before window NLLs were kept
    assert run_bench.paired_vs_rtn(no_record, [rtn, no_record]) == "–"
