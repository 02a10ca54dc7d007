"""Data-parallel calibration (torch.distributed, gloo on the CPU, two processes): the same model as one
process with the same global batch, one writer, and a rank that dies stops the run cleanly for --resume."""
import json
import multiprocessing as mp
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny, write_text

FLAGS = ["--wbits", "3", "--group_size", "16", "--lwc", "--let", "--epochs", "2", "--nsamples", "4", "--batch_size",
         "2", "--seqlen", "32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hessian_recorder(folder: Path, tag: str):
    """A linear_hessians that also saves every Hessian it builds, in call order, to folder/<tag>-<n>.safetensors."""
    from safetensors.torch import save_file
    from affinequant.stages.base import linear_hessians
    calls = [0]

    def recording(ctx, data, names):
        hessians = linear_hessians(ctx, data, names)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: h.H.contiguous() for name, h in hessians.items()},
                  str(folder / f"{tag}-{calls[0]:03d}.safetensors"))
        calls[0] += 1
        return hessians
    return recording


def _worker(rank: int, world: int, port: int, argv: list, queue, die_at_block: int | None, cwd: str,
            hessian_dir: str | None = None):
    os.chdir(cwd)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), AFFINEQUANT_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from affinequant.pipeline import calibrate
    from affinequant.cli import run
    if hessian_dir is not None:     # the clipping search and GPTQ build theirs through it
        from affinequant.stages import clip_search, rounding
        rounding.linear_hessians = clip_search.linear_hessians = hessian_recorder(Path(hessian_dir), f"rank{rank}")
    if die_at_block is not None and rank == 1:
        real = calibrate.BlockRunner.quantize

        def dying(self, block, index, *a, **k):
            if index == die_at_block:
                os._exit(3)             # a rank lost mid-run (killed, out of memory...)
            return real(self, block, index, *a, **k)
        calibrate.BlockRunner.quantize = dying
    try:
        res = run(argv)
        queue.put((rank, "ok", json.dumps(res.get("blocks"))))
    except SystemExit as exc:
        queue.put((rank, "exit", str(exc.code)))


def _run_ranks(argv, cwd, world=2, die_at_block=None, timeout=240, hessian_dir=None):
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, argv, queue, die_at_block, str(cwd),
                                               None if hessian_dir is None else str(hessian_dir)))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    out = {}
    while not queue.empty():
        rank, status, detail = queue.get()
        out[rank] = (status, detail)
    return out, [p.exitcode for p in procs]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return ["--model", save_tiny(tmp_path / "tiny-llama"), "--calib_dataset", write_text(tmp_path / "c.txt")]


def _blocks(folder: Path) -> dict:
    return {p.name: load_file(p) for p in sorted((folder / "checkpoint").glob("block_*.safetensors"))}


FLATQUANT_FLAGS = ["--wbits", "4", "--abits", "4", "--kv_bits", "16", "--flatquant", "--epochs", "2", "--nsamples",
                   "4", "--batch_size", "2", "--seqlen", "32"]


def test_two_ranks_learn_what_one_process_learns(setup, tmp_path, flags=FLAGS):
    from affinequant.cli import run
    run(setup + flags + ["--output_dir", str(tmp_path / "one")])
    out, codes = _run_ranks(setup + flags + ["--output_dir", str(tmp_path / "two")], tmp_path)
    assert codes == [0, 0] and out[0][0] == "ok" and out[1][0] == "ok", out
    one, two = _blocks(tmp_path / "one"), _blocks(tmp_path / "two")
    assert list(one) == list(two) == ["block_0000.safetensors", "block_0001.safetensors"]
    for name in one:
        # Adam's steps (about ±lr) move with the float-order gradient differences by a tiny fraction of lr (see the
        # FlatQuant test below); here they end within a few ulps (2.4e-7 on values of 4), far inside this bound.
        for key, value in one[name].items():
            assert torch.allclose(two[name][key], value, atol=1e-5, rtol=1e-4), (name, key)
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())       # written once, by rank 0
    for x, y in zip(a["blocks"], b["blocks"]):
        assert y["losses"] == pytest.approx(x["losses"], rel=1e-4)
        assert y["final_mse"] == pytest.approx(x["final_mse"], rel=1e-4)


def test_clip_search_and_gptq_average_their_statistics_over_ranks(setup, tmp_path, monkeypatch):
    """Their Hessians cover every rank's samples: on block 0, whose inputs are the same embeddings in both runs
    (no training before it), the two ranks' H = 2/n·Σxᵀx is one process's up to float summation order, and
    the clipping ratios searched on it are one process's."""
    from affinequant.cli import run
    from affinequant.stages import clip_search, rounding
    flags = ["--wbits", "3", "--group_size", "16", "--clip_search", "--gptq", "--nsamples", "4", "--batch_size", "2",
             "--seqlen", "32"]
    with monkeypatch.context() as patch:
        recorder = hessian_recorder(tmp_path / "hessians", "one")
        patch.setattr(rounding, "linear_hessians", recorder)
        patch.setattr(clip_search, "linear_hessians", recorder)
        run(setup + flags + ["--output_dir", str(tmp_path / "one")])
    out, codes = _run_ranks(setup + flags + ["--output_dir", str(tmp_path / "two")], tmp_path,
                            hessian_dir=tmp_path / "hessians")
    assert codes == [0, 0] and out[0][0] == "ok", out
    n_tokens = 4 * 32                                       # --nsamples 4 × --seqlen 32
    for call in range(2):                                   # block 0: the clipping search's pass, GPTQ's first
        one, *ranks = (load_file(tmp_path / "hessians" / f"{tag}-{call:03d}.safetensors")
                       for tag in ("one", "rank0", "rank1"))
        assert one and set(one) == set(ranks[0]) == set(ranks[1])
        for name, h in one.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), name      # the all-reduce gives every rank one H
            # |Σ_k x_ki x_kj| summed in two orders differs by at most about 2·n·u·Σ_k|x_ki x_kj|, and by
            # Cauchy-Schwarz Σ_k|x_ki x_kj| ≤ (n/2)·√(H_ii H_jj); the rescalings add a few u more.
            d = torch.diag(h).clamp_min(0).sqrt()
            bound = 2 * (n_tokens + 16) * 2.0 ** -24 * torch.outer(d, d)
            assert ((ranks[0][name] - h).abs() <= bound).all(), name
    one, two = _blocks(tmp_path / "one"), _blocks(tmp_path / "two")
    for key in (k for k in one["block_0000.safetensors"] if k.startswith("clip.")):
        assert torch.equal(two["block_0000.safetensors"][key], one["block_0000.safetensors"][key]), key


def test_tesseraq_keeps_every_rank_identical(setup, tmp_path):
    """TesseraQ's own mini-batch loop averages its gradients over the ranks: both ranks end with the same
    rounding (the same losses and the same share of codes moved off round-to-nearest)."""
    flags = ["--wbits", "3", "--group_size", "16", "--tesseraq", "--par_iters", "4", "--par_rounds", "3",
             "--par_batch", "2", "--par_lr", "1e-2", "--nsamples", "4", "--batch_size", "2", "--seqlen", "32"]
    out, codes = _run_ranks(setup + flags + ["--output_dir", str(tmp_path / "t")], tmp_path)
    assert codes == [0, 0] and out[0][0] == out[1][0] == "ok", out
    # everything the ranks learned and measured, not their wall time (which differs on a loaded machine)
    ranks = [[{k: v for k, v in b["stages"]["tesseraq"].items() if k != "seconds"} for b in json.loads(out[r][1])]
             for r in (0, 1)]
    assert ranks[0] == ranks[1] and all(t["changed_vs_rtn"] > 0 for t in ranks[0])


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(setup, tmp_path):
    flags = list(FLAGS)
    flags[flags.index("--batch_size") + 1] = "1"
    out, _ = _run_ranks(setup + flags + ["--output_dir", str(tmp_path / "g")], tmp_path)
    assert out == {0: ("exit", "2"), 1: ("exit", "2")}      # argparse's usage error, on every rank, before any work
    assert not (tmp_path / "g" / "checkpoint").exists()


def test_a_rank_that_dies_stops_the_run_and_resume_continues(setup, tmp_path):
    from affinequant.cli import run
    argv = setup + FLAGS + ["--output_dir", str(tmp_path / "two")]
    out, codes = _run_ranks(argv, tmp_path, die_at_block=1)
    assert codes[1] == 3
    status, message = out[0]
    assert status == "exit" and "another rank stopped" in message and "--resume" in message
    assert list(_blocks(tmp_path / "two")) == ["block_0000.safetensors"]
    res = run(argv + ["--resume"])      # one process continues from rank 0's checkpoint
    assert res["blocks_restored"] == 1 and len(res["blocks"]) == 2


def test_flatquant_ranks_agree_and_learn_the_first_block_as_one_process(setup, tmp_path):
    """FlatQuant data-parallel (random start seeded per block, LAC, cosine schedule, the k-cache start chosen on the
    loss summed over every rank's probe samples): every rank takes the same decisions and losses, and the first
    block's parameters are one process's. Later blocks are compared between ranks only: on this tiny model Adam
    turns float-level differences of near-zero gradients into different steps, so a second block drifts from the
    one-process run within the learning rate, not beyond it."""
    from affinequant.cli import run
    flags = [f if f != "16" else "4" for f in FLATQUANT_FLAGS]
    run(setup + flags + ["--output_dir", str(tmp_path / "one")])
    out, codes = _run_ranks(setup + flags + ["--output_dir", str(tmp_path / "two")], tmp_path)
    assert codes == [0, 0] and out[0][0] == out[1][0] == "ok", out
    ranks = [[(b["stages"]["flatquant"]["key_start"], b["losses"]) for b in json.loads(out[r][1])] for r in (0, 1)]
    assert ranks[0] == ranks[1]
    one, two = _blocks(tmp_path / "one"), _blocks(tmp_path / "two")
    # Block 0 starts from the same point in both runs, and the two runs' gradients differ only by float
    # summation order (one batch of 2 against two averaged halves): a relative 1e-7 of the gradient's
    # magnitudes. AdamW's step is lr·m̂/(√v̂ + ε), close to ±lr per element, and changes with such a gradient
    # error by a small fraction of lr; an element whose gradient is below the summation error moves by at most
    # lr·(that error)/ε, again far less than a step (ε = 1e-8). Over the 4 steps both runs stay within a
    # quarter of one step of each other (1e-4 here); a run whose ranks took the wrong share of each batch
    # (every rank given rank 0's sample, checked once) ends up to 0.022, four steps, away.
    tolerance = 0.25 * 5e-3         # a quarter of one step at --flat_lr, the smallest learning rate here
    for key, value in one["block_0000.safetensors"].items():
        assert (two["block_0000.safetensors"][key] - value).abs().max() <= tolerance, key
    # Block 1's inputs already differ by block 0's drift, so its two trajectories may part: each moves an element
    # by about lr per step at most (Adam's |m̂/√v̂| ≲ 1), so they end within 2 · 4 steps · lr of each other
    # (LAC's clipping learns at 10x --flat_lr, LWC at --lwc_lr). The k start itself may flip on a near-tie.
    for key, value in one["block_0001.safetensors"].items():
        if not key.startswith("flatquant.key."):
            lr = 5e-2 if key.startswith("flatquant.lac.") else 1e-2 if key.startswith("lwc.") else 5e-3
            assert (two["block_0001.safetensors"][key] - value).abs().max() <= 2 * 4 * lr, key


def test_streamed_ranks_give_the_in_memory_ranks_model(setup, tmp_path):
    """--stream under two ranks: each reads every block, rank 0 alone stores and exports them; the export is the
    two-rank in-memory run's, bit for bit."""
    from affinequant.formats.export import load_quantized
    flags = setup + FLAGS
    for name, extra in (("memory", []), ("stream", ["--stream", "--cache_dir", str(tmp_path / "cache")])):
        out, codes = _run_ranks(flags + extra + ["--output_dir", str(tmp_path / name), "--save_dir",
                                                 str(tmp_path / f"saved-{name}")], tmp_path)
        assert codes == [0, 0] and out[0][0] == "ok" and out[1][0] == "ok", out
    a, b = (load_quantized(str(tmp_path / f"saved-{n}")).state_dict() for n in ("memory", "stream"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "stream" / "blocks").exists()
