"""End to end on the real SmolLM2-135M (dequantized from a Q4_1 GGUF, fetched from the package index)."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from affinequant.models.adapters import get_adapter
from affinequant.pipeline.calibrate import quantize_blocks
from affinequant.config import QuantConfig
from affinequant.eval.data import eval_tokens
from affinequant.eval.perplexity import perplexity
from affinequant.models.loading import default_model_path, load_model

from test_quantizer import reference_rtn

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "wiki.test.raw").is_file(), reason="../shared/data not present")


@pytest.fixture(scope="module")
def smollm2():
    return load_model(str(default_model_path()))


def test_rtn_perplexity_matches_independent_computation(smollm2):
    model, tok, _ = smollm2
    seqlen, n = 256, 4
    tokens, _ = eval_tokens("wikitext2", tok, seqlen, SHARED)
    independent = copy.deepcopy(model)
    ours = copy.deepcopy(model)
    quantize_blocks(ours, get_adapter(ours.config), tokens[: 2 * seqlen].view(2, seqlen),
                    QuantConfig(wbits=3, group_size=128), torch.device("cpu"))
    ppl = perplexity(ours, tokens, seqlen, torch.device("cpu"), limit=n)["ppl"]
    # Independent: element-wise numpy min-max RTN of every block linear, HF's own shifted-label loss.
    with torch.no_grad():
        for module in independent.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.numpy()          # float32, the precision the model runs in
                module.weight.copy_(torch.from_numpy(reference_rtn(w, 3, 128, False, fp16_scales=True)))
        losses = [independent(tokens[i * seqlen:(i + 1) * seqlen][None],
                              labels=tokens[i * seqlen:(i + 1) * seqlen][None]).loss.item() for i in range(n)]
    assert math.isclose(ppl, math.exp(np.mean(losses)), rel_tol=1e-4)


def test_main_end_to_end_lwc(tmp_path, monkeypatch):
    from affinequant.cli import run
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(default_model_path()), "--data_dir", str(SHARED), "--calib_dataset", "c4",
              "--nsamples", "4", "--seqlen", "256", "--wbits", "3", "--group_size", "128", "--eval_ppl",
              "--limit", "3", "--ppl_datasets", "wikitext2"]
    rtn = run(common + ["--output_dir", str(tmp_path / "rtn")])
    lwc = run(common + ["--lwc", "--epochs", "2", "--compile_block", "--output_dir", str(tmp_path / "lwc")])
    written = json.loads((tmp_path / "lwc" / "results.json").read_text())
    assert written["ppl"]["wikitext2"]["windows"] == 3
    # training compiles the quantizer's kernels where a compiler is (auto); RTN does not need them
    from affinequant.quant.quantizer import compile_available
    assert rtn["quant_kernels"] == "eager"
    fell_back = "compiled quantizer kernels unavailable" in (tmp_path / "lwc" / "log.txt").read_text()
    assert lwc["quant_kernels"] == ("compiled" if compile_available() and not fell_back else "eager")
    # --compile_block: the training steps ran through torch.compile
    assert rtn["compile_block"] is False
    assert lwc["compile_block"] is (compile_available() and "cannot build the block" not in
                                    (tmp_path / "lwc" / "log.txt").read_text())
    for res in (rtn, lwc):
        w = res["ppl"]["wikitext2"]
        assert math.isfinite(w["ppl"]) and w["ppl"] > w["fp_ppl"] and w["kl"] > 0
    # training lowers every block's reconstruction error against the full-precision block
    assert sum(b["final_mse"] for b in lwc["blocks"]) < sum(b["final_mse"] for b in rtn["blocks"])
