"""The benchmarks' baselines compute what the ops compute (a fast baseline that is wrong would flatter nothing)."""
import json

import torch

from pgrpo import bench_kernel as bk


def test_kernel_bench_baselines_match_the_float64_reference_and_run(capsys):
    stacks, packed, g_offsets, names, ranks, vh = bk.build_problem(torch.device("cpu"), torch.float32, 64, 1, 4)
    ref = torch.cat([(s["U"][l].double() * (s["G"][l].double() @ s["Vh"][l].double().T)).sum(0)
                     for s in stacks for l in range(s["L"])])
    assert any(s["o"] > s["i"] for s in stacks) and any(s["o"] < s["i"] for s in stacks)  # both branches
    for fn in (bk.basis_loop, bk.basis_batched):
        torch.testing.assert_close(fn(stacks).double(), ref, rtol=1e-4, atol=1e-5)
    assert bk.main(["--device", "cpu", "--scale", "64", "--layers", "1", "--repeat", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["impls"]["basis_change/torch_loop"]["max_abs_err"] < 1e-3
    assert 0 < res["bandwidth"]["projection_bytes"]
