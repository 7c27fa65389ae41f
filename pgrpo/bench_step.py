"""`pgrpo bench step`: what one training step costs, and why the trainer generates the way it does.

In one run on the embedded tiny model (or any `--model`):
1. generation with the merged weights vs the factored adapter (two extra skinny matmuls per adapted Linear
   per token), both with the KV cache on;
2. generation with the KV cache on vs off (merged);
3. the phase breakdown of real training steps (`fast-dev-run` preset by default: real grader, real loss),
   read from the run's metrics rows.
Greedy decoding for the generation timings, so every variant produces the same number of tokens.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from pgrpo.errors import UserError


# `--model small`: the tiny architecture scaled up (~13M parameters, random), big enough on a CPU for the
# factored adapter's two extra matmuls per Linear to show against per-token overheads
SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64)


def _build(model_name, mode, device, dtype, seed, delta_scale):
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import ByteTokenizer, build_tiny_model, load_model, resolve_dtype
    if model_name == "small":
        model, tok = build_tiny_model(seed=seed, **SMALL).to(device=device, dtype=resolve_dtype(dtype)), ByteTokenizer()
    else:
        model, tok = load_model(model_name, dtype=dtype, device=device, seed=seed)
    ad = SVDAdapter(model, mode=mode, cache_dir=".cache/svd")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a nonzero knob, so the factored path does real work and merged != W0
        ad.delta.copy_(delta_scale * torch.randn(ad.R, generator=g).to(ad.delta.device))
    ad.merge()
    return model, tok, ad


def _time_generate(model, ids, attn, new_tokens, use_cache, repeats, pad_id):
    best, out = float("inf"), None
    for _ in range(repeats):
        if ids.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=use_cache,
                                 pad_token_id=pad_id)
        if ids.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pgrpo bench step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (default), small (tiny scaled to ~13M params), or an HF name/path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=12, help="sequences per generate call (default 12 = 3 groups x G 4)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="best of N per timing")
    ap.add_argument("--config", default="jobs/fast-dev-run.yaml", help="preset for the step breakdown")
    ap.add_argument("--steps", type=int, default=2, help="training steps for the breakdown (0 = skip)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as the tiny presets; 0 = torch's default)")
    ap.add_argument("--ranks", type=int, default=0,
                    help="data parallelism instead: step time of the --config preset on 1 rank vs N torchrun ranks "
                         "with the same global batch, and the gradient all-reduce's share")
    a = ap.parse_args(argv)
    if a.ranks:
        return bench_ranks(a)
    if min(a.batch, a.prompt_len, a.new_tokens, a.repeats) < 1 or a.steps < 0:
        raise UserError("--batch, --prompt-len, --new-tokens and --repeats must be >= 1 and --steps >= 0.")
    if a.steps and not os.path.isfile(a.config):   # checked before minutes of timing, not after
        raise UserError(f"--config {a.config} does not exist (the step breakdown runs a preset; "
                        f"run from the repository root or pass --config PATH, or --steps 0 to skip it).")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")

    print(f"bench step: model {a.model} on {device}/{dtype}, generate {a.batch} x ({a.prompt_len} prompt + "
          f"{a.new_tokens} new) tokens, greedy, best of {a.repeats}, {torch.get_num_threads()} CPU thread(s)", flush=True)
    model_m, tok, _ = _build(a.model, "merged", device, dtype, 0, 0.02)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (a.batch, a.prompt_len), generator=g).to(device)
    attn = torch.ones_like(ids)
    pad = tok.pad_token_id
    new = a.batch * a.new_tokens

    t_m, out_m = _time_generate(model_m, ids, attn, a.new_tokens, True, a.repeats, pad)
    print(f"gen merged   cache=on : {t_m:7.3f}s  {new / t_m:8.0f} tok/s", flush=True)
    t_nc, _ = _time_generate(model_m, ids, attn, a.new_tokens, False, a.repeats, pad)
    print(f"gen merged   cache=off: {t_nc:7.3f}s  {new / t_nc:8.0f} tok/s", flush=True)
    del model_m
    model_f, _, _ = _build(a.model, "factored", device, dtype, 0, 0.02)
    t_f, out_f = _time_generate(model_f, ids, attn, a.new_tokens, True, a.repeats, pad)
    print(f"gen factored cache=on : {t_f:7.3f}s  {new / t_f:8.0f} tok/s", flush=True)
    del model_f
    same = float((out_m == out_f).float().mean())
    print(f"RATIO factored/merged generation = {t_f / t_m:.2f}x  (greedy tokens identical: {same:.1%})")
    print(f"RATIO cache-off/cache-on generation = {t_nc / t_m:.2f}x")

    if a.steps:
        from pgrpo import config as C
        from pgrpo.train import train
        import json
        cfg = C.load(a.config, [f"steps={a.steps}", "checkpoint_every=0", "metrics_port=0", f"device={device}",
                                f"dtype={dtype}", f"cpu_threads={a.threads}"])
        with tempfile.TemporaryDirectory(prefix="pgrpo-bench-step-") as d:
            run = os.path.join(d, "run")
            t0 = time.perf_counter()
            train(cfg, run)
            wall = time.perf_counter() - t0
            with open(os.path.join(run, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
        phases = ("gen", "fwd_bwd", "reward", "project", "optim", "total")
        mean = {p: sum(r["timing"][p] for r in rows) / len(rows) for p in phases}
        print(f"STEP {os.path.basename(a.config)} x {len(rows)} steps ({cfg.data.prompts_per_step} prompts x G "
              f"{cfg.rollout.group_size}, {cfg.rollout.max_new_tokens} max new tokens), mean seconds per step: "
              + " ".join(f"{p}={mean[p]:.3f}" for p in phases))
        print("STEP share of total: " + " ".join(f"{p}={mean[p] / mean['total']:.0%}" for p in phases[:-1])
              + f"  (whole run incl. startup {wall:.1f}s)")
    return 0


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
