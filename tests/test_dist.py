"""Data parallelism on real torchrun processes (gloo on CPU), the real tiny model, real graders.

One experiment on 2 ranks must be the 1-rank experiment: the same global batch (data order and per-group
sampling seeds are global), one all-reduce of the delta_S gradient, then the arm. The reference runs use the
projected arm (a random 2-direction v_hack), so they also show end to end that the projection sees the summed
gradient (projecting the partial gradients would change the run: tests/dist_worker.py measures by how much).

Tolerance (2 ranks vs 1): each rank's basis change runs on its own partial weight gradient and the two results
are then added, where one process sums all groups' weight gradients first: the same sum in another order, so
delta_S agrees to fp32 rounding (~1e-7 here), not bitwise. The samples, rewards and labels are identical.
A resumed 2-rank run repeats the uninterrupted 2-rank arithmetic exactly: that comparison is bitwise.
"""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from helpers import free_port
from test_train import Trainer, _read_rows

from pgrpo import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FDR = os.path.join(ROOT, "jobs", "fast-dev-run.yaml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "0"]
# 4 groups of 4 per step, 2 per generate call: each rank's share (2 groups) is one generate call of the
# 1-rank run, so the two runs draw the same samples
SETS = ["steps=4", "data.prompts_per_step=4", "rollout.groups_per_generate=2", "rollout.max_new_tokens=16",
        "checkpoint_every=2", "arm.name=projected"]


class TorchRun(Trainer):
    """`torchrun --nproc_per_node N -m pgrpo train ...` in its own process group, output read line by line."""

    def __init__(self, nproc, *args):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.t0 = time.time()
        self.p = subprocess.Popen([*TORCHRUN, "--nproc_per_node", str(nproc), "-m", "pgrpo", "train", *args],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        import queue
        import threading
        self.lines, self.q = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()


def _sets(vpath, extra=()):
    out = []
    for s in [*SETS, f"arm.vhack_path={vpath}", *extra]:
        out += ["--set", s]
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:   # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
def vpath(tmp_path_factory):
    from pgrpo import vhack
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import load_model
    model, _ = load_model("tiny", "float32", "cpu", seed=0)
    ad = SVDAdapter(model, mode="merged")
    g = torch.Generator().manual_seed(0)
    V = {n: torch.linalg.qr(torch.randn(r, 2, generator=g))[0].T.contiguous() for n, r in zip(ad.names, ad.ranks)}
    path = str(tmp_path_factory.mktemp("vh") / "v.safetensors")
    vhack.save_vhack(path, V, {n: torch.ones(2) for n in V}, {"k": "2", "cut": "0.0"})
    return path


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, vpath):
    run = str(tmp_path_factory.mktemp("r1") / "run")
    t = Trainer("--config", FDR, "--out", run, *_sets(vpath))
    assert t.finish() == 0, t.text()
    return run


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, vpath):
    """The uninterrupted 2-rank run; /metrics (rank 0) is scraped while it lingers after the last step."""
    run = str(tmp_path_factory.mktemp("r2") / "run")
    port = free_port()
    t = TorchRun(2, "--config", FDR, "--out", run, "--metrics-port", str(port), "--metrics-linger", "20",
                 *_sets(vpath))
    t.wait_for(r"^metrics: serving the final values", timeout=300)
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert t.finish() == 0, t.text()
    return {"dir": run, "out": t.text(), "scrape": scrape}


def _sample(text, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                return smp.value
    raise AssertionError(f"{name}{labels} not in the scrape")


def test_two_ranks_equal_one_rank(one_rank, two_ranks):
    _, a, _, rows1 = ckpt.load(os.path.join(one_rank, "ckpt_000004.safetensors"))
    _, b, _, rows2 = ckpt.load(os.path.join(two_ranks["dir"], "ckpt_000004.safetensors"))
    # the same global batch: same samples, same grader results, same skipped groups, every step
    assert [r["tokens_generated"] for r in rows1] == [r["tokens_generated"] for r in rows2]
    for key in ("reward_mean", "reward_mean_all", "hack_rate", "pass_rate", "frac_incorrect", "teacher_completions",
                "groups", "skipped_groups"):
        assert [r[key] for r in rows1] == [r[key] for r in rows2], key
    assert all(r["groups"] == 4 for r in rows2) and rows2[0]["proj_fired_frac"] > 0
    # delta_S and Adam's moments after 4 steps: equal to fp32 rounding (see the module docstring)
    scale = float(a["delta"].abs().max())
    assert scale > 0 and not torch.equal(a["delta"], torch.zeros_like(a["delta"]))
    assert torch.allclose(a["delta"], b["delta"], rtol=0, atol=1e-4 * scale), float((a["delta"] - b["delta"]).abs().max())
    for k in ("optim/0/exp_avg", "optim/0/exp_avg_sq"):
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4 * float(a[k].abs().max())), k
    assert torch.equal(a["data_order"], b["data_order"])
    for r1, r2 in zip(rows1, rows2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["grad_norm_raw"] == pytest.approx(r1["grad_norm_raw"], rel=1e-5)
        assert "allreduce" in r2["timing"] and "allreduce" not in r1["timing"]


def test_metrics_and_files_come_only_from_rank_0(two_ranks):
    out, run = two_ranks["out"], two_ranks["dir"]
    assert sorted(os.listdir(run)) == [".lock", "ckpt_000002.safetensors", "ckpt_000004.safetensors", "config.yaml",
                                       "metrics.jsonl", "rollouts"]
    rows = _read_rows(run)
    # the saved completions: one file per step, written once (by rank 0), holding the whole global batch
    import gzip
    import json
    files = sorted(os.listdir(os.path.join(run, "rollouts")))
    assert files == [f"step_{s:06d}.jsonl.gz" for s in (1, 2, 3, 4)], files
    for s, f in zip((1, 2, 3, 4), files):
        with gzip.open(os.path.join(run, "rollouts", f), "rt", encoding="utf-8") as fh:
            saved = [json.loads(ln) for ln in fh]
        assert len(saved) == 4 * 4 and all(r["step"] == s for r in saved)   # 4 groups x G 4: both ranks' groups
    assert [r["step"] for r in rows] == [1, 2, 3, 4]                     # one row per step, not one per rank
    assert len([ln for ln in out.splitlines() if ln.startswith("TIMING ")]) == 4
    assert len([ln for ln in out.splitlines() if ln.startswith("checkpoint: ")]) == 2
    assert "dist: rank 0/2" in out and "dist: rank 1/2" in out
    scrape = two_ranks["scrape"]
    # aggregated over the global batch: rank 0's counters include rank 1's grader requests and tokens
    assert _sample(scrape, "pgrpo_steps_total") == 4
    assert _sample(scrape, "pgrpo_grader_requests_total", outcome="ok") == 4 * 2
    assert _sample(scrape, "pgrpo_tokens_generated_total") == sum(r["tokens_generated"] for r in rows)


def test_projection_runs_after_the_all_reduce(tmp_path):
    """Real per-rank gradients: the trainer's order (sum, then project) is the 1-process projection; projecting
    each rank's part first gives another gradient. Also v_hack extraction split over 2 ranks and the error flag."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", os.path.join(ROOT, "tests", "dist_worker.py"),
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.load(open(tmp_path / "project.json"))
    assert r["stats"] == [3.0]                                  # 1 + 2: the statistics ride along, summed
    assert r["partials_differ"] > 0.1                           # the ranks really held different gradients
    assert r["sum_vs_full"] < 1e-5 and r["after_vs_ref"] < 1e-5  # reduce-then-project == one process
    assert r["before_vs_ref"] > 1e-2                            # project-then-reduce would change the update

    # extraction on 2 ranks (pairs 3 + 2) == extraction in one process, bit for bit (isolated backwards)
    from pgrpo import vhack
    from pgrpo.adapter import SVDAdapter
    from pgrpo.data.pairs import load_pairs
    from pgrpo.model import load_model
    torch.set_num_threads(1)
    model, tok = load_model("tiny", "float32", "cpu", seed=0)
    ad = SVDAdapter(model, mode="merged")
    V1 = vhack.extract_vhack(model, ad, tok, load_pairs()[:5], k=2, cut=0.0, seed=0)
    V2, _, _ = vhack.load_vhack(str(tmp_path / "v2.safetensors"))
    assert list(V1) == list(V2) and all(torch.equal(V1[n], V2[n]) for n in V1)

    # a failure on rank 1 at the exchange stops both ranks with rank 1's reason
    assert (tmp_path / "exchange-rank1.txt").read_text() == "UserError: the grader exploded on purpose"
    assert (tmp_path / "exchange-rank0.txt").read_text() == \
        "RankFailed: rank 1 stopped at step 7: the grader exploded on purpose (rank 0 stops too)"
    # a failure elsewhere: rank 0's next collective fails and reports rank 1's own reason
    assert (tmp_path / "lost-rank0.txt").read_text() == \
        "RankFailed: rank 1 stopped at step 9: RuntimeError: CUDA out of memory (on purpose) (rank 0 stops too)"


@pytest.mark.slow
def test_grader_kill_under_one_rank_then_sigkill_of_a_rank_then_resume(two_ranks, vpath, tmp_path):
    """Rank 1's grader is SIGKILLed after step 1 (it restarts there; rank 0 never notices), then rank 1 itself
    is SIGKILLed after the step-2 checkpoint: every rank stops with a clear error, nothing is left running, and
    `--resume` on 2 ranks ends exactly (bitwise) where the uninterrupted 2-rank run ended."""
    run = str(tmp_path / "run")
    t = TorchRun(2, "--config", FDR, "--out", run, *_sets(vpath))
    pids, graders = {}, {}
    while len(pids) < 2 or len(graders) < 2:
        m = t.wait_for(r"^(dist: rank (\d)/2 pid (\d+)|grader: local grader pid (\d+) \(rank (\d)/2\))")
        if m.group(2):
            pids[int(m.group(2))] = int(m.group(3))
        else:
            graders[int(m.group(5))] = int(m.group(4))
    t.wait_for(r"^TIMING step=1 ")
    os.killpg(graders[1], signal.SIGKILL)
    restarted = int(t.wait_for(r"^grader: restarted local grader \(pid (\d+)\)").group(1))
    t.wait_for(r"^TIMING step=2 ")                      # the step completed on rank 1's restarted grader
    t.wait_for(r"^checkpoint: .*ckpt_000002\.safetensors")
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.time()
    rc = t.finish(timeout=120)
    took = time.time() - t0
    text = t.text()
    assert rc != 0 and took < 60, text[-3000:]
    # torchrun names the killed rank and its signal; rank 0 did not hang
    assert "SIGKILL" in text and f"{pids[1]}" in text, text[-3000:]
    assert not _alive(pids[0]) and not _alive(pids[1])
    deadline = time.time() + 20
    while any(_alive(g) for g in (graders[0], restarted)) and time.time() < deadline:
        time.sleep(0.5)                                 # graders exit with their parent (--exit-with-parent)
    assert not any(_alive(g) for g in (graders[0], restarted))
    assert ckpt.latest(run).endswith("ckpt_000002.safetensors")

    r = TorchRun(2, "--resume", run)
    assert r.finish() == 0, r.text()
    assert "from step 2" in r.text()
    _, ref, _, ref_rows = ckpt.load(os.path.join(two_ranks["dir"], "ckpt_000004.safetensors"))
    _, got, _, got_rows = ckpt.load(os.path.join(run, "ckpt_000004.safetensors"))
    for k in ("delta", "optim/0/exp_avg", "optim/0/exp_avg_sq", "optim/0/step", "data_order"):
        assert torch.equal(got[k], ref[k]), k
    drop = ("time", "timing")
    assert [{k: v for k, v in row.items() if k not in drop} for row in got_rows] == \
           [{k: v for k, v in row.items() if k not in drop} for row in ref_rows]


def test_extract_cli_on_two_ranks_writes_the_one_rank_file(tmp_path):
    """`torchrun --nproc_per_node 2 -m pgrpo extract`: pairs split across the ranks, rank 0 writes the same
    v_hack (bit for bit) and report as one process does."""
    from pgrpo import vhack
    args = ["extract", "--config", FDR, "--k", "2", "--heldout", "0.2", "--set", "adapter.svd_cache_dir=" + str(tmp_path)]
    one = subprocess.run([sys.executable, "-m", "pgrpo", *args, "--out", str(tmp_path / "v1.safetensors")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", "-m", "pgrpo", *args, "--out", str(tmp_path / "v2.safetensors")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert two.stdout.count("extract: wrote") == 1                       # rank 0 alone writes
    V1, S1, _ = vhack.load_vhack(str(tmp_path / "v1.safetensors"))
    V2, S2, _ = vhack.load_vhack(str(tmp_path / "v2.safetensors"))
    assert list(V1) == list(V2) and all(torch.equal(V1[n], V2[n]) and torch.equal(S1[n], S2[n]) for n in V1)
    r1 = json.load(open(tmp_path / "v1.report.json"))
    r2 = json.load(open(tmp_path / "v2.report.json"))
    assert r1["heldout"] == r2["heldout"] and r1["null"] == r2["null"]


def test_a_stalled_rank_times_out_with_one_error(vpath, tmp_path):
    """Rank 1 is frozen (SIGSTOP) after step 1: rank 0's next collective gives up after dist_timeout_s with one
    sentence instead of hanging, and torchrun stops the job (rank 1 is thawed so it can take torchrun's SIGTERM)."""
    t = TorchRun(2, "--config", FDR, "--out", str(tmp_path / "run"), *_sets(vpath, ["steps=20", "dist_timeout_s=5"]))
    pid1 = int(t.wait_for(r"dist: rank 1/2 pid (\d+)").group(1))
    t.wait_for(r"^TIMING step=1 ")
    os.kill(pid1, signal.SIGSTOP)
    try:
        m = t.wait_for(r"pgrpo train: (rank 0 lost the other ranks .*)", timeout=60)
    finally:
        os.kill(pid1, signal.SIGCONT)
    assert "no answer from the other ranks for 5s (dist_timeout_s)" in m.group(1)
    assert t.finish(timeout=60) != 0
    assert not _alive(pid1)


def test_two_nodes_through_the_c10d_rendezvous(two_ranks, vpath, tmp_path):
    """Multi-node as torchrun does it: two torchrun agents (`--nnodes 2`, one rank each) meet at
    a c10d rendezvous endpoint (here both on this host). Same world size and groups as the 1-node 2-rank run, so
    the same arithmetic: delta_S is bitwise that run's."""
    run = str(tmp_path / "run")
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--max-restarts", "0", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pgrpo-test",
                               "-m", "pgrpo", "train", "--config", FDR, "--out", run, *_sets(vpath)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert sum("checkpoint: " in o for o in outs) == 1                        # only rank 0 wrote
    _, ref, _, _ = ckpt.load(os.path.join(two_ranks["dir"], "ckpt_000004.safetensors"))
    _, got, _, rows = ckpt.load(os.path.join(run, "ckpt_000004.safetensors"))
    assert torch.equal(got["delta"], ref["delta"]) and [r["step"] for r in rows] == [1, 2, 3, 4]
