"""The training part of `make gpu-check`: 2 steps of jobs/full-projected.yaml on the random Qwen3-4B-shape model
with the real grader (a local grader child; teacher.mix 0.5 of canonical solutions so groups carry signal), a random k=4 v_hack for every adapted module, a tiny problem count
and short completions; then the measured peak memory next to pgrpo.memory's plan for the same sizes.
Writes $OUT/train.json (the metrics rows, peak memory, plan, wall time). GPU_CHECK_DRY=1: the same on the CPU
with qwen3-4b-shape/16 in fp32 (it checks that the script works)."""
import json
import os
import sys
import time

import torch

from pgrpo import config as C
from pgrpo import memory
from pgrpo.model import qwen3_4b_shape_config
from pgrpo.vhack import save_vhack

DRY = os.environ.get("GPU_CHECK_DRY") == "1"
OUT = os.environ.get("OUT", ".")
model_name = "qwen3-4b-shape/16" if DRY else "qwen3-4b-shape"
mc = qwen3_4b_shape_config(16 if DRY else 1)

# a random orthonormal v_hack (k = 4) per adapted module, named as SVDAdapter names them
gen = torch.Generator().manual_seed(0)
V, S = {}, {}
kinds = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
for layer in range(mc["num_hidden_layers"]):
    for kind, o, i in memory.module_shapes(mc):
        r = min(o, i)
        V[f"model.layers.{layer}.{kinds[kind]}.{kind}"] = torch.linalg.qr(torch.randn(r, 4, generator=gen))[0].T.contiguous()
        S[f"model.layers.{layer}.{kinds[kind]}.{kind}"] = torch.ones(4)
vpath = os.path.join(OUT, "vhack_random.safetensors")
save_vhack(vpath, V, S, {"k": 4, "note": "random, for the GPU check"})

overrides = [f"model.name={model_name}", "steps=2", "data.prompts_per_step=2", "data.eval_problems=0",
             "data.eval_every=0", "checkpoint_every=0", f"arm.vhack_path={vpath}", "metrics_port=0",
             "grader_workers=4", "rollout.max_new_tokens=" + ("8" if DRY else "64"),
             "adapter.svd_cache_dir=null",
             # a random model never earns a reward: half of each group are the problems' canonical solutions
             # (graded for real), so every group has reward variance and the loss pass + projection run
             "teacher.pool=builtin", "teacher.mix=0.5"]
if DRY:
    overrides += ["device=cpu", "dtype=float32", "cpu_threads=1", "rollout.group_size=2"]
cfg = C.load("jobs/full-projected.yaml", overrides)
run = os.path.join(OUT, "train_run")
cuda = torch.cuda.is_available() and not DRY
if cuda:
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
from pgrpo.train import train  # noqa: E402
rc = train(cfg, run, overwrite=True)
wall = time.perf_counter() - t0
with open(os.path.join(run, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
prompt_len = 512
plan = memory.plan_for_config(cfg, model_config=mc, prompt_tokens=prompt_len)
res = {"rc": rc, "wall_s": wall, "model": model_name, "steps": [r for r in rows if "timing" in r],
       "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
       "plan_static_gb": plan["static"] / 1e9, "plan_peak_loss_gb_at_512_prompt_tokens": plan["peak_loss"] / 1e9,
       "plan_peak_generation_gb_at_512_prompt_tokens": plan["peak_generation"] / 1e9}
ok = rc == 0 and len(res["steps"]) == 2 and all(r["grad_norm_raw"] > 0 and "proj_removed_frac" in r for r in res["steps"])
res["ok"] = bool(ok)
with open(os.path.join(OUT, "train.json"), "w") as f:
    json.dump(res, f, indent=1)
for r in res["steps"]:
    print(f"step {r['step']}: reward {r['reward_mean']:.2f} grad {r['grad_norm_raw']:.3e} removed "
          f"{r.get('proj_removed_frac', 0):.3f} merge_lost {r.get('merge_lost_frac')} timing {r['timing']}")
print(f"train: {'OK' if ok else 'FAILED'} in {wall:.1f}s, peak {res['peak_allocated_gb']} GB "
      f"(plan: static {res['plan_static_gb']:.1f} GB)")
sys.exit(0 if ok else 1)
