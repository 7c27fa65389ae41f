"""`pgrpo bench step`: what one training step costs, phase by phase, measured side by side in one run.

On any `--model` (default `qwen3-4b-shape`: a random model with Qwen3-4B's exact config; on a CPU it is scaled
down by `--scale`, default 8: hidden 320, 4 layers, 4 q / 1 kv heads of 128, intermediate 1216, vocab 18992):
1. generation tokens/s, three ways on the same prompts, greedy with a fixed number of new tokens so every
   way does the same work: today's path (`--old-groups-per-call` groups per `generate` call, the presets'
   old fixed batch), the new memory-sized batching (`rollout.groups_per_call`), and that plus
   `rollout.compile` (static KV cache + torch.compile of the decode step; first call incl. compile timed apart);
2. the loss pass (fwd + bwd of every group, micro-batched, fp32 grad accumulation per group) in tokens/s with
   the chunked log-probs vs the plain full-vocabulary formulation, and their peak memory (CUDA);
3. the merged path's own ops: basis change (collect_grad), projection against a random k=12 v_hack, merge;
4. phase shares of a step built from those (generation with the faster of new/compile; the grader's share
   is not in it: `--steps N` adds real training steps of `--config` read from their metrics rows).
`--factored` adds merged-vs-factored generation (the reason the trainer merges). `--json PATH` writes all of it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import torch

from pgrpo.errors import UserError

# `--model small`: the tiny architecture scaled up (~13M parameters, random)
SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64)


def _build(model_name, mode, device, dtype, seed, delta_scale, scale):
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import ByteTokenizer, build_tiny_model, load_model, resolve_dtype
    if model_name == "small":
        model, tok = build_tiny_model(seed=seed, **SMALL).to(device=device, dtype=resolve_dtype(dtype)), ByteTokenizer()
    elif model_name == "qwen3-4b-shape":
        model, tok = load_model(f"qwen3-4b-shape/{scale}" if scale > 1 else model_name, dtype=dtype, device=device,
                                seed=seed)
    else:
        model, tok = load_model(model_name, dtype=dtype, device=device, seed=seed)
    t0 = time.perf_counter()
    ad = SVDAdapter(model, mode=mode, cache_dir=".cache/svd")
    svd_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a nonzero knob, so the factored path does real work and merged != W0
        ad.delta.copy_(delta_scale * torch.randn(ad.R, generator=g).to(ad.delta.device))
    ad.merge()
    return model, tok, ad, svd_s


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6   # process high-water mark (GB), CPU


def _timed(fn, device, repeats=1):
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def _generate(model, tok, device, prompts, cfg, new_tokens, per_call, compile=False):
    from pgrpo import rollout
    be = rollout.HFGenerate(model, tok, device, compile=compile)
    be.gen_overrides = dict(min_new_tokens=new_tokens)
    out = be.generate(prompts, cfg.group_size, cfg, groups_per_call_=per_call)
    return out, be.calls


def gen_section(model, tok, device, prompts, a, res):
    from pgrpo import rollout
    from pgrpo.config import RolloutConfig
    cfg = RolloutConfig(group_size=a.group_size, max_new_tokens=a.new_tokens, temperature=0.0,
                        groups_per_generate=0)
    n_tok = len(prompts) * a.group_size * a.new_tokens
    old = min(a.old_groups_per_call, len(prompts))
    new = rollout.groups_per_call(model, prompts, cfg, device)
    rows = {}
    for name, per_call, comp in (("today", old, False), ("batched", new, False)):
        _peak_reset(device)
        t, (out, calls) = _timed(lambda: _generate(model, tok, device, prompts, cfg, a.new_tokens, per_call, comp),
                                 device, a.repeats)
        rows[name] = {"s": t, "tok_per_s": n_tok / t, "calls": calls, "groups_per_call": per_call,
                      "peak_gb": _peak(device), "out": out}
        print(f"gen {name:<9}: {per_call:3d} groups/call x {calls} calls  {t:8.3f}s  {n_tok / t:9.0f} tok/s  "
              f"peak {rows[name]['peak_gb']:.2f} GB", flush=True)
    if a.compile:
        from pgrpo import rollout as R
        R.COMPILE_BACKEND = a.compile_backend
        try:
            _peak_reset(device)
            t_first, _ = _timed(lambda: _generate(model, tok, device, prompts, cfg, a.new_tokens, new, True), device, 1)
            t, (out, calls) = _timed(lambda: _generate(model, tok, device, prompts, cfg, a.new_tokens, new, True),
                                     device, a.repeats)
            rows["compile"] = {"s": t, "tok_per_s": n_tok / t, "calls": calls, "groups_per_call": new,
                               "first_call_incl_compile_s": t_first, "peak_gb": _peak(device), "out": out,
                               "backend": a.compile_backend}
            print(f"gen compile  : {new:3d} groups/call x {calls} calls  {t:8.3f}s  {n_tok / t:9.0f} tok/s  "
                  f"(first run incl. compile {t_first:.1f}s, backend {a.compile_backend})", flush=True)
        except Exception as e:   # a compile failure is a result to report, not a crash of the whole bench
            rows["compile"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"gen compile  : FAILED {rows['compile']['error']}", flush=True)
    same = {k: v["out"] == rows["today"]["out"] for k, v in rows.items() if "out" in v}
    for k, v in rows.items():
        v.pop("out", None)
        if "tok_per_s" in v:
            v["speedup_vs_today"] = v["tok_per_s"] / rows["today"]["tok_per_s"]
    print("RATIO generation tok/s vs today's path: " + ", ".join(
        f"{k} {v['speedup_vs_today']:.2f}x" for k, v in rows.items() if "speedup_vs_today" in v)
        + f"  (greedy tokens identical to today's: {same})", flush=True)
    res["generation"] = rows
    res["generation_identical_tokens"] = same
    res["generated_tokens"] = n_tok


def loss_section(model, tok, ad, device, prompts, a, res):
    from pgrpo import grpo, rollout
    gen = torch.Generator().manual_seed(2)
    groups = []
    for i, p in enumerate(prompts):
        grp = rollout.Group(problem_index=i, prompt_ids=list(p))
        for _ in range(a.group_size):
            grp.completions.append(torch.randint(0, 256, (a.new_tokens,), generator=gen).tolist())
        groups.append(grp)
    adv = torch.randn(len(groups), a.group_size, generator=gen)
    n_scored = sum(len(c) for g in groups for c in g.completions)
    out, grads = {}, {}
    for name, fn in (("chunked", grpo.completion_logprobs), ("full_vocab", grpo.completion_logprobs_full)):
        def one_pass():
            ad.zero_grad()
            for gi, grp in enumerate(groups):
                for ids, attn, cm, rows in rollout.micro_batches(grp, tok.pad_token_id, device, a.micro_batch, model):
                    logp = fn(model, ids, attn, cm)
                    loss, _ = grpo.pg_token_loss(logp, logp.detach(), adv[gi, rows].to(device), cm)
                    (loss / n_scored).backward()
                ad.accumulate_grad()
            return ad.collect_grad().clone()
        _peak_reset(device)
        try:
            t, g = _timed(one_pass, device, a.repeats)
        except torch.OutOfMemoryError as e:
            out[name] = {"error": f"out of memory: {str(e).splitlines()[0][:200]}"}
            print(f"loss {name:<10}: OUT OF MEMORY", flush=True)
            ad.zero_grad()
            torch.cuda.empty_cache()
            continue
        grads[name] = g
        out[name] = {"s": t, "tok_per_s": n_scored / t, "peak_gb": _peak(device)}
        print(f"loss {name:<10}: {t:8.3f}s  {n_scored / t:9.0f} scored tok/s  peak {out[name]['peak_gb']:.2f} GB",
              flush=True)
    if len(grads) == 2:
        a_, b_ = grads["chunked"], grads["full_vocab"]
        out["grad_rel_diff"] = float((a_ - b_).norm() / b_.norm().clamp_min(1e-30))
        out["speedup_chunked_vs_full"] = out["full_vocab"]["s"] / out["chunked"]["s"]
        print(f"RATIO loss pass chunked vs full-vocab = {out['speedup_chunked_vs_full']:.2f}x, "
              f"delta_S grad rel diff {out['grad_rel_diff']:.1e}", flush=True)
    out["scored_tokens"] = n_scored
    out["micro_batch"] = a.micro_batch
    res["loss"] = out


def ops_section(ad, device, a, res):
    from pgrpo import grpo, ops
    g_off = grpo.g_offsets_of(ad)
    gen = torch.Generator().manual_seed(4)
    V = {}
    for n, r in zip(ad.names, ad.ranks):
        k = min(12, r)
        V[n] = torch.linalg.qr(torch.randn(r, k, generator=gen))[0].T.contiguous()
    packed = ops.pack_vhack(ad.names, ad.ranks, V, device)
    t_collect, g = _timed(ad.collect_grad, device, a.repeats)
    t_proj, _ = _timed(lambda: ops.project_(g.clone(), g_off, packed.v, packed.v_offsets, packed.ks, 1.0, True),
                       device, a.repeats)
    t_merge, _ = _timed(ad.merge, device, a.repeats)
    res["ops"] = {"collect_grad_s": t_collect, "project_s": t_proj, "merge_s": t_merge, "merge_stats": ad.merge_stats}
    print(f"ops: collect_grad (basis change, all modules) {t_collect * 1e3:.1f} ms, projection k=12 "
          f"{t_proj * 1e3:.2f} ms, merge {t_merge * 1e3:.1f} ms", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pgrpo bench step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-4b-shape",
                    help="qwen3-4b-shape (default; random, Qwen3-4B's config), tiny, small, or an HF name/path")
    ap.add_argument("--scale", type=int, default=None, help="qwen3-4b-shape divided by this (default 1 on CUDA, 8 on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--groups", type=int, default=None, help="prompts (groups) per step (default 43 on CUDA, 4 on CPU)")
    ap.add_argument("--group-size", type=int, default=None, help="G (default 6 on CUDA, 4 on CPU)")
    ap.add_argument("--old-groups-per-call", type=int, default=None,
                    help="today's fixed groups per generate call (default 15 on CUDA, as the old full presets; 2 on CPU)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512 on CUDA, 128 on CPU)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens per sequence (default 256 CUDA, 32 CPU)")
    ap.add_argument("--micro-batch", type=int, default=-1, help="loss micro-batch (-1 = from free memory, as the trainer)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="time rollout.compile too")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile (eager: fast CI)")
    ap.add_argument("--factored", action="store_true", help="also time generation through the factored adapter")
    ap.add_argument("--repeats", type=int, default=1, help="best of N per timing")
    ap.add_argument("--config", default="jobs/fast-dev-run.yaml", help="preset for --steps")
    ap.add_argument("--steps", type=int, default=0, help="real training steps of --config for the grader's share (0 = skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")
    ap.add_argument("--json", dest="json_path", help="write every number to this JSON file (rewritten after each section)")
    ap.add_argument("--sections", default="gen,loss,ops",
                    help="comma list of gen, loss, ops (default all; the GPU check times compile in its own run)")
    ap.add_argument("--ranks", type=int, default=0,
                    help="data parallelism instead: step time of the --config preset on 1 rank vs N torchrun ranks "
                         "with the same global batch, and the gradient all-reduce's share")
    a = ap.parse_args(argv)
    if a.ranks:
        return bench_ranks(a)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if cuda else "float32")
    a.scale = a.scale or (1 if cuda else 8)
    a.groups = a.groups or (43 if cuda else 4)
    a.group_size = a.group_size or (6 if cuda else 4)
    a.old_groups_per_call = a.old_groups_per_call or (15 if cuda else 2)
    a.prompt_len = a.prompt_len or (512 if cuda else 128)
    a.new_tokens = a.new_tokens or (256 if cuda else 32)
    if min(a.groups, a.group_size, a.old_groups_per_call, a.prompt_len, a.new_tokens, a.repeats, a.scale) < 1 \
            or a.steps < 0 or a.micro_batch < -1:
        raise UserError("--groups, --group-size, --old-groups-per-call, --prompt-len, --new-tokens, --repeats and "
                        "--scale must be >= 1, --steps >= 0 and --micro-batch >= -1.")
    if a.steps and not os.path.isfile(a.config):   # checked before minutes of timing, not after
        raise UserError(f"--config {a.config} does not exist (run from the repository root or pass --config PATH).")
    if a.json_path and not os.path.isdir(os.path.dirname(os.path.abspath(a.json_path))):
        raise UserError(f"--json {a.json_path}: its directory does not exist.")
    sections = [x.strip() for x in a.sections.split(",") if x.strip()]
    if not sections or set(sections) - {"gen", "loss", "ops"}:
        raise UserError(f"--sections {a.sections!r}: give a comma list of gen, loss, ops.")
    if a.threads:
        torch.set_num_threads(a.threads)

    def dump():   # after every section, so a run cut short by a timeout still leaves its numbers
        if a.json_path:
            tmp = a.json_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(res, f, indent=1)
            os.replace(tmp, a.json_path)

    t0 = time.perf_counter()
    model, tok, ad, svd_s = _build(a.model, "merged", device, dtype, 0, 0.02, a.scale)
    c = model.config
    shape = (f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads}/{c.num_key_value_heads} "
             f"heads x {getattr(c, 'head_dim', None)}, intermediate {c.intermediate_size}, vocab {c.vocab_size}")
    res = {"model": a.model if a.model != "qwen3-4b-shape" or a.scale == 1 else f"qwen3-4b-shape/{a.scale}",
           "shape": shape, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": dtype,
           "threads": torch.get_num_threads(), "groups": a.groups, "group_size": a.group_size,
           "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "adapter_modules": len(ad.names), "R": ad.R,
           "build_s": time.perf_counter() - t0, "svd_s": svd_s, "static_peak_gb": _peak(device)}
    print(f"bench step: {res['model']} ({shape}) on {res['device']}/{dtype}, {len(ad.names)} adapted modules, "
          f"{a.groups} groups x G {a.group_size}, {a.prompt_len} prompt + {a.new_tokens} new tokens, greedy, best of "
          f"{a.repeats}, {torch.get_num_threads()} CPU thread(s); built in {res['build_s']:.1f}s (SVD {svd_s:.1f}s)",
          flush=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (a.prompt_len,), generator=g).tolist() for _ in range(a.groups)]

    dump()
    if "gen" in sections:
        gen_section(model, tok, device, prompts, a, res)
        dump()
    if "loss" in sections:
        loss_section(model, tok, ad, device, prompts, a, res)
        dump()
    if "ops" in sections:
        ops_section(ad, device, a, res)
        dump()
    if {"gen", "loss", "ops"} <= set(sections):
        gens = [v["s"] for k, v in res["generation"].items() if k in ("batched", "compile") and "s" in v]
        phases = {"gen": min(gens), "loss": res["loss"].get("chunked", {}).get("s", float("nan")),
                  "collect_grad": res["ops"]["collect_grad_s"], "project": res["ops"]["project_s"],
                  "merge": res["ops"]["merge_s"]}
        total = sum(phases.values())
        res["phases_s"] = phases
        res["phase_share"] = {k: v / total for k, v in phases.items()}
        print("STEP phase shares (no grader): " + " ".join(f"{k}={v:.1%}" for k, v in res["phase_share"].items())
              + f"  of {total:.2f}s", flush=True)

    if a.factored:
        del model, ad
        res["factored"] = _factored_section(a, device, dtype, prompts, res)
    if a.steps:
        res["train_steps"] = _train_section(a, device, dtype)
    dump()
    return 0


def _factored_section(a, device, dtype, prompts, res):
    from pgrpo.config import RolloutConfig
    cfg = RolloutConfig(group_size=a.group_size, max_new_tokens=a.new_tokens, temperature=0.0)
    per_call = res["generation"]["batched"]["groups_per_call"]
    model_f, tok, _, _ = _build(a.model, "factored", device, dtype, 0, 0.02, a.scale)
    t, _ = _timed(lambda: _generate(model_f, tok, device, prompts, cfg, a.new_tokens, per_call), device, a.repeats)
    ratio = t / res["generation"]["batched"]["s"]
    print(f"RATIO factored/merged generation = {ratio:.2f}x", flush=True)
    return {"s": t, "ratio_vs_merged": ratio}


def _train_section(a, device, dtype):
    from pgrpo import config as C
    from pgrpo.train import train
    cfg = C.load(a.config, [f"steps={a.steps}", "checkpoint_every=0", "metrics_port=0", f"device={device}",
                            f"dtype={dtype}", f"cpu_threads={a.threads}"])
    with tempfile.TemporaryDirectory(prefix="pgrpo-bench-step-") as d:
        run = os.path.join(d, "run")
        t0 = time.perf_counter()
        train(cfg, run)
        wall = time.perf_counter() - t0
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if "timing" in r]
    phases = ("gen", "fwd_bwd", "reward", "project", "optim", "total")
    mean = {p: sum(r["timing"][p] for r in rows) / len(rows) for p in phases}
    print(f"STEP {os.path.basename(a.config)} x {len(rows)} steps, mean seconds per step: "
          + " ".join(f"{p}={mean[p]:.3f}" for p in phases))
    print("STEP share of total: " + " ".join(f"{p}={mean[p] / mean['total']:.0%}" for p in phases[:-1])
          + f"  (whole run incl. startup {wall:.1f}s)")
    return {"mean_s": mean, "wall_s": wall}


if __name__ == "__main__":
    raise SystemExit(main())


# ----------------------------------------------------------------------------- --ranks N (data parallelism)

def _run_rows(argv, run):
    import json
    import subprocess
    import sys
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"the benchmark run failed (rc {p.returncode}): {(p.stdout + p.stderr).strip()[-600:]}")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def bench_ranks(a) -> int:
    """The same global batch on 1 rank and on `--ranks` N (one torchrun, gloo on CPU / NCCL on GPUs): mean step
    time per phase over the steps after the first (warm-up), the ratio, and the all-reduce's share of a step; then
    the bare all-reduce of R fp32 floats for the run's R and for Qwen3-4B's (534,528)."""
    import sys
    n = a.ranks
    if n < 2:
        raise UserError("--ranks must be >= 2 (it compares 1 rank with N).")
    if not os.path.isfile(a.config):
        raise UserError(f"--config {a.config} does not exist (run from the repository root or pass --config PATH).")
    steps = max(a.steps, 3) + 1
    from pgrpo import config as C
    cfg = C.load(a.config)
    P = -(-cfg.data.prompts_per_step // n) * n              # rounded up to a multiple of N: equal shares
    sets = [f"steps={steps}", "checkpoint_every=0", "metrics_port=0", f"data.prompts_per_step={P}",
            f"rollout.groups_per_generate={P // n}", f"cpu_threads={a.threads}", f"device={a.device}"]
    over = [x for s in sets for x in ("--set", s)]
    phases = ("gen", "fwd_bwd", "reward", "project", "optim", "total")
    print(f"bench step --ranks {n}: {os.path.basename(a.config)} with {P} prompts x G {cfg.rollout.group_size} per "
          f"step ({P // n} groups per generate call), {cfg.rollout.max_new_tokens} max new tokens, {a.threads} "
          f"thread(s) per rank, mean of steps 2..{steps}", flush=True)
    mean = {}
    for ranks in (1, n):
        with tempfile.TemporaryDirectory(prefix="pgrpo-bench-ranks-") as d:
            run = os.path.join(d, "run")
            launch = (["-m", "pgrpo"] if ranks == 1 else
                      ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                       "--max-restarts", "0", "-m", "pgrpo"])
            rows = _run_rows([*launch, "train", "--config", a.config, "--out", run, *over], run)[1:]
        m = {p: sum(r["timing"].get(p, 0.0) for r in rows) / len(rows) for p in (*phases, "exchange", "sync", "allreduce")}
        mean[ranks] = m
        extra = (f" | inside project: allreduce={m['allreduce'] * 1e3:.2f}ms ({m['allreduce'] / m['total']:.2%} of "
                 f"the step), waiting for the slower rank={m['sync'] * 1e3:.1f}ms ({m['sync'] / m['total']:.1%}) | "
                 f"inside reward: exchange of rollouts+results={m['exchange'] * 1e3:.1f}ms"
                 if ranks > 1 else "")
        print(f"RANKS {ranks}: " + " ".join(f"{p}={m[p]:.3f}s" for p in phases) + extra, flush=True)
    print(f"RATIO step time 1 rank / {n} ranks = {mean[1]['total'] / mean[n]['total']:.2f}x "
          f"(gen {mean[1]['gen'] / mean[n]['gen']:.2f}x, fwd_bwd {mean[1]['fwd_bwd'] / mean[n]['fwd_bwd']:.2f}x)")
    import subprocess
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import load_model
    R = SVDAdapter(load_model(cfg.model.name, seed=cfg.seed)[0]).R if cfg.model.name == "tiny" else None
    for numel in [x for x in (R, 534528) if x]:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                            "-m", "pgrpo.dist", "--numel", str(numel)], capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("ALLREDUCE")]
        print(line[0] if line else f"ALLREDUCE numel={numel}: failed ({p.stderr.strip()[-300:]})", flush=True)
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print(f"note: {torch.cuda.device_count()} GPU(s) here: multi-GPU (NCCL) step times were not measurable on "
              f"this machine; these are CPU ranks on gloo.")
    return 0
