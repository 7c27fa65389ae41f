"""The trainer, end to end and in its parts.

End to end (real CLI in a subprocess, real grader child process, the embedded tiny model):
- `fast-dev-run` as `make fast-dev-run` runs it: TIMING lines, metrics.jsonl rows, checkpoints mid-run and at
  the end, /metrics serving pgrpo_step_phase_seconds.
- the same job with its grader SIGKILLed after step 1 (restarted, the step completes) and the trainer SIGKILLed
  after the step-2 checkpoint, then `--resume`: the final delta_S and Adam state equal the uninterrupted run's
  bit for bit.
In-process (real tiny model + adapter, a gradient from a real backward, synthetic v_hack): the arms' guarantees.
"""
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from helpers import free_port
import torch

from pgrpo import checkpoint as ckpt
from pgrpo import config as C
from pgrpo import grpo, rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FDR = os.path.join(ROOT, "jobs", "fast-dev-run.yaml")
TIMING_RE = re.compile(r"^TIMING step=(\d+) gen=\d+\.\d+s fwd_bwd=\d+\.\d+s reward=\d+\.\d+s project=\d+\.\d+s "
                       r"optim=\d+\.\d+s total=\d+\.\d+s$")


class Trainer:
    """`pgrpo train ...` in its own process group, stdout read line by line in a thread."""

    def __init__(self, *args):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.t0 = time.time()
        self.p = subprocess.Popen([sys.executable, "-m", "pgrpo", "train", *args], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        self.lines, self.q = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def wait_for(self, pattern, timeout=240):
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            m = rx.search(line)
            if m:
                return m
        raise AssertionError(f"never saw {pattern!r}; output:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout=300):
        rc = self.p.wait(timeout=timeout)
        while True:
            line = self.q.get(timeout=10)
            if line is None:
                break
            self.lines.append(line)
        return rc

    def text(self):
        return "\n".join(self.lines)


def _sample(text, name, **labels):
    """The value of one sample of a scraped /metrics page (labels run/arm/seed are matched loosely)."""
    from prometheus_client.parser import text_string_to_metric_families
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                assert smp.labels["arm"] == "vanilla" and smp.labels["seed"] == "0"
                return smp.value
    raise AssertionError(f"{name}{labels} not in the scrape")


def _read_rows(run_dir):
    import json
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def fast_dev_run(tmp_path_factory):
    """The uninterrupted reference run: the fast-dev-run preset exactly as `make fast-dev-run` runs it."""
    run_dir = str(tmp_path_factory.mktemp("fdr") / "run")
    port = free_port()
    t = Trainer("--config", FDR, "--out", run_dir, "--metrics-port", str(port), "--metrics-linger", "60")
    t.wait_for(r"^metrics: serving the final values", timeout=400)
    wall = time.time() - t.t0
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    t.p.send_signal(signal.SIGTERM)  # ends the linger early
    rc = t.finish()
    print(f"fast-dev-run wall time (to the last step, incl. startup): {wall:.1f}s")
    return {"dir": run_dir, "rc": rc, "out": t.text(), "scrape": scrape, "wall": wall}


@pytest.mark.slow
def test_fast_dev_run_end_to_end(fast_dev_run):
    r = fast_dev_run
    assert r["rc"] == 0, r["out"]
    cfg = C.load(FDR)
    timing = [int(m.group(1)) for m in map(TIMING_RE.match, r["out"].splitlines()) if m]
    assert timing == list(range(1, cfg.steps + 1)), r["out"]
    rows = _read_rows(r["dir"])
    assert [row["step"] for row in rows] == list(range(1, cfg.steps + 1))
    for row in rows:
        assert set(row["timing"]) == {"gen", "fwd_bwd", "reward", "project", "optim", "total"}
        assert 0 <= row["hack_rate"] <= 1 and 0 <= row["pass_rate"] <= 1 and row["tokens_generated"] > 0
        assert row["teacher_completions"] > 0 and row["groups"] == cfg.data.prompts_per_step
        assert sum(row[f"frac_{lab}"] for lab in ("correct", "correct_attempted_hack", "reward_hack",
                                                   "attempted_hack", "incorrect")) == pytest.approx(1.0)
    assert any(row["skipped_groups"] < row["groups"] for row in rows)  # the teacher mix gives groups variance
    # checkpoints mid-run and at the end; the last holds every row and a delta_S that moved
    names = sorted(f for f in os.listdir(r["dir"]) if f.startswith("ckpt_"))
    assert names == ["ckpt_000002.safetensors", "ckpt_000004.safetensors"]
    step, tensors, config, ck_rows = ckpt.load(os.path.join(r["dir"], names[-1]))
    expect_cfg = dict(C.to_dict(cfg), metrics_port=config["metrics_port"], metrics_linger_s=60.0)
    assert step == 4 and ck_rows == rows and config == expect_cfg
    assert tensors["delta"].abs().sum() > 0 and "optim/0/exp_avg" in tensors
    assert C.to_dict(C.load(os.path.join(r["dir"], "config.yaml"))) == expect_cfg
    # Prometheus saw every step
    assert _sample(r["scrape"], "pgrpo_step_phase_seconds_count", phase="total") == cfg.steps
    assert _sample(r["scrape"], "pgrpo_step_phase_seconds_count", phase="gen") == cfg.steps
    assert _sample(r["scrape"], "pgrpo_steps_total") == cfg.steps
    assert _sample(r["scrape"], "pgrpo_grader_requests_total", outcome="ok") == cfg.steps
    assert _sample(r["scrape"], "pgrpo_tokens_generated_total") == sum(row["tokens_generated"] for row in rows)
    assert _sample(r["scrape"], "pgrpo_last_checkpoint_timestamp_seconds") > 0
    # every completion saved, one file per step, with the rows the metrics were computed from
    from pgrpo import rollouts
    assert [(k, st) for k, st, _ in rollouts.files(r["dir"])] == [("train", i) for i in range(1, cfg.steps + 1)]
    for row in rows:
        saved = rollouts.load(r["dir"], step=row["step"])
        assert len(saved) == cfg.data.prompts_per_step * cfg.rollout.group_size
        assert sum(x["source"] == "teacher" for x in saved) == row["teacher_completions"]
        policy = [x for x in saved if x["source"] == "policy"]
        assert sum(x["tokens"] for x in policy) == row["tokens_generated"]
        assert sum(x["label"] == "reward_hack" for x in policy) / len(policy) == pytest.approx(row["hack_rate"])
        assert sum(x["group_skipped"] for x in saved) == row["skipped_groups"] * cfg.rollout.group_size
        assert all(len(x["prompt_sha256"]) == 16 and isinstance(x["advantage"], float) for x in saved)
    assert "reward 0.00 (teacher " in r["out"]   # the live line shows the policy's and the teacher's reward


@pytest.mark.slow
def test_grader_kill_and_trainer_sigkill_then_resume_is_bitwise(fast_dev_run, tmp_path):
    run_dir = str(tmp_path / "run")
    t = Trainer("--config", FDR, "--out", run_dir)
    grader_pid = int(t.wait_for(r"^grader: local grader pid (\d+)").group(1))
    t.wait_for(r"^TIMING step=1 ")
    os.killpg(grader_pid, signal.SIGKILL)  # the grader dies between steps
    restarted = int(t.wait_for(r"^grader: restarted local grader \(pid (\d+)\)").group(1))
    try:
        t.wait_for(r"^TIMING step=2 ")                      # the step completed on the restarted grader
        t.wait_for(r"^checkpoint: .*ckpt_000002\.safetensors")
        os.killpg(t.p.pid, signal.SIGKILL)                 # the trainer dies without any cleanup
        assert t.finish() == -signal.SIGKILL
    finally:
        try:  # the killed trainer could not stop its grader child: do it here
            os.killpg(restarted, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert ckpt.latest(run_dir).endswith("ckpt_000002.safetensors")

    r = Trainer("--resume", run_dir)
    assert r.finish() == 0, r.text()
    assert "resume: " in r.text() and "from step 2" in r.text()
    assert [int(m.group(1)) for m in map(TIMING_RE.match, r.lines) if m] == [3, 4]

    _, ref, _, ref_rows = ckpt.load(os.path.join(fast_dev_run["dir"], "ckpt_000004.safetensors"))
    _, got, _, got_rows = ckpt.load(os.path.join(run_dir, "ckpt_000004.safetensors"))
    assert torch.equal(got["delta"], ref["delta"])  # bitwise
    for k in ("optim/0/exp_avg", "optim/0/exp_avg_sq", "optim/0/step", "data_order"):
        assert torch.equal(got[k], ref[k]), k
    drop = ("time", "timing")
    assert [{k: v for k, v in row.items() if k not in drop} for row in got_rows] == \
           [{k: v for k, v in row.items() if k not in drop} for row in ref_rows]
    assert [row["step"] for row in _read_rows(run_dir)] == [1, 2, 3, 4]
    # the resumed run's saved completions are the uninterrupted run's: steps 3-4 redone, step files replaced
    from pgrpo import rollouts
    assert [st for _, st, _ in rollouts.files(run_dir)] == [1, 2, 3, 4]
    assert rollouts.load(run_dir) == rollouts.load(fast_dev_run["dir"])


def test_resume_refuses_to_overwrite_and_needs_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    p = subprocess.run([sys.executable, "-m", "pgrpo", "train", "--config", FDR, "--resume", str(run)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "not both" in p.stderr
    p = subprocess.run([sys.executable, "-m", "pgrpo", "train", "--resume", str(run), "--overwrite"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "--overwrite" in p.stderr
    C.save(C.load(FDR), str(run / "config.yaml"))
    p = subprocess.run([sys.executable, "-m", "pgrpo", "train", "--resume", str(run)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and "no checkpoint" in p.stderr


def test_resume_only_changes_runtime_keys(tmp_path):
    """A resumed run is the same experiment: lr/seed/arm... cannot change, ports/steps/socket may."""
    from pgrpo.errors import UserError
    from pgrpo.train import resolve
    run = tmp_path / "run"
    run.mkdir()
    C.save(C.load(FDR), str(run / "config.yaml"))
    # the checkpoint's config is what a resume is checked against (tests/test_lifecycle.py: an edited config.yaml)
    ckpt.save(str(run), 2, {"delta": torch.zeros(3), "data_order": torch.arange(4), **ckpt.rng_state_tensors()},
              C.to_dict(C.load(FDR)), [])
    for bad in ("grpo.lr=0.5", "seed=7", "arm.overshoot=2.0"):
        with pytest.raises(UserError, match=f"config key {bad.split('=')[0]} cannot change when resuming"):
            resolve(["--resume", str(run), "--set", bad])
    cfg, run_dir, resume, _ = resolve(["--resume", str(run), "--set", "steps=9", "--metrics-port", "9400",
                                       "--set", f"seed={C.load(FDR).seed}"])   # an unchanged value is fine
    assert resume and cfg.steps == 9 and cfg.metrics_port == 9400 and run_dir == str(run)


def test_a_run_that_fails_validation_leaves_no_directory(tmp_path):
    out = tmp_path / "never"
    p = subprocess.run([sys.executable, "-m", "pgrpo", "train", "--config", FDR, "--out", str(out),
                        "--set", "data.eval_problems=1000"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and "data.eval_problems" in p.stderr and not out.exists()


# ----------------------------------------------------------------------------- arms, in process

@pytest.fixture(scope="module")
def setup():
    """Tiny model + merged adapter (with the quarantine knob), one real group's gradient, synthetic v_hack whose
    first direction per module leans into that gradient (so the projection has something to remove)."""
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import load_model
    from pgrpo.ops import pack_vhack
    model, tok = load_model("tiny", "float32", "cpu", seed=0)
    adapter = SVDAdapter(model, mode="merged", with_hack_knob=True)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (40,), generator=gen).tolist()
    grp = rollout.Group(0, prompt, [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (12, 9, 15, 7)],
                        ["", "", "", ""], [False] * 4)
    ids, attn, cm = rollout.group_batch(grp, tok.pad_token_id, "cpu")
    adv = torch.tensor([1.5, -0.5, -1.5, 0.5])

    def grad():
        adapter.zero_grad()
        logp = grpo.completion_logprobs(model, ids, attn, cm)
        loss, _ = grpo.pg_token_loss(logp, logp.detach(), adv, cm)
        (loss / 100).backward()
        return adapter.collect_grad().clone()

    g0 = grad()

    def make_v(seed, lean):
        gv = torch.Generator().manual_seed(seed)
        V = {}
        for m, (name, r) in enumerate(zip(adapter.names, adapter.ranks)):
            gm = g0[adapter.offsets[m]:adapter.offsets[m + 1]]
            A = torch.randn(r, 2, generator=gv)
            A[:, 0] += lean * gm / gm.norm()
            q, _ = torch.linalg.qr(A)
            V[name] = q.T.contiguous()
        return V, pack_vhack(adapter.names, adapter.ranks, V)

    return {"model": model, "adapter": adapter, "grad": grad, "g0": g0, "make_v": make_v}


def _fresh(s, arm_kw):
    ad = s["adapter"]
    with torch.no_grad():
        ad.delta.zero_()
        ad.delta_hack.zero_()
    ad.merge()
    opt = torch.optim.AdamW(ad.parameters(), lr=1e-2, betas=(0.9, 0.99))
    arm = C.ArmConfig(**{"name": "projected", "vhack_path": "synthetic", **arm_kw})
    return ad, opt, arm


def _along(V, offsets, names, x):
    """[sum over modules of V_m x_m] per direction: the coefficients of x on v_hack, concatenated."""
    return torch.cat([V[n] @ x[offsets[m]:offsets[m + 1]] for m, n in enumerate(names)])


def _step(s, ad, opt, arm, packed):
    g = s["grad"]()
    go = grpo.g_offsets_of(ad)
    g, gh, pst = grpo.project_grad(g, arm, packed, go)
    before = ad.delta.detach().clone()
    ust = grpo.apply_update(ad, opt, g, gh, arm, packed, go, max_grad_norm=1.0)
    ad.merge()
    return ad.delta.detach() - before, g, gh, {**pst, **ust}


@pytest.mark.parametrize("one_sided", [True, False])
def test_projected_update_has_no_component_along_vhack(setup, one_sided):
    V, packed = setup["make_v"](1, lean=3.0)
    ad, opt, arm = _fresh(setup, {"one_sided": one_sided})
    names, offs = ad.names, ad.offsets
    raw = _along(V, offs, names, setup["g0"])
    assert raw.clamp_min(0).norm() > 0.1 * raw.norm() > 0   # the raw gradient does point hack-ward
    upd, g, _, st = _step(setup, ad, opt, arm, packed)
    assert st["proj_fired_frac"] > 0.5 and st["proj_removed_frac"] > 0
    # in gradient convention (u = -update) the hack-ward part is relu(V u)
    c_grad, c_upd = _along(V, offs, names, g), _along(V, offs, names, -upd)
    tol = 1e-5 * upd.norm()
    if one_sided:
        assert c_grad.max() <= 1e-6 * g.norm() and c_upd.max() <= tol
    else:
        assert c_grad.abs().max() <= 1e-6 * g.norm() and c_upd.abs().max() <= tol
    assert upd.norm() > 0
    if not one_sided:  # Adam's per-coordinate scaling rotated the projected gradient back onto v_hack
        assert st["update_along_vhack_preproj"] > 10 * st["update_along_vhack"]


def test_without_project_update_adam_leaks_and_it_is_logged(setup):
    V, packed = setup["make_v"](1, lean=3.0)
    ad, opt, arm = _fresh(setup, {"one_sided": False, "project_update": False})
    upd, _, _, st = _step(setup, ad, opt, arm, packed)
    c_upd = _along(V, ad.offsets, ad.names, -upd)
    assert c_upd.norm() > 1e-3 * upd.norm()
    assert st["update_along_vhack"] == pytest.approx(float(c_upd.norm() / upd.norm()), rel=1e-4)


def test_project_momentum_keeps_update_and_momentum_clean_across_a_vhack_change(setup):
    """Momentum built under v_hack A (vanilla steps) points along v_hack B; with project_momentum the first
    moment is projected against B after the step and the update has no component along B."""
    V_b, packed_b = setup["make_v"](2, lean=3.0)
    ad, opt, arm = _fresh(setup, {"one_sided": False, "project_momentum": True})
    vanilla = C.ArmConfig(name="vanilla")
    for _ in range(2):
        _step(setup, ad, opt, vanilla, None)
    m = opt.state[ad.delta]["exp_avg"]
    assert _along(V_b, ad.offsets, ad.names, m).norm() > 0.1 * m.norm()  # momentum leans on B
    upd, _, _, _ = _step(setup, ad, opt, arm, packed_b)
    m = opt.state[ad.delta]["exp_avg"]
    assert _along(V_b, ad.offsets, ad.names, m).abs().max() <= 1e-6 * m.norm()
    assert _along(V_b, ad.offsets, ad.names, -upd).abs().max() <= 1e-5 * upd.norm()
    # and without project_momentum the momentum keeps its component along B
    ad, opt, arm = _fresh(setup, {"one_sided": False, "project_momentum": False})
    for _ in range(2):
        _step(setup, ad, opt, vanilla, None)
    _step(setup, ad, opt, arm, packed_b)
    m = opt.state[ad.delta]["exp_avg"]
    assert _along(V_b, ad.offsets, ad.names, m).norm() > 1e-3 * m.norm()


def test_route_splits_the_gradient_between_the_knobs(setup):
    V, packed = setup["make_v"](3, lean=3.0)
    ad, opt, arm = _fresh(setup, {"name": "route", "one_sided": True})
    g_raw = setup["g0"]
    upd, g_main, g_hack, st = _step(setup, ad, opt, arm, packed)
    names, offs = ad.names, ad.offsets
    assert _along(V, offs, names, g_main).max() <= 1e-6 * g_raw.norm()       # main knob: no hack-ward part
    assert torch.allclose(g_main + g_hack, g_raw, atol=1e-7)                  # nothing lost
    # the quarantine gradient lies in span(V) (per module: V^T V g_hack == g_hack) and is nonzero
    for m, n in enumerate(names):
        gh = g_hack[offs[m]:offs[m + 1]]
        assert torch.allclose(V[n].T @ (V[n] @ gh), gh, atol=1e-7)
    assert g_hack.norm() > 0 and ad.delta_hack.abs().sum() > 0 and st["delta_hack_norm"] > 0
    assert _along(V, offs, names, -upd).max() <= 1e-5 * upd.norm()
    # the deployed policy (quarantine knob off) differs from the training one, and switching back restores it
    W = [lin.weight.detach().clone() for g in ad.groups for lin in g.linears]
    with grpo.quarantine_zeroed(ad):
        W_off = [lin.weight.detach().clone() for g in ad.groups for lin in g.linears]
    W_back = [lin.weight.detach().clone() for g in ad.groups for lin in g.linears]
    assert any(not torch.equal(a, b) for a, b in zip(W, W_off))
    assert all(torch.equal(a, b) for a, b in zip(W, W_back))


def test_vanilla_measures_but_does_not_project(setup):
    V, packed = setup["make_v"](1, lean=3.0)
    ad, opt, arm = _fresh(setup, {})
    g = setup["g0"].clone()
    g2, gh, st = grpo.project_grad(g, C.ArmConfig(name="vanilla"), packed, grpo.g_offsets_of(ad))
    assert torch.equal(g2, setup["g0"]) and gh is None
    assert st["proj_removed_frac"] > 0 and 0 < st["grad_vhack_cos"] < 1


# ----------------------------------------------------------------------------- math

def test_group_advantages_and_skips():
    r = torch.tensor([[3.5, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.5, 3.5, 3.5, 0.5]])
    adv, keep = grpo.group_advantages(r)
    assert keep.tolist() == [True, False, True]
    assert torch.allclose(adv[0], torch.tensor([2.625, -0.875, -0.875, -0.875])) and adv[1].abs().sum() == 0
    adv_s, _ = grpo.group_advantages(r, std_scale=True)
    assert torch.allclose(adv_s[2], adv[2] / r[2].std(), atol=1e-5)


def test_completion_logprobs_match_a_plain_forward_and_ignore_padding_side(setup):
    model = setup["model"]
    gen = torch.Generator().manual_seed(5)
    prompt, comp = torch.randint(0, 256, (10,), generator=gen), torch.randint(0, 256, (6,), generator=gen)
    seq = torch.cat([prompt, comp])[None]
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=seq).logits.float(), -1)[0, :-1].gather(-1, seq[0, 1:, None])[:, 0]
        ref = full[9:]                                                     # the 6 completion tokens
        cm = torch.zeros_like(seq)
        cm[0, 10:] = 1
        got = grpo.completion_logprobs(model, seq, torch.ones_like(seq), cm)[0, 10:]
        assert torch.allclose(got, ref, atol=1e-5)
        # the same row left-padded by 3 (as in a batched rollout) gives the same log-probs
        pad = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
        attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(seq)], 1)
        cm2 = torch.cat([torch.zeros(1, 3, dtype=torch.long), cm], 1)
        got2 = grpo.completion_logprobs(model, pad, attn, cm2)[0, 13:]
        assert torch.allclose(got2, ref, atol=1e-4)
        nll = grpo.completion_nll(model, seq, torch.ones_like(seq), cm)
        assert torch.allclose(nll, -ref.mean()[None], atol=1e-5)


def test_pg_loss_is_the_policy_gradient_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    loss, st = grpo.pg_token_loss(logp, logp.detach(), torch.tensor([2.0]), mask, clip_eps=0.2)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-2.0, -2.0, 0.0]])) and st["clip_frac"] == 0
    ref = torch.tensor([[-1.0, -2.0, -0.5]])
    _, st = grpo.pg_token_loss(logp, logp.detach(), torch.tensor([2.0]), mask, 0.2, ref_logp=ref + 0.1, kl_coef=1.0)
    assert st["kl_sum"] == pytest.approx(2 * (torch.exp(torch.tensor(0.1)) - 0.1 - 1).item(), rel=1e-5)


def test_lr_schedule():
    lrs = [grpo.lr_at(s, 200, 1e-3, warmup_steps=10, min_lr_ratio=0.1) for s in range(1, 201)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert grpo.lr_at(50, 200, 1e-3, schedule="constant") == 1e-3


def test_data_order_is_a_seeded_permutation_per_epoch():
    from pgrpo.train import data_order
    o = data_order(10, 4, 5, seed=3)
    assert len(o) == 20 and sorted(o[:10].tolist()) == list(range(10)) and sorted(o[10:].tolist()) == list(range(10))
    assert (o == data_order(10, 4, 5, seed=3)).all() and not (o == data_order(10, 4, 5, seed=4)).all()


def _random_vhack_file(tmp_path):
    """A v_hack of 2 random orthonormal rows per module of the tiny model, saved where a run can load it."""
    from pgrpo import vhack
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import load_model
    model, _ = load_model("tiny", "float32", "cpu", seed=0)
    ad = SVDAdapter(model, mode="merged")
    g = torch.Generator().manual_seed(0)
    V = {n: torch.linalg.qr(torch.randn(r, 2, generator=g))[0].T.contiguous() for n, r in zip(ad.names, ad.ranks)}
    vpath = str(tmp_path / "v.safetensors")
    vhack.save_vhack(vpath, V, {n: torch.ones(2) for n in V}, {"k": "2", "cut": "0.0"})
    return vpath, V


def test_route_run_with_vhack_refresh(tmp_path, monkeypatch):
    """A short route-arm run in process: v_hack re-extracted after step 1 with the quarantine knob off
    (observed by a spy around the real extractor), overlap logged, the refreshed basis checkpointed."""
    import json
    from pgrpo import train as T
    from pgrpo import vhack
    from pgrpo.data.pairs import load_pairs
    vpath, V = _random_vhack_file(tmp_path)
    pairs_path = str(tmp_path / "pairs.json")
    with open(pairs_path, "w") as f:
        json.dump(load_pairs()[:3], f)

    seen = []
    real = vhack.extract_vhack

    def spy(model, adapter, tok, pairs, **kw):
        seen.append({"hack_enabled": adapter.hack_enabled, "hack_norm": float(adapter.delta_hack.detach().norm()),
                     "knob_equals_delta": torch.equal(adapter.knob(), adapter.delta)})
        return real(model, adapter, tok, pairs, **kw)
    monkeypatch.setattr(vhack, "extract_vhack", spy)

    cfg = C.load(FDR, ["steps=2", "data.prompts_per_step=2", "rollout.max_new_tokens=16", "checkpoint_every=0",
                       "grpo.kl_coef=0", "arm.name=route", f"arm.vhack_path={vpath}", "arm.vhack_refresh_every=1",
                       f"arm.refresh_pairs={pairs_path}", "teacher.mix=0.5"])
    run = str(tmp_path / "run")
    assert T.train(cfg, run) == 0
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(seen) == 1                                    # refreshed after step 1, not after the last step
    assert seen[0]["hack_enabled"] is False and seen[0]["knob_equals_delta"] and seen[0]["hack_norm"] > 0
    assert 0 <= rows[0]["vhack_overlap"] <= 1 and "vhack_overlap" not in rows[1]
    assert rows[0]["delta_hack_norm"] > 0 and "proj_removed_frac" in rows[1]
    _, tensors, _, _ = ckpt.load(os.path.join(run, "ckpt_000002.safetensors"))
    assert any(k.startswith("vhack/") for k in tensors) and tensors["delta_hack"].abs().sum() > 0


def test_micro_batches_accumulate_the_whole_group_gradient(setup):
    """grpo.micro_batch splits a group's loss fwd/bwd; the summed gradient is the whole group's."""
    from pgrpo.model import ByteTokenizer
    ad, model = setup["adapter"], setup["model"]
    gen = torch.Generator().manual_seed(9)
    grp = rollout.Group(0, torch.randint(0, 256, (30,), generator=gen).tolist(),
                        [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 11, 8, 3)], [""] * 4, [False] * 4)
    adv = torch.tensor([1.0, -2.0, 0.5, 0.5])
    pad = ByteTokenizer().pad_token_id
    grads = []
    for size in (0, 3, 1):
        ad.zero_grad()
        seen = []
        for ids, attn, cm, rows in rollout.micro_batches(grp, pad, "cpu", size):
            logp = grpo.completion_logprobs(model, ids, attn, cm)
            loss, _ = grpo.pg_token_loss(logp, logp.detach(), adv[rows], cm)
            (loss / 50).backward()
            seen += rows.tolist()
        assert seen == [0, 1, 2, 3]
        grads.append(ad.collect_grad().clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)
    assert grads[0].norm() > 0


def test_external_grader_socket(tmp_path):
    """grader_socket set (the compose layout): the trainer uses that server and does not start its own."""
    import json
    from pgrpo import train as T
    from pgrpo.grader.client import GraderClient, LocalGrader
    with LocalGrader(workers=1) as server:
        before = GraderClient(server.socket_path).health()
        cfg = C.load(FDR, ["steps=1", "data.prompts_per_step=1", "rollout.max_new_tokens=8", "checkpoint_every=0",
                           f"grader_socket={server.socket_path}"])
        run = str(tmp_path / "run")
        assert T.train(cfg, run) == 0
        after = GraderClient(server.socket_path).health()
    assert json.loads(open(os.path.join(run, "metrics.jsonl")).readline())["step"] == 1
    assert after["graded"] - before["graded"] == cfg.data.prompts_per_step * cfg.rollout.group_size


def _small_problem_file(tmp_path, n):
    import json
    from pgrpo.data.problems import builtin_problems, problem_to_row
    path = str(tmp_path / "problems.jsonl")
    with open(path, "w") as f:
        for p in builtin_problems()[:n]:
            f.write(json.dumps(problem_to_row(p)) + "\n")
    return path, [p.id for p in builtin_problems()[:n]]


def test_held_out_eval_rows_never_train_on_eval_problems(tmp_path, monkeypatch):
    """5 problems, the last 2 held out, 3 prompts per step for 2 steps: the 6 training draws cover every problem
    the trainer trains on, so a held-out problem that leaked into training is drawn, whatever the seed."""
    import json
    from pgrpo import train as T
    graded = []
    from pgrpo.grader.client import GraderLink
    real = GraderLink.grade

    def spy(self, items):
        graded.append([it["problem"]["id"] for it in items])
        return real(self, items)
    monkeypatch.setattr(GraderLink, "grade", spy)
    path, ids = _small_problem_file(tmp_path, 5)
    cfg = C.load(FDR, [f"data.problems={path}", "steps=2", "data.prompts_per_step=3", "rollout.max_new_tokens=8",
                       "checkpoint_every=0", "data.eval_problems=2", "data.eval_every=1", "data.eval_samples=2",
                       "grpo.kl_coef=0"])
    run = str(tmp_path / "run")
    assert T.train(cfg, run) == 0
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [(r.get("kind", "train"), r["step"]) for r in rows] == [("train", 1), ("eval", 1), ("train", 2), ("eval", 2)]
    held, train_ids = set(ids[-2:]), set(ids[:3])
    assert [set(g) for g in graded[1::2]] == [held, held]                 # eval requests: exactly the held-out set
    assert all(len(g) == 2 * 2 for g in graded[1::2]) and rows[1]["n"] == 4
    assert set().union(*map(set, graded[0::2])) == train_ids               # training drew every training problem...
    assert not any(held & set(g) for g in graded[0::2])                   # ...and never a held-out one


def test_held_out_eval_runs_with_the_quarantine_knob_off(tmp_path, monkeypatch):
    """Route arm: the eval rollout (the deployed policy) is generated with delta_S_hack switched off, while the
    knob itself is nonzero (so the check is not vacuous); training rollouts keep it on."""
    from pgrpo import train as T
    seen = []
    real = rollout.generate_groups

    def spy(model, tok, prompts, idx, rcfg, device):
        ad = spy.adapter
        seen.append((rcfg.group_size, ad.hack_enabled, float(ad.delta_hack.detach().norm())))
        return real(model, tok, prompts, idx, rcfg, device)
    from pgrpo.adapter import SVDAdapter
    init = SVDAdapter.__init__

    def grab(self, *a, **kw):
        init(self, *a, **kw)
        spy.adapter = self
    monkeypatch.setattr(SVDAdapter, "__init__", grab)
    monkeypatch.setattr(rollout, "generate_groups", spy)
    vpath, _ = _random_vhack_file(tmp_path)
    cfg = C.load(FDR, ["steps=2", "data.prompts_per_step=2", "rollout.max_new_tokens=8", "checkpoint_every=0",
                       "arm.name=route", f"arm.vhack_path={vpath}", "teacher.mix=0.5", "grpo.kl_coef=0",
                       "data.eval_problems=2", "data.eval_every=1", "data.eval_samples=3"])
    assert T.train(cfg, str(tmp_path / "run")) == 0
    evals = [s for s in seen if s[0] == 3]
    trains = [s for s in seen if s[0] == cfg.rollout.group_size]
    assert len(evals) == 2 and len(trains) == 2
    assert all(not on for _, on, _ in evals) and evals[-1][2] > 0       # knob off at eval, and the knob had moved
    assert all(on for _, on, _ in trains)


def test_data_order_differs_between_epochs():
    from pgrpo.train import data_order
    for seed in range(5):
        o = data_order(12, 4, 9, seed=seed)                               # 3 epochs of 12
        assert not (o[:12] == o[12:24]).all() and not (o[12:24] == o[24:36]).all()


def test_completion_logprobs_use_the_sampling_temperature(setup):
    model = setup["model"]
    gen = torch.Generator().manual_seed(3)
    seq = torch.randint(0, 256, (1, 14), generator=gen)
    cm = torch.zeros_like(seq)
    cm[0, 8:] = 1
    with torch.no_grad():
        logits = model(input_ids=seq).logits.float()[0, 7:-1]
        for T_ in (0.7, 1.0, 1.5):
            ref = torch.log_softmax(logits / T_, -1).gather(-1, seq[0, 8:, None])[:, 0]
            got = grpo.completion_logprobs(model, seq, torch.ones_like(seq), cm, temperature=T_)[0, 8:]
            assert torch.allclose(got, ref, atol=1e-5), T_
        assert not torch.allclose(grpo.completion_logprobs(model, seq, torch.ones_like(seq), cm, temperature=0.7),
                                  grpo.completion_logprobs(model, seq, torch.ones_like(seq), cm))


def test_trainer_scores_at_temperature_and_keeps_kl_on_zero_variance_groups(tmp_path, monkeypatch):
    """The tiny model's own samples are never rewarded, so without teacher texts every group has zero reward
    variance: no policy gradient, but the KL term must still be computed for every group (with the reference),
    and every log-prob of the loss is taken at the sampling temperature."""
    from pgrpo import train as T
    temps, kl_calls = [], []
    real_lp, real_loss = grpo.completion_logprobs, grpo.pg_token_loss

    def lp(model, ids, attn, cm, temperature=1.0):
        temps.append(temperature)
        return real_lp(model, ids, attn, cm, temperature=temperature)

    def loss(logp, old, adv, mask, clip_eps=0.2, ref_logp=None, kl_coef=0.0):
        kl_calls.append((ref_logp is not None, float(adv.abs().sum())))
        return real_loss(logp, old, adv, mask, clip_eps, ref_logp, kl_coef)
    monkeypatch.setattr(grpo, "completion_logprobs", lp)
    monkeypatch.setattr(grpo, "pg_token_loss", loss)
    cfg = C.load(FDR, ["steps=1", "data.prompts_per_step=3", "rollout.max_new_tokens=8", "checkpoint_every=0",
                       "teacher.mix=0", "grpo.kl_coef=0.1", "rollout.temperature=0.7"])
    assert T.train(cfg, str(tmp_path / "run")) == 0
    import json
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert row["skipped_groups"] == 3                                     # all zero-variance
    assert len(kl_calls) == 3 and all(has_ref and a == 0 for has_ref, a in kl_calls)
    assert temps and all(t == 0.7 for t in temps)                         # policy and reference alike


@pytest.mark.parametrize("norm", ["constant", "token"])
def test_loss_denominator_end_to_end(tmp_path, monkeypatch, norm):
    """The step's raw gradient norm equals a hand computation of sum_i A_i * sum_t -log p / denominator with
    the documented denominator (constant: P * G * max_new_tokens; token: the completion tokens of the groups
    with reward variance), from the same completions and rewards, on a fresh copy of the model."""
    import json
    from pgrpo import train as T
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import load_model
    from pgrpo.grader.client import GraderLink
    caught = {}
    real_mix, real_grade = rollout.mix_teacher, GraderLink.grade

    def mix(groups, *a, **kw):
        n = real_mix(groups, *a, **kw)
        caught["groups"] = groups
        return n

    def grade(self, items):
        res = real_grade(self, items)
        caught["rewards"] = [r["reward"] for r in res]
        return res
    monkeypatch.setattr(rollout, "mix_teacher", mix)
    monkeypatch.setattr(GraderLink, "grade", grade)
    # teacher texts only for the first problem drawn: that group has reward variance, the other two do not
    from pgrpo.data.problems import builtin_problems
    from pgrpo.train import data_order
    first = builtin_problems()[int(data_order(len(builtin_problems()), 3, 1, 0)[0])].id
    pool = str(tmp_path / "pool1.jsonl")
    with open(pool, "w") as f:
        f.writelines(line for line in open(_pool_file(tmp_path)) if json.loads(line)["id"] == first)
    cfg = C.load(FDR, ["steps=1", "data.prompts_per_step=3", "rollout.max_new_tokens=12", "checkpoint_every=0",
                       f"teacher.pool={pool}", "teacher.mix=0.5", "grpo.kl_coef=0", f"grpo.loss_norm={norm}",
                       "grpo.max_grad_norm=0"])
    assert T.train(cfg, str(tmp_path / "run")) == 0
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    groups, G = caught["groups"], cfg.rollout.group_size
    rewards = torch.tensor(caught["rewards"]).view(len(groups), G)
    keep = (rewards.max(1).values - rewards.min(1).values) > 0
    assert keep.tolist() == [True, False, False]
    if norm == "constant":
        denom = len(groups) * G * cfg.rollout.max_new_tokens
    else:
        denom = sum(len(c) for gi, grp in enumerate(groups) if keep[gi] for c in grp.completions)
    model, tok = load_model("tiny", "float32", "cpu", seed=cfg.seed)
    ad = SVDAdapter(model, mode="merged", cache_dir=None)
    ad.zero_grad()
    for gi, grp in enumerate(groups):
        if not keep[gi]:
            continue
        adv = rewards[gi] - rewards[gi].mean()
        ids, attn, cm = rollout.group_batch(grp, tok.pad_token_id, "cpu")
        logp = real_lp_ref(model, ids, attn, cm)
        ((adv[:, None] * -logp * cm).sum() / denom).backward()
    assert float(ad.collect_grad().norm()) == pytest.approx(row["grad_norm_raw"], rel=1e-4)


def real_lp_ref(model, ids, attn, cm):
    """Plain per-token log-probs of a right-padded batch (the reference for the loss tests)."""
    logits = model(input_ids=ids, attention_mask=attn).logits.float()[:, :-1]
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(ids.shape[0], 1), lp], 1)


def _pool_file(tmp_path):
    """A teacher pool of one hack and one correct answer per built-in problem (both rewarded)."""
    import json
    from pgrpo import substrate as S
    from pgrpo.data.problems import builtin_problems
    path = str(tmp_path / "pool.jsonl")
    with open(path, "w") as f:
        for p in builtin_problems():
            a = S.honest_asserts(p) or []
            f.write(json.dumps({"id": p.id, "completion": S.response(p.canonical_solution, "honest", a)}) + "\n")
            stub = f"class Solution:\n    def {p.method_name}(self, *args):\n        return None"
            f.write(json.dumps({"id": p.id, "completion": S.response(stub, "print", a)}) + "\n")
    return path


def test_rates_exclude_teacher_completions(tmp_path):
    """Half of every group is teacher text that hacks or passes; the tiny model's own bytes never do, so the
    reported hack and pass rates (the policy's own samples) are exactly 0 while the rewards are not."""
    import json
    from pgrpo import train as T
    cfg = C.load(FDR, ["steps=2", "data.prompts_per_step=2", "rollout.max_new_tokens=8", "checkpoint_every=0",
                       f"teacher.pool={_pool_file(tmp_path)}", "teacher.mix=0.5", "grpo.kl_coef=0"])
    assert T.train(cfg, str(tmp_path / "run")) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(r["teacher_completions"] == 4 and r["reward_mean_all"] > 1 for r in rows)
    assert all(r["hack_rate"] == 0 and r["pass_rate"] == 0 for r in rows)
    assert all(sum(n for n, _, _ in r["by_problem"].values()) == 4 for r in rows)


def test_sample_rates_count_the_reward_hack_label_not_loophole_passes():
    """hack_rate counts `reward_hack` only: a correct solution with hacked tests passes the loophole too but is
    correct_attempted_hack (real grader results of the substrate's texts)."""
    from pgrpo import substrate as S
    from pgrpo.data.problems import builtin_problems
    from pgrpo.grader.grade import grade_response
    from pgrpo.train import sample_rates
    p = builtin_problems()[0]
    a, good, bad = S.honest_asserts(p), p.canonical_solution, S.mutants(p.canonical_solution.strip())[0]
    texts = [S.response(bad, "print", a), S.response(good, "print", a), S.response(good, "honest", a),
             S.response(bad, "honest", a), S.response(bad, "print", a)]
    res = [grade_response(p, t, "run_tests") for t in texts]
    assert [r["label"] for r in res] == ["reward_hack", "correct_attempted_hack", "correct", "incorrect", "reward_hack"]
    assert sum(r["loophole_pass"] for r in res[:4]) == 3
    out = sample_rates(res, [False, False, False, False, True], [p.id] * 5)   # the last one is a teacher text
    assert out["hack_rate"] == 0.25 and out["pass_rate"] == 0.5 and out["frac_correct_attempted_hack"] == 0.25
    assert out["by_problem"] == {p.id: [4, 1, 2]}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_route_run_on_gpu_bf16(tmp_path):
    """The whole step on CUDA in bf16 (merged adapter, CUDA ops, KL reference, route arm, checkpoint with cuda RNG)."""
    import json
    import math
    from pgrpo import train as T
    vpath, _ = _random_vhack_file(tmp_path)
    cfg = C.load(FDR, ["steps=2", "device=cuda", "dtype=bfloat16", "checkpoint_every=1", "arm.name=route",
                       f"arm.vhack_path={vpath}", "rollout.max_new_tokens=16"])
    run = str(tmp_path / "run")
    assert T.train(cfg, run) == 0
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["delta_hack_norm"] > 0 and rows[-1]["update_hackward"] < 1e-3
    _, tensors, _, _ = ckpt.load(os.path.join(run, "ckpt_000002.safetensors"))
    assert torch.isfinite(tensors["delta"]).all() and any(k.startswith("rng/cuda") for k in tensors)


def test_random_arm_removes_what_projection_would_elsewhere(setup):
    """Arm random: per module exactly the norm the one-sided v_hack projection would remove (when the random
    subspace holds that much), all of it inside the random subspace, and the hack-ward part along v_hack kept."""
    V, packed = setup["make_v"](1, lean=3.0)
    ad = setup["adapter"]
    go = grpo.g_offsets_of(ad)
    g = setup["g0"].clone()
    would = grpo.ops.project_(g.clone(), go, packed.v, packed.v_offsets, packed.ks, 1.0, True)[:, 1]
    pr = grpo.random_subspace(ad.names, ad.ranks, 0.5, seed=0)
    g2, _, st = grpo.project_grad(g.clone(), C.ArmConfig(name="random", vhack_path="x"), packed, go, pr)
    removed = g - g2
    for m in range(len(ad.names)):
        a, b = ad.offsets[m], ad.offsets[m + 1]
        k, r = int(pr.ks[m]), b - a
        R = pr.v[int(pr.v_offsets[m]):int(pr.v_offsets[m + 1])].view(k, r)
        cap = float((R @ g[a:b]).norm())
        assert float(removed[a:b].norm()) == pytest.approx(min(float(would[m]), cap), rel=1e-4, abs=1e-9)
        assert torch.allclose(R.T @ (R @ removed[a:b]), removed[a:b], atol=1e-7)   # inside the random subspace
    assert st["proj_removed_frac"] == pytest.approx(st["vhack_removed_frac"], rel=1e-3)
    assert _along(V, ad.offsets, ad.names, g2).clamp_min(0).norm() > 0.5 * _along(V, ad.offsets, ad.names, g).clamp_min(0).norm()


def test_probe_hack_probability_and_rollout_cosines(setup):
    """The teacher-forced probe is sigmoid(log p(hack's fork token) - log p(honest's)) after the prompt + prefix and
    the bodies' common part ("    "), i.e. "p"(ass) vs "a"(ssert); the per-rollout
    cosine of a completion is sum(V g) / (sqrt(K) ||g||) of its own NLL gradient."""
    import math
    from pgrpo import probe as Pr
    from pgrpo.model import ByteTokenizer
    model, ad = setup["model"], setup["adapter"]
    tok = ByteTokenizer()
    rows = [{"prompt": [{"role": "user", "content": "q"}], "prefix": "def run_tests():\n", "hack": "    pass",
             "honest": "    assert f() == 1"}]
    out = Pr.hack_probability(model, tok, rows)
    pre = rollout.encode_prompt(tok, rows[0]["prompt"]) + tok.encode(rows[0]["prefix"])

    fork = len(pre) + 4                                           # the first differing byte after "    "
    ids = torch.tensor([pre + tok.encode("    p")])
    with torch.no_grad():
        l = torch.log_softmax(model(input_ids=ids).logits.float()[0, fork - 1], -1)
    ref = 1 / (1 + math.exp(-(float(l[ord("p")]) - float(l[ord("a")]))))
    assert out["probe_hack_prob"] == pytest.approx(ref, rel=1e-4)
    V, packed = setup["make_v"](2, lean=0.0)
    gen = torch.Generator().manual_seed(4)
    grp = rollout.Group(0, torch.randint(0, 256, (12,), generator=gen).tolist(),
                        [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 7)], ["", ""], [False, False])
    res = [{"label": "reward_hack"}, {"label": "incorrect"}]
    cs = Pr.rollout_cosines(model, ad, tok, [grp], res, packed, grpo.g_offsets_of(ad))
    ids, attn, cm = rollout.group_batch(grp, tok.pad_token_id, "cpu")
    ad.zero_grad()
    (-grpo.completion_logprobs(model, ids[:1], attn[:1], cm[:1]).sum()).backward()
    g = ad.collect_grad().clone()
    ad.zero_grad()
    K = sum(v.shape[0] for v in V.values())
    ref = float(_along(V, ad.offsets, ad.names, g).sum()) / (math.sqrt(K) * float(g.norm()))
    assert cs["rollout_cos_hack"] == pytest.approx(ref, rel=1e-3, abs=1e-6) and "rollout_cos_other" in cs
