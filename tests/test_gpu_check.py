"""`make gpu-check`'s CPU dry mode: the whole script (ops check, bench step on the 4B-shape model scaled down,
2 training steps of the full-projected preset with the real grader) runs on small shapes and writes its JSON,
so the GPU check cannot rot while no GPU is around. The GPU-only parts (build, CUDA tests) run only on a GPU."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_mode_runs_every_stage_and_writes_one_json(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1", OUT=str(tmp_path), PY=sys.executable, PYTHONPATH=ROOT)
    p = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["dry"] and res["fails"] == []
    assert set(res["stages"]) == {"ops", "bench_step", "train", "bench_compile"}
    assert res["ops"]["checks"] and all(ok for ok, _ in res["ops"]["checks"].values())
    assert any(k.startswith("merge") for k in res["ops"]["times_ms"])
    gen = res["bench_compile"]["generation"]
    assert {"today", "batched", "compile"} <= set(gen) and all("tok_per_s" in v for v in gen.values())
    assert all(res["bench_compile"]["generation_identical_tokens"].values())
    assert {"today", "batched"} <= set(res["bench_step"]["generation"]) and "phase_share" in res["bench_step"]
    assert res["bench_step"]["loss"]["grad_rel_diff"] < 1e-4
    steps = res["train"]["steps"]
    assert len(steps) == 2 and all(s["grad_norm_raw"] > 0 and "merge_lost_frac" in s for s in steps)
