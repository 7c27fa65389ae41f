"""Run under `torchrun --nproc_per_node 2 tests/dist_worker.py OUT_DIR` by tests/test_dist.py: the trainer's
distributed pieces on real gloo ranks with the real tiny model (no mocks). Rank 0 writes what it saw to OUT_DIR.

1. projection: each rank back-propagates a different real group; the trainer's order (all-reduce, then the
   one-sided projection) is compared with projecting the full gradient in one process and with the wrong order
   (project each rank's partial gradient, then sum).
2. v_hack extraction with the pairs split across the ranks (rank 0 saves the result).
3. the per-step error flag: rank 1 reports a failure at the exchange; both ranks must stop with its reason.
4. a rank that fails elsewhere (say an OOM in backward) leaves its reason in the store and drops its
   connections, as exiting does: rank 0's next collective fails and names rank 1's reason.
"""
import json
import os
import sys
import time

import torch

from pgrpo import config as C
from pgrpo import dist, grpo, rollout, vhack
from pgrpo.adapter import SVDAdapter
from pgrpo.errors import UserError
from pgrpo.model import load_model
from pgrpo.ops import pack_vhack

out = sys.argv[1]
torch.set_num_threads(1)
comm = dist.init("cpu", timeout_s=60)
assert comm.world == 2, comm.world
model, tok = load_model("tiny", "float32", "cpu", seed=0)
ad = SVDAdapter(model, mode="merged")


def group_grad(gi):
    """The loss gradient of one real group (fixed random prompt/completions per index, as a rollout gives)."""
    gen = torch.Generator().manual_seed(100 + gi)
    prompt = torch.randint(0, 256, (30,), generator=gen).tolist()
    grp = rollout.Group(0, prompt, [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 12, 6, 10)],
                        [""] * 4, [False] * 4)
    ids, attn, cm = rollout.group_batch(grp, tok.pad_token_id, "cpu")
    adv = torch.tensor([1.5, -0.5, -1.5, 0.5]) * (1 if gi == 0 else -1)
    logp = grpo.completion_logprobs(model, ids, attn, cm)
    loss, _ = grpo.pg_token_loss(logp, logp.detach(), adv, cm)
    (loss / 100).backward()


# ---- 1. projection after the all-reduce
gv = torch.Generator().manual_seed(7)
V = {n: torch.linalg.qr(torch.randn(r, 3, generator=gv))[0].T.contiguous() for n, r in zip(ad.names, ad.ranks)}
packed = pack_vhack(ad.names, ad.ranks, V)
offs = grpo.g_offsets_of(ad)
arm = C.ArmConfig(name="projected", vhack_path="synthetic", one_sided=True)

ad.zero_grad()
group_grad(comm.rank)                                   # this rank's share of the step: one group
partial = ad.collect_grad().clone()
summed, stats = comm.reduce_grad(partial.clone(), [float(comm.rank + 1)])
after, _, _ = grpo.project_grad(summed.clone(), arm, packed, offs)   # the trainer's order
part_proj, _, _ = grpo.project_grad(partial.clone(), arm, packed, offs)
before, _ = comm.reduce_grad(part_proj, [0.0])        # the wrong order: project, then sum

ad.zero_grad()                                          # one process, both groups: the reference
group_grad(0)
group_grad(1)
full = ad.collect_grad().clone()
ref, _, _ = grpo.project_grad(full.clone(), arm, packed, offs)
if comm.is_main:
    with open(os.path.join(out, "project.json"), "w") as f:
        json.dump({"stats": stats, "sum_vs_full": float((summed - full).norm() / full.norm()),
                   "after_vs_ref": float((after - ref).norm() / ref.norm()),
                   "before_vs_ref": float((before - ref).norm() / ref.norm()),
                   "partials_differ": float((partial - full).norm() / full.norm())}, f)

# ---- 2. v_hack extraction, pairs split across the ranks
from pgrpo.data.pairs import load_pairs  # noqa: E402

pairs = load_pairs()[:5]                                 # odd: the ranks' shares differ (3 + 2)
Vx = vhack.extract_vhack(model, ad, tok, pairs, k=2, cut=0.0, seed=0, comm=comm)
if comm.is_main:
    vhack.save_vhack(os.path.join(out, "v2.safetensors"), Vx, {n: torch.ones(v.shape[0]) for n, v in Vx.items()})

# ---- 3. the per-step error flag
comm.step = 7
try:
    comm.exchange([], [], UserError("the grader exploded on purpose") if comm.rank == 1 else None)
    msg = "no error"
except UserError as e:
    msg = f"{type(e).__name__}: {e}"
with open(os.path.join(out, f"exchange-rank{comm.rank}.txt"), "w") as f:
    f.write(msg)

# ---- 4. a failure outside the exchange
comm.step = 9
if comm.rank == 1:
    comm.report_failure(RuntimeError("CUDA out of memory (on purpose)"))
    comm.close()                      # its connections drop, as when the process exits
    time.sleep(3)
else:
    try:
        comm.reduce_grad(torch.zeros(4), [0.0])
        msg = "no error"
    except UserError as e:
        msg = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, "lost-rank0.txt"), "w") as f:
        f.write(msg)
    comm.close()
