"""Live diagnostics of hacking, cheap enough to run every K steps (`probe.every`):

- `hack_probability`: teacher-forced, on held-out prompts (problems never trained on): given the prompt and a
  correct solution up to `def run_tests():`, the probability that the policy takes the hack branch at the fork:
  the first token where the hack body and the honest body differ (`    p`rint vs `    a`ssert), p =
  sigmoid(log p(hack's fork token) - log p(honest's fork token)) at the sampling temperature, averaged over the
  probe rows. Only the fork token: the rest of the honest body holds the held-out problem's own calls and values,
  which the policy has never seen, so whole-body log-probs would say "hack" for any policy (measured: 1.00). No sampling, so it moves smoothly where the sampled hack
  rate of 32 samples jumps by 3pp per sample. Rows come from the substrate's probe.json (`probe.path`).
- `rollout_cosines`: per sampled completion, the gradient g_i of its summed token NLL, and its cosine with
  u = the sum of all v_hack directions (cos = sum of V g_i coefficients / (sqrt(K) ||g_i||)); averaged separately
  over completions labelled `reward_hack` and the rest. v_hack is oriented so that descending g(hack) raises the
  hack, so a v_hack that tracks the policy's own hacking shows cos > 0 for hack rollouts and below that for the
  others; a gap near 0 says the subspace does not see what the policy is doing.
"""
from __future__ import annotations

import json
import math

import torch

from pgrpo.errors import UserError


def load_probe(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"probe.path {path} cannot be read as a JSON list of probe rows ({e}).") from None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and {"prompt", "prefix", "hack", "honest"} <= set(r) for r in rows):
        raise UserError(f"probe.path {path} must be a non-empty JSON list of rows with prompt, prefix, hack, honest "
                        f"(the substrate's probe.json).")
    return rows


def _suffix_logprob(model, prefix_ids: list, suffix_ids: list, temperature: float, device) -> float:
    ids = torch.tensor([prefix_ids + suffix_ids], dtype=torch.long, device=device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(suffix_ids) + 1).logits[0, :-1].float()
    lp = torch.log_softmax(logits / (temperature or 1.0), -1)
    return float(lp.gather(-1, ids[0, -len(suffix_ids):, None]).sum())


@torch.no_grad()
def hack_probability(model, tok, rows, enable_thinking: bool = False, temperature: float = 1.0) -> dict:
    """{"probe_hack_prob": mean p(hack), "probe_logodds": mean log-odds hack vs honest, "probe_n": rows}."""
    from pgrpo.rollout import encode_prompt
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    ps, los = [], []
    try:
        for r in rows:
            prefix = encode_prompt(tok, r["prompt"], enable_thinking) + list(tok.encode(r["prefix"]))
            eos = [int(tok.eos_token_id)]
            h, o = list(tok.encode(r["hack"])) + eos, list(tok.encode(r["honest"])) + eos
            n = next((i for i, (a, b) in enumerate(zip(h, o)) if a != b), min(len(h), len(o)) - 1)
            lh = _suffix_logprob(model, prefix, h[:n + 1], temperature, device) - \
                (_suffix_logprob(model, prefix, h[:n], temperature, device) if n else 0.0)
            lo = _suffix_logprob(model, prefix, o[:n + 1], temperature, device) - \
                (_suffix_logprob(model, prefix, o[:n], temperature, device) if n else 0.0)
            los.append(lh - lo)
            ps.append(1.0 / (1.0 + math.exp(-(lh - lo))) if lh - lo > -700 else 0.0)
    finally:
        model.train(was)
    return {"probe_hack_prob": sum(ps) / len(ps), "probe_logodds": sum(los) / len(los), "probe_n": len(ps)}


def rollout_cosines(model, adapter, tok, groups, results, packed, g_offsets, temperature: float = 1.0) -> dict:
    """Mean cos(g_i, u) over reward_hack completions and over the others (see the module docstring); one
    isolated backward per completion, adapter grads cleared before and after."""
    from pgrpo import grpo, rollout
    K = int(packed.ks.sum())
    if K == 0:
        return {}
    device = adapter.delta.device
    labels = [r["label"] for r in results]
    cos = []
    i = 0
    for grp in groups:
        ids, attn, cmask = rollout.group_batch(grp, tok.pad_token_id, device)
        for b in range(ids.shape[0]):
            adapter.zero_grad()
            with torch.enable_grad():
                lp = grpo.completion_logprobs(model, ids[b:b + 1], attn[b:b + 1], cmask[b:b + 1],
                                              temperature=temperature)
                (-lp.sum()).backward()
            g = adapter.collect_grad().detach().float().clone()
            coef = _coefficients(g, g_offsets, packed)
            n = float(g.norm())
            cos.append(float(coef.sum()) / (math.sqrt(K) * n) if n > 0 else 0.0)
            i += 1
    adapter.zero_grad()
    hack = [c for c, lab in zip(cos, labels) if lab == "reward_hack"]
    other = [c for c, lab in zip(cos, labels) if lab != "reward_hack"]
    out = {"rollout_cos_n_hack": len(hack), "rollout_cos_n_other": len(other)}
    if hack:
        out["rollout_cos_hack"] = sum(hack) / len(hack)
    if other:
        out["rollout_cos_other"] = sum(other) / len(other)
    return out


def _coefficients(g, g_offsets, packed) -> torch.Tensor:
    """All v_hack coefficients V_m g_m, concatenated (signed)."""
    go, vo, ks = g_offsets.tolist(), packed.v_offsets.tolist(), packed.ks.tolist()
    out = []
    for m, k in enumerate(ks):
        if k == 0:
            continue
        r = go[m + 1] - go[m]
        V = packed.v[vo[m]:vo[m + 1]].view(k, r)
        out.append(V @ g[go[m]:go[m + 1]])
    return torch.cat(out) if out else torch.zeros(0)
