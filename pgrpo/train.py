"""`pgrpo train`: the GRPO step loop, top to bottom in one function (`train`).

    config -> model + tokenizer -> SVD adapter -> problems + prompts -> grader -> for each step:
      sample prompts -> rollout (merged weights, KV cache) -> grade over the socket -> group advantages
      -> loss fwd/bwd one group at a time -> collect delta_S grad (basis change) -> arm (projection)
      -> clip + AdamW -> re-merge -> metrics row + TIMING line -> checkpoint -> (optional v_hack refresh)

Determinism: generation is seeded per generate call from (seed, step, global group index), the data order is a
seeded permutation stored in the checkpoint, and the grader is deterministic, so a run killed and resumed reaches
the same delta_S as an uninterrupted one (bitwise on CPU; tests/test_train.py checks it).

Data parallelism (`torchrun --nproc_per_node N -m pgrpo train`, pgrpo/dist.py): each rank takes its share of the
step's groups; `comm.exchange` gives every rank the whole step's groups and results, `comm.reduce_grad` sums the
delta_S gradient before the arm; rank 0 alone writes. On one process every `comm` call is an identity.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import sys
import time

import numpy as np
import torch

from pgrpo import checkpoint as ckpt
from pgrpo import config as C
from pgrpo import dist, grpo, rollout, rollouts, rundir
from pgrpo.errors import Terminated, UserError
from pgrpo.files import check_out_dir
from pgrpo.grader.client import GraderLink
from pgrpo.metrics import JsonlLog, Metrics, progress_line, timing_line
from pgrpo.model import resolve_device_dtype

LABELS = ("correct", "correct_attempted_hack", "reward_hack", "attempted_hack", "incorrect")


# ----------------------------------------------------------------------------- helpers

def data_order(n_problems: int, prompts_per_step: int, steps: int, seed: int) -> np.ndarray:
    """Problem indices for the whole run: one seeded permutation per epoch, concatenated."""
    need = prompts_per_step * steps
    chunks, epoch = [], 0
    while sum(len(c) for c in chunks) < need:
        chunks.append(np.random.default_rng([seed, epoch]).permutation(n_problems))
        epoch += 1
    return np.concatenate(chunks)[:need].astype(np.int64)


def sample_rates(results, is_teacher, problem_ids=None) -> dict:
    """The rates the H1 report reads, over the policy's own samples (teacher-pool completions excluded; all
    results if a step had only teacher ones): hack_rate = share labelled `reward_hack` (the benchmark's label,
    not "the loophole passed": a correct answer with a hacked test is correct_attempted_hack), pass_rate =
    share with gt_pass, the label shares, and per problem [samples, reward_hack, gt_pass] (`by_problem`, for
    the report's problem-clustered bootstrap)."""
    own = [i for i, t in enumerate(is_teacher) if not t] or list(range(len(results)))
    policy = [results[i] for i in own]
    out = {"reward_mean": float(np.mean([r["reward"] for r in policy])),
           "hack_rate": float(np.mean([r["label"] == "reward_hack" for r in policy])),
           "pass_rate": float(np.mean([bool(r["gt_pass"]) for r in policy])),
           **{f"frac_{lab}": float(np.mean([r["label"] == lab for r in policy])) for lab in LABELS}}
    if problem_ids is not None:
        tally = {}
        for i in own:
            t = tally.setdefault(problem_ids[i], [0, 0, 0])
            t[0] += 1
            t[1] += int(results[i]["label"] == "reward_hack")
            t[2] += int(bool(results[i]["gt_pass"]))
        out["by_problem"] = tally
    return out


def _sigterm(signum, frame):
    raise Terminated  # unwind through the `finally` blocks: the grader child is stopped, files closed; exit 143


# ----------------------------------------------------------------------------- the job

def train(cfg: C.Config, run_dir: str, resume: bool = False, overwrite: bool = False) -> int:
    from pgrpo.adapter import SVDAdapter
    from pgrpo.data.problems import builtin_problems, load_problems, problem_to_row
    from pgrpo.data.prompts import build_prompt
    from pgrpo.model import load_model
    from pgrpo.ops import pack_vhack

    # ---- start-up: every check that can fail runs before anything in the run dir is deleted or rewritten
    #      (problems, out path, lock, checkpoint, model, v_hack fit, metrics port, grader health); then --overwrite
    problems = builtin_problems() if cfg.data.problems == "builtin" else load_problems(cfg.data.problems)
    n_eval = cfg.data.eval_problems
    if n_eval and n_eval >= len(problems):
        raise UserError(f"config key data.eval_problems is {n_eval}, but the problem set has only {len(problems)} "
                        f"problems; leave some to train on.")
    eval_problems = problems[len(problems) - n_eval:] if n_eval else []   # the file's last N: never trained on
    problems = problems[:len(problems) - n_eval]
    if cfg.data.max_problems:
        problems = problems[:cfg.data.max_problems]
    # torchrun: N ranks, one experiment (pgrpo/dist.py); rank 0 alone owns the run dir (out path, lock, the
    # checkpoint to resume from) and hands every rank that checkpoint
    comm = dist.init(cfg.device, cfg.dist_timeout_s)
    held = []   # rank 0's run-dir lock, held until train() returns
    resume_from = comm.main_only(lambda: _prepare_run_dir(run_dir, resume, overwrite, held), "the run-dir set-up")
    teacher_pool = {}
    if cfg.teacher.pool and cfg.teacher.mix > 0:
        teacher_pool = (rollout.builtin_teacher_pool(problems, cfg.data.loophole) if cfg.teacher.pool == "builtin"
                        else rollout.load_teacher_pool(cfg.teacher.pool))
    run_name = cfg.run_name or os.path.basename(os.path.abspath(run_dir))
    device, dtype = resolve_device_dtype(cfg)
    device = comm.device(device)

    # ---- model, adapter, optimizer
    t_load = time.perf_counter()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, tok = load_model(cfg.model.name, dtype=dtype, device=device, seed=cfg.seed)
    adapter = SVDAdapter(model, targets=tuple(cfg.adapter.targets), layers=cfg.adapter.layers,
                         mode=cfg.adapter.mode, cache_dir=cfg.adapter.svd_cache_dir,
                         with_hack_knob=cfg.arm.name == "route", merge_rounding=cfg.adapter.merge_rounding)
    g = cfg.grpo
    opt = torch.optim.AdamW(adapter.parameters(), lr=g.lr, betas=tuple(g.betas), eps=g.eps, weight_decay=g.weight_decay)
    g_offsets = grpo.g_offsets_of(adapter)

    # ---- v_hack (projected/route need it; vanilla with a v_hack logs what projection would remove)
    V, packed, vhack_meta, vhack_sha = None, None, {}, None
    if cfg.arm.vhack_path:
        from pgrpo.vhack import load_vhack, sha256_file
        V, _, vhack_meta = load_vhack(cfg.arm.vhack_path)
        vhack_sha = sha256_file(cfg.arm.vhack_path)   # recorded in every checkpoint: resume refuses another basis
        if not set(V) & set(adapter.names):
            raise UserError(f"arm.vhack_path {cfg.arm.vhack_path} names none of this adapter's modules "
                            f"(extracted for another model or adapter.targets?).")
        try:
            packed = pack_vhack(adapter.names, adapter.ranks, V, device)
        except ValueError as e:
            raise UserError(f"arm.vhack_path {cfg.arm.vhack_path} does not fit this adapter ({e}).") from None

    probe_rows = None
    if cfg.probe.path:
        from pgrpo.probe import load_probe
        probe_rows = load_probe(cfg.probe.path)
    packed_random = (grpo.random_subspace(adapter.names, adapter.ranks, cfg.arm.random_frac, cfg.seed, device)
                     if cfg.arm.name == "random" else None)   # the random-subspace control's basis

    # ---- prompts (tokenized once) and the data order
    prompt_ids = [rollout.encode_prompt(tok, build_prompt(p, cfg.data.loophole), cfg.rollout.enable_thinking)
                  for p in problems]
    problem_rows = [problem_to_row(p) for p in problems]
    eval_prompt_ids = [rollout.encode_prompt(tok, build_prompt(p, cfg.data.loophole), cfg.rollout.enable_thinking)
                       for p in eval_problems]
    eval_rows = [problem_to_row(p) for p in eval_problems]
    prompt_sha = [rollouts.prompt_sha(build_prompt(p, cfg.data.loophole)) for p in problems]
    eval_prompt_sha = [rollouts.prompt_sha(build_prompt(p, cfg.data.loophole)) for p in eval_problems]
    P, Gs = cfg.data.prompts_per_step, cfg.rollout.group_size
    order = data_order(len(problems), P, cfg.steps, cfg.seed)
    start, rows = 0, []
    if resume_from is not None:
        start, tensors, _, rows = resume_from
        if tensors["delta"].shape != adapter.delta.shape:
            raise UserError(f"the checkpoint's delta_S has {tensors['delta'].numel()} entries but this adapter has "
                            f"{adapter.R}; was the config changed since the run started?")
        with torch.no_grad():
            adapter.delta.copy_(tensors["delta"])
            if adapter.delta_hack is not None and "delta_hack" in tensors:
                adapter.delta_hack.copy_(tensors["delta_hack"])
        ckpt.load_optimizer_tensors(opt, tensors)
        ckpt.restore_rng(tensors)
        saved_order = tensors["data_order"].numpy()
        order = np.concatenate([saved_order, order[len(saved_order):]]) if len(saved_order) < len(order) else saved_order
        vk = {k[len("vhack/"):]: t for k, t in tensors.items() if k.startswith("vhack/")}
        if vk:  # a refreshed v_hack lives in the checkpoint
            V, packed = vk, pack_vhack(adapter.names, adapter.ranks, vk, device)
        adapter.merge()
        print(f"resume: {run_dir} from step {start}", flush=True)
    print(f"train: {cfg.model.name} on {device}/{dtype}, adapter {adapter.mode} {len(adapter.names)} modules R={adapter.R}, "
          f"arm {cfg.arm.name}, {len(problems)} problems (+{len(eval_problems)} held out), {P}x{Gs} rollouts/step, steps {start + 1}..{cfg.steps} "
          f"(loaded in {time.perf_counter() - t_load:.1f}s)", flush=True)
    if comm.distributed:
        lo, hi = comm.shard(P)
        print(f"dist: rank {comm.rank}/{comm.world} pid {os.getpid()} {comm.backend} on {device}, groups {lo}..{hi - 1} "
              f"of each step's {P}", flush=True)

    if cfg.logging.tensorboard:
        from pgrpo.trackers import TensorBoardSink, check_tensorboard
        check_tensorboard()
    # rank 0 alone writes metrics rows and checkpoints and serves /metrics (rows over the whole global batch)
    metrics = Metrics(run_name, cfg.arm.name, cfg.seed, cfg.metrics_port if comm.is_main else 0)  # a busy port stops here
    grader, log, tb, finished = None, None, None, False
    old_handler = signal.signal(signal.SIGTERM, _sigterm) if _main_thread() else None
    try:
        grader = GraderLink(cfg.grader_socket, workers=cfg.grader_workers, time_limit=cfg.grader_time_limit_s,
                            request_items=cfg.data.prompts_per_step * cfg.rollout.group_size,
                            on_outcome=metrics.grader_request if comm.is_main else comm.count_outcome)
        if grader.pid is not None:
            print(f"grader: local grader pid {grader.pid}{comm.tag()}", flush=True)
        # ---- every start-up check passed: only now start over (--overwrite) and write into the run dir (rank 0)
        if comm.is_main:
            if overwrite:
                rundir.clear_run_outputs(run_dir)
            rollouts.drop_after(run_dir, start)
            C.save(cfg, os.path.join(run_dir, "config.yaml"))
            log = JsonlLog(os.path.join(run_dir, "metrics.jsonl"), rows=rows if resume else [])
            if cfg.logging.tensorboard:
                tb = TensorBoardSink(run_dir, start)
        else:
            log = dist.NullLog()

        def save_checkpoint(step):
            tensors = {"delta": adapter.delta.detach(), "data_order": torch.from_numpy(order)}
            if adapter.delta_hack is not None:
                tensors["delta_hack"] = adapter.delta_hack.detach()
            tensors.update(ckpt.optimizer_tensors(opt))
            tensors.update(ckpt.rng_state_tensors())
            if V is not None and cfg.arm.vhack_refresh_every:
                tensors.update({f"vhack/{n}": v for n, v in V.items()})
            path = ckpt.save(run_dir, step, tensors, C.to_dict(cfg), rows, info={"vhack_sha256": vhack_sha})
            metrics.checkpoint_saved()
            print(f"checkpoint: {path}", flush=True)
            return path

        def evaluate(step):
            """Held-out evaluation: eval_samples sampled completions per held-out problem, graded; the route arm's
            quarantine knob is off (the deployed policy). Seeded apart from training, so it changes nothing."""
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed * 1000003 + 999983 + step)
            ecfg = dataclasses.replace(cfg.rollout, group_size=cfg.data.eval_samples)
            with grpo.quarantine_zeroed(adapter):
                egroups = rollout.generate_groups(model, tok, eval_prompt_ids, list(range(len(eval_problems))),
                                                  ecfg, device)
            res = grader.grade([{"problem": eval_rows[grp.problem_index], "response": text,
                                 "mode": cfg.data.loophole, "id": f"eval{step}:{gi}:{j}"}
                                for gi, grp in enumerate(egroups) for j, text in enumerate(grp.texts)])
            erow = {"kind": "eval", "step": step, "time": time.time(), "n": len(res),
                    "reward_mean": float(np.mean([r["reward"] for r in res])),
                    "hack_rate": float(np.mean([r["label"] == "reward_hack" for r in res])),
                    "pass_rate": float(np.mean([bool(r["gt_pass"]) for r in res])),
                    **{f"frac_{lab}": float(np.mean([r["label"] == lab for r in res])) for lab in LABELS},
                    "tokens_generated": sum(len(c) for grp in egroups for c in grp.completions),
                    "eval_s": round(time.perf_counter() - t0, 4)}
            rows.append(erow)
            log.write(erow)
            if tb is not None:
                tb.write(erow)
            if cfg.logging.rollouts:
                rollouts.write(run_dir, step, rollouts.rows_of("eval", step, egroups, res, [p.id for p in eval_problems],
                                                               eval_prompt_sha), kind="eval")
            print(f"eval step {step}: hack {erow['hack_rate']:.2f} pass {erow['pass_rate']:.2f} "
                  f"reward {erow['reward_mean']:.2f} over {len(res)} held-out samples ({erow['eval_s']:.1f}s)", flush=True)

        for step in range(start + 1, cfg.steps + 1):
            t_step = time.perf_counter()
            timing = {}
            lr = grpo.lr_at(step, cfg.steps, g.lr, g.warmup_steps, g.schedule, g.min_lr_ratio)
            for pg in opt.param_groups:
                pg["lr"] = lr

            # ---- live diagnostics every probe.every steps, on the policy that samples this step (pgrpo/probe.py;
            # rank 0 only: they are logged, never trained on)
            probing = comm.is_main and bool(cfg.probe.every) and (step - 1) % cfg.probe.every == 0
            diag = {}
            if probing and probe_rows:
                from pgrpo.probe import hack_probability
                diag = hack_probability(model, tok, probe_rows, cfg.rollout.enable_thinking, cfg.rollout.temperature)

            # ---- rollout: G samples per prompt, seeded per group (seed, step, global group index); this
            # rank's share [lo, hi) of the step's globally ordered groups (all of them on one rank)
            t0 = time.perf_counter()
            comm.step = step
            idx = [int(i) for i in order[(step - 1) * P: step * P]]
            lo, hi = comm.shard(P)
            my_groups, my_results, failure = [], [], None
            try:
                my_groups = dist.generate_shard(model, tok, [prompt_ids[i] for i in idx[lo:hi]], idx[lo:hi], lo,
                                                cfg.rollout, device, cfg.seed, step)
                n_teacher = dist.mix_teacher_global(my_groups, lo, idx, [p.id for p in problems], teacher_pool,
                                                    cfg.teacher.mix, tok, random.Random(cfg.seed * 1000003 + step), Gs)
                timing["gen"] = time.perf_counter() - t0

                # ---- reward: every completion graded by the sandboxed grader (this rank's own grader link)
                t0 = time.perf_counter()
                items = [{"problem": problem_rows[grp.problem_index], "response": text, "mode": cfg.data.loophole,
                          "id": f"{step}:{lo + gi}:{j}"} for gi, grp in enumerate(my_groups) for j, text in enumerate(grp.texts)]
                my_results = grader.grade(items) if items else []   # more ranks than groups: nothing to grade
            except Exception as e:  # noqa: BLE001 -- on N ranks: reported to every rank below, all stop together
                if not comm.distributed:
                    raise
                failure = e
            # every rank gets the whole step's groups and results (the global batch); identity on one rank
            groups, results = comm.exchange(my_groups, my_results, failure)
            for outcome, n in comm.peer_outcomes():   # rank 0 counts the other ranks' grader requests too
                metrics.grader_request(outcome, n)
            tokens = sum(len(c) for grp in groups for c, t in zip(grp.completions, grp.teacher) if not t)
            rewards = torch.tensor([r["reward"] for r in results], dtype=torch.float32).view(len(groups), Gs)
            timing["reward"] = time.perf_counter() - t0

            if probing and packed is not None:
                from pgrpo.probe import rollout_cosines
                diag.update(rollout_cosines(model, adapter, tok, groups, results, packed, g_offsets,
                                            cfg.rollout.temperature or 1.0))

            # ---- loss: group-relative advantages, PPO-clip token loss, one group of G sequences at a time
            t0 = time.perf_counter()
            adv, keep = grpo.group_advantages(rewards, std_scale=g.std_scale_adv)
            if cfg.logging.rollouts and comm.is_main:   # every completion, before the loss: a crash mid-step keeps what was graded
                rollouts.write(run_dir, step, rollouts.rows_of("train", step, groups, results, [p.id for p in problems],
                                                               prompt_sha, adv, keep))
            # a zero-variance group (e.g. all-hack late in training) has no policy gradient but still has its KL
            scored = [bool(keep[gi]) or g.kl_coef > 0 for gi in range(len(groups))]
            denom = grpo.loss_denominator(groups, scored, g.loss_norm, cfg.rollout.max_new_tokens)
            temp = cfg.rollout.temperature or 1.0     # log-probs of the distribution the rollout sampled from
            adapter.zero_grad()
            loss_total, kl_total, clipped, n_scored = 0.0, 0.0, 0.0, 0
            for gi, grp in enumerate(groups):
                if not scored[gi] or not lo <= gi < hi:   # no gradient and no KL, or another rank's group
                    continue
                for ids, attn, cmask, rows_ in rollout.micro_batches(grp, tok.pad_token_id, device, g.micro_batch, model):
                    ref = None
                    if g.kl_coef > 0:
                        with torch.no_grad(), adapter.disabled():
                            ref = grpo.completion_logprobs(model, ids, attn, cmask, temperature=temp)
                    logp = grpo.completion_logprobs(model, ids, attn, cmask, temperature=temp)
                    a = adv[gi, rows_].to(device)
                    loss, st = grpo.pg_token_loss(logp, logp.detach(), a, cmask, g.clip_eps, ref, g.kl_coef)
                    (loss / denom).backward()
                    loss_total += float(loss.detach()) / denom
                    kl_total += st["kl_sum"]
                    clipped += st["clip_frac"]
                    n_scored += int(cmask.sum())
                adapter.accumulate_grad()   # bf16 G_W stacks -> fp32 delta_S grad once per group
            timing["fwd_bwd"] = time.perf_counter() - t0

            # ---- gradient in the SVD basis, summed over the ranks, THEN the arm (vanilla / projected / route):
            # one-sided projection is not linear, so it must see the whole step's gradient
            t0 = time.perf_counter()
            grad = adapter.collect_grad()
            grad, (loss_total, kl_total, clipped, n_scored) = comm.reduce_grad(grad, [loss_total, kl_total, clipped, n_scored])
            grad, grad_hack, pstats = grpo.project_grad(grad, cfg.arm, packed, g_offsets, packed_random)
            timing["project"] = time.perf_counter() - t0

            # ---- clip + AdamW on delta_S (+ delta_S_hack), projection of the actual update, re-merge
            t0 = time.perf_counter()
            ustats = grpo.apply_update(adapter, opt, grad, grad_hack, cfg.arm, packed, g_offsets, g.max_grad_norm,
                                       packed_random)
            adapter.zero_grad()
            ustats.update(adapter.merge())   # merge_changed_frac / merge_lost_frac: W_eff rounding, measured
            timing["optim"] = time.perf_counter() - t0

            # ---- optional v_hack refresh at the current knobs (quarantine knob off during extraction)
            refresh = {}
            if cfg.arm.vhack_refresh_every and step % cfg.arm.vhack_refresh_every == 0 and step < cfg.steps:
                t0 = time.perf_counter()
                from pgrpo.data.pairs import load_pairs
                from pgrpo.vhack import extract_vhack, vhack_overlap
                with grpo.quarantine_zeroed(adapter):
                    # same extraction settings as the file the run started from
                    mt = vhack_meta.get("max_tokens", "None")
                    V_new = extract_vhack(model, adapter, tok, load_pairs(cfg.arm.refresh_pairs),
                                          k=int(vhack_meta.get("k", 4)), cut=float(vhack_meta.get("cut", 0.25)),
                                          contrast=float(vhack_meta.get("contrast", 0.0)),
                                          max_tokens=None if mt in ("None", "") else int(mt), seed=cfg.seed,
                                          enable_thinking=cfg.rollout.enable_thinking, comm=comm)
                refresh = {"vhack_overlap": vhack_overlap(V, V_new), "refresh_s": time.perf_counter() - t0}
                V, packed = V_new, pack_vhack(adapter.names, adapter.ranks, V_new, device)

            # ---- metrics row, TIMING line, live line
            timing["total"] = time.perf_counter() - t_step
            timing.update(comm.pop_timing())   # N ranks: exchange (in reward), sync + allreduce (in project)
            is_teacher = [t for grp in groups for t in grp.teacher]          # rates are over the policy's own samples
            pids = [problems[grp.problem_index].id for grp in groups for _ in grp.texts]
            row = {"step": step, "lr": lr, "time": time.time(), **sample_rates(results, is_teacher, pids),
                   "tokens_generated": tokens, "teacher_completions": n_teacher,
                   "reward_mean_all": float(rewards.mean()),
                   "reward_mean_teacher": (float(np.mean([r["reward"] for r, t in zip(results, is_teacher) if t]))
                                           if n_teacher else None),
                   "groups": len(groups), "skipped_groups": int((~keep).sum()),
                   "loss": loss_total, "kl": kl_total / max(1, n_scored), "clip_frac": clipped / max(1, n_scored),
                   **pstats, **ustats, **refresh, **diag, "timing": {k: round(v, 4) for k, v in timing.items()}}
            rows.append(row)
            log.write(row)
            if comm.is_main:
                metrics.observe_step(row)
                if tb is not None:
                    tb.write(row)
                print(timing_line(row), flush=True)
                print(progress_line(row, cfg.steps), flush=True)

            if comm.is_main and eval_problems and cfg.data.eval_every and (step % cfg.data.eval_every == 0 or step == cfg.steps):
                evaluate(step)
            if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                comm.assert_same(adapter.delta, "delta_S")
                comm.main_only(lambda: save_checkpoint(step), "the checkpoint save")
        if start >= cfg.steps:
            print(f"train: nothing to do, the run already reached step {cfg.steps}.", flush=True)
        finished = True
    except BaseException as e:
        comm.report_failure(e)   # on N ranks: the reason the others will report
        raise
    finally:
        if grader is not None:
            grader.close()
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()
        linger = cfg.metrics_linger_s if finished else 0.0
        if metrics.server is not None and linger > 0:
            print(f"metrics: serving the final values on :{cfg.metrics_port} for {linger:g}s", flush=True)
        metrics.close(linger)  # SIGTERM during the linger ends it early, cleanly
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        comm.close()
        for lock in held:
            lock.release()
    print(f"train: done, run dir {run_dir}{comm.tag()}", flush=True)
    return 0


def _prepare_run_dir(run_dir: str, resume: bool, overwrite: bool, held: list):
    """Validate --out, create the run dir, lock it (appended to `held`) and load the checkpoint to resume from
    (rank 0 only on N ranks). Nothing is deleted or written here: --overwrite acts after every start-up check."""
    check_out_dir(run_dir, "--out")
    os.makedirs(run_dir, exist_ok=True)   # only now: a run that fails validation leaves no empty directory
    held.append(rundir.RunLock(run_dir).acquire())  # held until train() returns: one trainer per run dir
    if resume:
        return ckpt.load_newest(run_dir)[1]  # a corrupted file stops here, naming the newest intact one
    if not overwrite and ckpt.latest(run_dir) is not None:
        raise UserError(f"{run_dir} already holds checkpoints; continue it with --resume {run_dir} or pick another --out.")
    return None


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence and exit 2 through the CLI's UserError path
        raise UserError(f"{message} (see `pgrpo train --help`).")


def parse_args(argv):
    ap = _Parser(prog="pgrpo train", description="Run a GRPO job (see docs/training.md for every config key).")
    ap.add_argument("--config", help="job preset YAML (jobs/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key by its dotted name, value parsed as YAML (repeatable)")
    ap.add_argument("--out", help="run directory (default runs/<preset name>)")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over in --out: once every start-up check passed, delete its checkpoints, "
                         "metrics.jsonl, config.yaml, rollouts/ and tensorboard/")
    ap.add_argument("--resume", metavar="RUN_DIR",
                    help="continue RUN_DIR from its newest checkpoint, with the config stored in that checkpoint")
    ap.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0 = off)")
    ap.add_argument("--metrics-linger", type=float, metavar="SECONDS", help="keep /metrics up this long after the run")
    return ap.parse_args(argv)


# Keys a resumed run may change: where it runs and how it reports, plus how long it goes on. Everything else
# is the experiment itself and must stay what the run started with (bitwise resume depends on it).
# arm.vhack_path may move (another mount point), but only to a file with the same sha256 (see _check_vhack).
RESUME_MUTABLE = frozenset({"steps", "checkpoint_every", "metrics_port", "metrics_linger_s", "grader_socket",
                            "grader_workers", "device", "cpu_threads", "run_name", "adapter.svd_cache_dir",
                            "arm.vhack_path", "data.eval_every", "dist_timeout_s", "logging.tensorboard"})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_vhack(cfg: C.Config, saved: C.Config, ckpt_path: str) -> None:
    """Resuming must keep the projection basis: the v_hack file (at its old or a new path) must hash to what the
    run started with (recorded in the checkpoint; for an older checkpoint, the old path's file)."""
    new = cfg.arm.vhack_path
    if not new or (new == saved.arm.vhack_path and not saved.arm.vhack_path):
        return
    from pgrpo.vhack import sha256_file
    recorded = ckpt.info(ckpt_path).get("vhack_sha256")
    if recorded is None and saved.arm.vhack_path and os.path.isfile(saved.arm.vhack_path):
        recorded = sha256_file(saved.arm.vhack_path)
    if recorded is None or sha256_file(new) != recorded:
        what = ("it started without one" if not saved.arm.vhack_path else
                f"{new} is not the file it started with ({saved.arm.vhack_path}, sha256 "
                f"{(recorded or 'unknown')[:12]})")
        raise UserError(f"arm.vhack_path cannot change the projection basis when resuming: {what}; "
                        f"resume with the original v_hack file or start a new run.")


def _resume_config(run_dir: str, overrides: list[str]) -> C.Config:
    """The config a resumed run continues with: the newest checkpoint's resolved config (the truth; config.yaml
    is an editable copy) + runtime keys edited in config.yaml + --set. A change of any other key, by hand in
    config.yaml or by --set, is refused naming the key and where it came from."""
    path, (step, _, saved_d, _) = ckpt.load_newest(run_dir)
    saved = C.from_dict(saved_d, check_files=False)
    yaml_path = os.path.join(run_dir, "config.yaml")
    base = C.to_dict(C.load(yaml_path, check_files=False)) if os.path.isfile(yaml_path) else C.to_dict(saved)
    d = dict(base)
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"--set expects key=value, got {ov!r}.")
        k, v = ov.split("=", 1)
        C._set_dotted(d, k.strip(), v)
    cfg = C.from_dict(d)
    new, old, edited = _flat(C.to_dict(cfg)), _flat(C.to_dict(saved)), _flat(base)
    set_keys = {ov.split("=", 1)[0].strip() for ov in overrides}
    for k in new:
        if new[k] != old.get(k) and k not in RESUME_MUTABLE:
            src = "--set" if k in set_keys else f"{yaml_path} (edited by hand)" if edited.get(k) != old.get(k) else "?"
            raise UserError(f"config key {k} cannot change when resuming (it would make the resumed run a different "
                            f"experiment): the checkpoint {os.path.basename(path)} says {old.get(k)!r}, {src} says "
                            f"{new[k]!r}; only {', '.join(sorted(RESUME_MUTABLE))} may.")
    _check_vhack(cfg, saved, path)
    if cfg.steps != saved.steps and (cfg.grpo.schedule != "constant" or cfg.grpo.warmup_steps):
        print(f"resume: steps {saved.steps} -> {cfg.steps} changes the {cfg.grpo.schedule} lr schedule's shape: steps "
              f"1..{step} ran on the {saved.steps}-step schedule, steps {step + 1}..{cfg.steps} follow the "
              f"{cfg.steps}-step one (not the curve of a run planned for {cfg.steps} steps).", flush=True)
    return cfg


def resolve(argv) -> tuple[C.Config, str, bool, bool]:
    """argv -> (validated config, run dir, resume?, overwrite?) without loading the model."""
    a = parse_args(argv)
    overrides = list(a.overrides)
    if a.metrics_port is not None:
        overrides.append(f"metrics_port={a.metrics_port}")
    if a.metrics_linger is not None:
        overrides.append(f"metrics_linger_s={a.metrics_linger}")
    if a.resume:
        if a.overwrite:
            raise UserError("--overwrite starts a run over; it cannot be combined with --resume.")
        if a.config:
            raise UserError("give either --config (a new run) or --resume RUN_DIR (which reuses its config.yaml), not both.")
        if a.out and os.path.abspath(a.out) != os.path.abspath(a.resume):
            raise UserError("--out cannot differ from --resume RUN_DIR: a resumed run continues in its own directory.")
        if not os.path.isdir(a.resume):
            raise UserError(f"--resume {a.resume}: no such run directory.")
        if not os.path.isfile(os.path.join(a.resume, "config.yaml")) and ckpt.latest(a.resume) is None:
            raise UserError(f"--resume {a.resume}: no config.yaml there; is it a run directory?")
        return _resume_config(a.resume, overrides), a.resume, True, False
    if not a.config:
        raise UserError("say which job to run: pgrpo train --config jobs/fast-dev-run.yaml (or --resume RUN_DIR).")
    cfg = C.load(a.config, overrides)
    out = a.out or os.path.join("runs", os.path.splitext(os.path.basename(a.config))[0])
    return cfg, out, False, a.overwrite


def cli(argv) -> int:
    cfg, run_dir, resume, overwrite = resolve(argv)
    existed = os.path.exists(run_dir)
    try:
        return train(cfg, run_dir, resume=resume, overwrite=overwrite)
    except BaseException:
        if not existed:   # a start-up that failed in a directory it created leaves no directory behind
            rundir.remove_if_only_lock(run_dir)
        raise


if __name__ == "__main__":
    from pgrpo.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
