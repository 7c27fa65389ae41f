"""v_hack: the reward-hack direction in the SVD basis of each adapted weight, and how it is found.

Sign convention (docs/method.md has the long form). For a completion y, g(y) is the gradient of its
mean-token NLL with respect to the flat knob delta. The GRPO loss is sum_i A_i * NLL_i, so with
advantage +1 on a hack and -1 on its clean twin the *loss gradient* is

    D = g(hack) - g(clean),

and the optimizer step -lr * D raises log p(hack) - log p(clean). v_hack is oriented along D. The trainer
projects the loss gradient g (the thing the optimizer descends): one-sided removes relu(V g) V, i.e. only
the part of g whose descent step moves toward hacks; a gradient that moves away from hacks (V g < 0) is
kept.

Extraction: one isolated backward per completion -> D per pair -> per module, SVD of the stacked D rows,
top-k right singular vectors, each sign-oriented by majority vote of the fit pairs, then a global
noise-floor cut over all modules' singular values. A held-out split (by pair, seeded) checks that unseen
hack-minus-clean gradients project positively on v_hack, next to a random-direction null.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch

from pgrpo import ops
from pgrpo.errors import UserError
from pgrpo.model import resolve_device_dtype

# ----------------------------------------------------------------------------- gradients per completion


def _prompt_ids(tokenizer, prompt, enable_thinking: bool = False) -> list:
    """A pair's prompt is chat messages, rendered exactly as the trainer renders them (`rollout.encode_prompt`,
    with the config's `rollout.enable_thinking`: for Qwen3 the two renderings differ), or already-rendered text."""
    if isinstance(prompt, str):
        return _encode(tokenizer, prompt)
    from pgrpo.rollout import encode_prompt
    return encode_prompt(tokenizer, list(prompt), enable_thinking)


def _encode(tokenizer, text: str) -> list:
    return list(tokenizer.encode(text))  # pgrpo.model tokenizers add no special tokens here


def pair_ids(tokenizer, prompt, completion: str, max_tokens: int | None = None, enable_thinking: bool = False):
    """(prompt ids, completion ids + EOS) as one extraction input. `max_tokens` truncates the prompt from the left;
    the completion is what we measure and stays whole."""
    if not completion:
        raise UserError("an extraction completion is empty.")
    p_ids = _prompt_ids(tokenizer, prompt, enable_thinking)
    c_ids = _encode(tokenizer, completion)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        c_ids = c_ids + [int(eos)]
    if max_tokens is not None and len(p_ids) + len(c_ids) > max_tokens:
        p_ids = p_ids[-max(1, max_tokens - len(c_ids)):]
    return p_ids, c_ids


def _completion_nll(model, tokenizer, prompt, completion: str, max_tokens: int | None, device,
                    enable_thinking: bool = False) -> torch.Tensor:
    """Summed token NLL of `completion` (+ EOS, as a sampled one would end) after the rendered `prompt`: the
    gradient GRPO's token loss gives one completion (up to the step's denominator). Summed, not averaged, so
    that two completions sharing a prefix (a pair that differs only in the exploit) have exactly the same
    prefix terms, which cancel in D = g(hack) - g(clean)."""
    p_ids, c_ids = pair_ids(tokenizer, prompt, completion, max_tokens, enable_thinking)
    ids = torch.tensor([p_ids + c_ids], dtype=torch.long, device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0, len(p_ids) - 1:-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, len(p_ids):], reduction="sum")


@torch.no_grad()
def completion_nll(model, adapter, tokenizer, prompt, completion: str, max_tokens: int | None = None,
                   enable_thinking: bool = False) -> float:
    """The summed token NLL that `completion_grad` differentiates (no grad), at the adapter's current knob."""
    return float(_completion_nll(model, tokenizer, prompt, completion, max_tokens, adapter.delta.device,
                                 enable_thinking))


def completion_grad(model, adapter, tokenizer, prompt, completion: str, max_tokens: int | None = None,
                    enable_thinking: bool = False) -> torch.Tensor:
    """d(summed token NLL of `completion` given `prompt`)/d(delta), fp32 [R], from one isolated backward.

    Adapter grads are cleared before and after, so this never mixes with, or leaves anything in, a
    training step's accumulation. Merged mode needs merged weights that match the knob (run_extraction
    makes sure of that).
    """
    adapter.zero_grad()
    with torch.enable_grad():
        _completion_nll(model, tokenizer, prompt, completion, max_tokens, adapter.delta.device,
                        enable_thinking).backward()
    g = adapter.collect_grad().detach().float().clone()
    adapter.zero_grad()
    return g


def pair_grads(model, adapter, tokenizer, pairs, max_tokens: int | None = None, log=None,
               enable_thinking: bool = False, comm=None):
    """(G_hack, G_clean), each [n_pairs, R] on the CPU: g(hack_i) and g(clean_i), one backward each.

    With `comm` (a `pgrpo.dist.Comm` on N ranks) each rank computes its contiguous share of the pairs and the
    rows are gathered in pair order: every backward is isolated, so the rows are the 1-rank ones, bit for bit."""
    if comm is not None and comm.distributed:
        lo, hi = comm.shard(len(pairs))
        if not pairs:
            raise UserError("no pairs to extract v_hack from.")
        mine = [torch.zeros(0, adapter.R)] * 2
        if hi > lo:
            mine = pair_grads(model, adapter, tokenizer, pairs[lo:hi], max_tokens, log, enable_thinking)
        return (comm.all_reduce_rows(mine[0], "the v_hack gradient gather"),
                comm.all_reduce_rows(mine[1], "the v_hack gradient gather"))
    gh_rows, gc_rows = [], []
    t0 = time.time()
    for i, p in enumerate(pairs):
        gh_rows.append(completion_grad(model, adapter, tokenizer, p["prompt"], p["hack"], max_tokens,
                                       enable_thinking).cpu())
        gc_rows.append(completion_grad(model, adapter, tokenizer, p["prompt"], p["clean"], max_tokens,
                                       enable_thinking).cpu())
        if log is not None and ((i + 1) % 10 == 0 or i + 1 == len(pairs)):
            log(f"extract: gradients for {i + 1}/{len(pairs)} pairs ({time.time() - t0:.1f}s)")
    if not gh_rows:
        raise UserError("no pairs to extract v_hack from.")
    return torch.stack(gh_rows), torch.stack(gc_rows)


def normalize_rows(D: torch.Tensor) -> torch.Tensor:
    """Per-pair normalisation: every row of D scaled to unit norm (a zero row stays zero). Pairs whose
    gradients are 100x larger (e.g. an off-policy text the model never saw vs its own kind of text) would
    otherwise decide the SVD alone; normalised, each pair gets one vote on the direction."""
    n = D.norm(dim=1, keepdim=True)
    return D / torch.where(n > 0, n, torch.ones_like(n))


def pair_diffs(model, adapter, tokenizer, pairs, max_tokens: int | None = None, log=None) -> torch.Tensor:
    """D [n_pairs, R]: row i = g(hack_i) - g(clean_i), the loss gradient of GRPO with A=+1 hack, -1 clean."""
    gh, gc = pair_grads(model, adapter, tokenizer, pairs, max_tokens, log)
    return gh - gc


# ----------------------------------------------------------------------------- the fit (pure math)


def split_pairs(n: int, heldout: float, seed: int, groups: list | None = None) -> tuple[list, list]:
    """Seeded split of pair indices into (fit, held-out); disjoint, fit never empty.

    With `groups` (one key per pair, e.g. its problem id) whole groups go to one side, so a held-out pair never
    shares its problem (its prompt) with a fit pair: the report then measures generalisation to unseen problems,
    not recall of a prompt's gradient. The held-out side takes shuffled groups until it has about heldout * n pairs.
    """
    if not 0.0 <= heldout < 1.0:
        raise UserError(f"heldout must be in [0, 1), got {heldout}.")
    n_held = int(round(heldout * n))
    if heldout > 0 and n >= 2:
        n_held = max(1, n_held)
    n_held = min(n_held, n - 1)
    keys = list(range(n)) if groups is None else list(groups)
    if len(keys) != n:
        raise ValueError(f"split_pairs: {len(keys)} group keys for {n} pairs")
    order = sorted(set(keys), key=str)
    random.Random(seed).shuffle(order)
    members = {g: [i for i in range(n) if keys[i] == g] for g in order}
    held = []
    for g in order:
        if len(held) >= n_held or len(held) + len(members[g]) > n - 1:
            continue
        held += members[g]
    held = sorted(held)
    fit = sorted(set(range(n)) - set(held))
    return fit, held


def _blocks(names, offsets):
    return [(name, offsets[m], offsets[m + 1]) for m, name in enumerate(names)]


def orient(V: torch.Tensor, Dm: torch.Tensor) -> torch.Tensor:
    """Flip each row of V so that the majority of the fit pairs' D project positively on it.

    A tied vote is broken by the sign of the summed projection (and + when that is exactly 0).
    """
    c = Dm @ V.T  # [n, k]
    votes = torch.sign(c).sum(0)
    tie_break = torch.sign(c.sum(0))
    s = torch.where(votes != 0, torch.sign(votes), tie_break)
    s = torch.where(s == 0, torch.ones_like(s), s)
    return V * s[:, None]


def noise_floor_cut(S: dict, cut: float) -> dict:
    """How many directions each module keeps after dropping the bottom `cut` fraction of all singular
    values pooled across modules. Values are per module in descending order, so a module keeps a prefix;
    ties at the threshold are broken by module order then index, deterministically. Returns {name: k_kept}.
    """
    if not 0.0 <= cut < 1.0:
        raise UserError(f"cut must be in [0, 1), got {cut}.")
    pooled = [(float(s), name, j) for name, sv in S.items() for j, s in enumerate(sv.tolist())]
    n_drop = int(math.floor(cut * len(pooled)))
    order = sorted(range(len(pooled)), key=lambda t: (pooled[t][0], -list(S).index(pooled[t][1]), -pooled[t][2]))
    dropped = {(pooled[t][1], pooled[t][2]) for t in order[:n_drop]}
    keep = {}
    for name, sv in S.items():
        k = 0
        for j in range(sv.numel()):
            if (name, j) in dropped:
                break
            k += 1
        keep[name] = k
    return keep


def _contrast_eig(Dm: torch.Tensor, Nm: torch.Tensor, alpha: float):
    """Top eigenpairs of C = Dm^T Dm - alpha * (n/m) Nm^T Nm, computed in the span of the rows (rank <= n+m,
    so a 2560-wide module costs an (n+m)-sized eigh). Returns (sqrt of the positive eigenvalues, rows)."""
    n, m = Dm.shape[0], Nm.shape[0]
    Q, _ = torch.linalg.qr(torch.cat([Dm, Nm]).T)          # [r, n+m], orthonormal columns
    Dq, Nq = Dm @ Q, Nm @ Q
    C = Dq.T @ Dq - alpha * (n / m) * (Nq.T @ Nq)
    w, U = torch.linalg.eigh(C)
    w, U = w.flip(0), U.flip(1)
    pos = w > 0
    return w[pos].sqrt(), (Q @ U[:, pos]).T


def contrast_rows(GH: torch.Tensor, GC: torch.Tensor, idx, seed: int) -> torch.Tensor:
    """Zero-sum contrasts that are not hack vs clean, over the pairs `idx`: g(clean_i) - g(clean_j) and
    g(hack_i) - g(hack_j), j a seeded derangement of i (what `--contrast` steers v_hack away from)."""
    idx = list(idx)
    if len(idx) < 2:
        return torch.zeros(0, GH.shape[1], dtype=GH.dtype)
    perm = idx[:]
    random.Random(seed + 1).shuffle(perm)
    j = perm[1:] + perm[:1]                                 # cyclic shift of a shuffle: never i == j
    return torch.cat([GC[perm] - GC[j], GH[perm] - GH[j]])


def fit_vhack(D: torch.Tensor, names, offsets, k: int = 4, cut: float = 0.25, N: torch.Tensor | None = None,
              contrast: float = 0.0) -> tuple[dict, dict]:
    """Per module: SVD of the stacked D rows, top-k right singular vectors, majority-vote orientation;
    then the global noise-floor cut. Returns (V {name: [k_m, r_m] fp32}, S {name: [k_m] fp32}); modules
    left with nothing are absent (the projection passes them through).

    contrast > 0 (with N, rows of non-hack zero-sum gradients, see contrast_rows): instead of the SVD,
    the top eigenvectors of D^T D - contrast * (n/m) N^T N (contrastive PCA): directions where
    hack-vs-clean gradients have more energy than generic ones; S is the root of the eigenvalue. 0 = plain SVD.
    """
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}.")
    if contrast < 0:
        raise UserError(f"contrast must be >= 0, got {contrast}.")
    use_contrast = contrast > 0 and N is not None and N.shape[0] > 0
    D = D.double()
    V_all, S_all = {}, {}
    for name, a, b in _blocks(names, offsets):
        Dm = D[:, a:b]
        if Dm.shape[1] == 0:
            continue
        if use_contrast:
            S, Vh = _contrast_eig(Dm, N[:, a:b].double(), contrast)
        else:
            _, S, Vh = torch.linalg.svd(Dm, full_matrices=False)
        kk = min(k, S.numel())
        if kk == 0:
            continue
        V_all[name] = orient(Vh[:kk], Dm)
        S_all[name] = S[:kk]
    keep = noise_floor_cut(S_all, cut)
    # a (numerically) zero singular value has an arbitrary vector: never keep one, whatever the cut
    tiny = 1e-9 * max((float(sv[0]) for sv in S_all.values() if sv.numel()), default=0.0)
    V_out, S_out = {}, {}
    for name in V_all:
        kk = min(keep[name], int((S_all[name] > tiny).sum()))
        if kk == 0:
            continue
        V_out[name] = V_all[name][:kk].float().contiguous()
        S_out[name] = S_all[name][:kk].float().contiguous()
    return V_out, S_out


def random_vhack(like: dict, D_fit: torch.Tensor, names, offsets, seed: int) -> dict:
    """The null: random orthonormal rows with the same k per module, oriented by the same majority vote."""
    gen = torch.Generator().manual_seed(seed + 7919)
    out = {}
    for name, a, b in _blocks(names, offsets):
        if name not in like:
            continue
        k, r = like[name].shape
        Q, _ = torch.linalg.qr(torch.randn(r, k, generator=gen, dtype=torch.float64))
        out[name] = orient(Q.T.contiguous(), D_fit[:, a:b].double()).float()
    return out


def _random_signs(V: dict, seed: int) -> dict:
    """Orient a null's rows by coin flips: no hack label, no D mean (majority vote on D would hand any
    subspace the right sign, since all hack pairs share a large common direction)."""
    gen = torch.Generator().manual_seed(seed + 104729)
    out = {}
    for name, v in V.items():
        s = torch.randint(0, 2, (v.shape[0],), generator=gen).to(v.dtype) * 2 - 1
        out[name] = (v * s[:, None]).contiguous()
    return out


def anisotropic_null(like: dict, G: torch.Tensor, names, offsets, seed: int) -> dict:
    """Random null matched to the gradients' anisotropy: per module, k random Gaussian mixtures of the rows of
    G (per-completion gradients, label-blind), orthonormalised, i.e. random directions drawn from the span
    and energy profile the gradients actually occupy (an isotropic draw would be far easier to beat).
    Signs are coin flips (`_random_signs`)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    out = {}
    for name, a, b in _blocks(names, offsets):
        if name not in like:
            continue
        k = like[name].shape[0]
        Gm = G[:, a:b].double()
        Z = torch.randn(k, Gm.shape[0], generator=gen, dtype=torch.float64)
        Q, _ = torch.linalg.qr((Z @ Gm).T)
        out[name] = Q.T[:k].float().contiguous()
    return _random_signs(out, seed)


def generic_null(like: dict, N: torch.Tensor, names, offsets, seed: int) -> dict:
    """Generic-gradient null: per module, the top-k right singular vectors of zero-sum contrasts that are not
    hack vs clean (clean_i - clean_j, hack_i - hack_j: `contrast_rows`, no hack label), k matched to v_hack's,
    coin-flip signs. It captures "what GRPO gradients on these texts look like", not the exploit."""
    out = {}
    Nn = normalize_rows(N)
    for name, a, b in _blocks(names, offsets):
        if name not in like:
            continue
        _, _, Vh = torch.linalg.svd(Nn[:, a:b].double(), full_matrices=False)
        out[name] = Vh[:like[name].shape[0]].float().contiguous()
    return _random_signs(out, seed)


def compare(real: dict, null: dict, key: str = "captured_fraction") -> dict:
    """v_hack vs a null on the same held-out pairs: mean paired difference of `key`, its t interval over pairs,
    and `beats` = the whole 95% interval is above 0 (v_hack takes more of every unseen D than the null)."""
    a = [p[key] for p in real["per_pair"]]
    b = [p[key] for p in null["per_pair"]]
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        return {"key": key, "diff": None, "ci": None, "beats": False, "n": 0}
    m = sum(d) / n
    if n < 2:
        return {"key": key, "diff": m, "ci": None, "beats": False, "n": n}
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    from pgrpo.report import t_ppf
    half = t_ppf(0.975, n - 1) * sd / math.sqrt(n)
    return {"key": key, "diff": m, "ci": [m - half, m + half], "beats": bool(m - half > 0), "n": n}


def project(g: torch.Tensor, V: dict, names, ranks, overshoot: float = 1.0, one_sided: bool = True):
    """Project a flat loss gradient with the trainer's op (ops.project_); returns (new g, stats [M,2])."""
    g = g.detach().float().clone()
    packed = ops.pack_vhack(names, ranks, V, device=g.device)
    offs = torch.tensor([0] + list(_cumsum(ranks)), dtype=torch.int64, device=g.device)
    stats = ops.project_(g, offs, packed.v, packed.v_offsets, packed.ks, overshoot, one_sided)
    return g, stats


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


def evaluate(D_held: torch.Tensor, D_fit: torch.Tensor, V: dict, names, offsets) -> dict:
    """How held-out hack-minus-clean gradients sit on a v_hack set (real or null), over the modules in V.

    Per held-out pair, with D restricted to the modules that have directions:
    - cosine: cos(D, u) where u = block-concat of sum_j s_mj v_mj and s_mj = ||D_fit,m v_mj|| (the fit
      singular value for the real v_hack); positive = the pair projects on the hack side. accuracy = share
      of pairs with cosine > 0.
    - coef_accuracy: share of all (module, direction) coefficients v_mj . D_m that are > 0.
    - removed_fraction: ||relu(V D) V|| / ||D||, what the one-sided projection would erase from that
      pair's GRPO gradient (a random k-dim subspace of an r-dim module erases about sqrt(k/(2r))).
    """
    blocks = [(name, a, b) for name, a, b in _blocks(names, offsets) if name in V]
    if not blocks or D_held.shape[0] == 0:
        return {"n_pairs": int(D_held.shape[0]), "accuracy": None, "mean_cosine": None,
                "coef_accuracy": None, "removed_fraction": None, "captured_fraction": None, "per_pair": []}
    n = D_held.shape[0]
    dot_u = torch.zeros(n, dtype=torch.float64)       # D . u per pair
    d_sq = torch.zeros(n, dtype=torch.float64)        # ||D||^2 over the modules in V
    removed_sq = torch.zeros(n, dtype=torch.float64)  # ||relu(V D) V||^2 = ||relu(V D)||^2 (orthonormal rows)
    captured_sq = torch.zeros(n, dtype=torch.float64)  # ||V D||^2: the two-sided (orientation-free) share
    u_sq, pos_coef, tot_coef = 0.0, 0, 0
    for name, a, b in blocks:                          # one small matmul per module, all pairs at once
        Vm = V[name].double()
        s = (D_fit[:, a:b].double() @ Vm.T).norm(dim=0)  # [k]
        um = s @ Vm
        u_sq += float(um @ um)
        Dm = D_held[:, a:b].double()
        c = Dm @ Vm.T                                  # [n, k]
        dot_u += Dm @ um
        d_sq += (Dm * Dm).sum(1)
        removed_sq += (c.clamp_min(0) ** 2).sum(1)
        captured_sq += (c ** 2).sum(1)
        pos_coef += int((c > 0).sum())
        tot_coef += c.numel()
    dn = d_sq.sqrt()
    cos = dot_u / (dn * math.sqrt(u_sq) + 1e-30)
    rem = removed_sq.sqrt() / (dn + 1e-30)
    cap = captured_sq.sqrt() / (dn + 1e-30)
    per_pair = [{"cosine": float(cos[i]), "positive": bool(cos[i] > 0), "removed_fraction": float(rem[i]),
                 "captured_fraction": float(cap[i])} for i in range(n)]
    n = len(per_pair)
    return {
        "n_pairs": n,
        "accuracy": sum(p["positive"] for p in per_pair) / n,
        "mean_cosine": sum(p["cosine"] for p in per_pair) / n,
        "coef_accuracy": pos_coef / max(tot_coef, 1),
        "removed_fraction": sum(p["removed_fraction"] for p in per_pair) / n,
        "captured_fraction": sum(p["captured_fraction"] for p in per_pair) / n,
        "per_pair": per_pair,
    }


def leave_one_style_out(GH: torch.Tensor, GC: torch.Tensor, pairs, names, offsets, k: int, cut: float, seed: int,
                        contrast: float = 0.0) -> dict:
    """Generalisation to an unseen kind of hack: for each style, fit on all other styles' pairs and
    evaluate on that style's pairs (v_hack vs the random null). Linear algebra only (gradients are reused)."""
    D = normalize_rows(GH - GC)
    styles = sorted({p.get("style") for p in pairs if p.get("style")})
    out = {}
    if len(styles) < 2:
        return out
    for s in styles:
        held = [i for i, p in enumerate(pairs) if p.get("style") == s]
        fit = [i for i, p in enumerate(pairs) if p.get("style") != s]
        N = contrast_rows(GH, GC, fit, seed) if contrast > 0 else None
        V, _ = fit_vhack(D[fit], names, offsets, k=k, cut=cut, N=N, contrast=contrast)
        r = evaluate(D[held], D[fit], V, names, offsets)
        n = evaluate(D[held], D[fit], anisotropic_null(V, torch.cat([GH[fit], GC[fit]]), names, offsets, seed),
                     names, offsets)
        out[s] = {"n_pairs": len(held), **{f"{key}": r[key] for key in ("accuracy", "mean_cosine", "removed_fraction")},
                  **{f"null_{key}": n[key] for key in ("accuracy", "mean_cosine", "removed_fraction")}}
    return out


def collateral(GH, GC, held_idx, D_fit, V, names, offsets, seed) -> dict:
    """What else the one-sided projection removes (held-out pairs; v_hack vs null): GRPO gradients that
    are not a hack-vs-clean contrast. `penalize_hack` (-g(hack)) and `reinforce_clean` (g(clean)) should
    lose ~nothing; `clean_vs_clean` / `hack_vs_hack` (g(x_i) - g(x_j) across held-out pairs, a zero-sum
    group like GRPO's) measure how much generic gradient energy v_hack's subspace captures."""
    if len(held_idx) < 2:
        return {}
    j = held_idx[1:] + held_idx[:1]
    fit = sorted(set(range(GH.shape[0])) - set(held_idx))
    V_null = anisotropic_null(V, torch.cat([GH[fit], GC[fit]]), names, offsets, seed)
    out = {}
    for key, X in (("reinforce_hack", GH[held_idx]), ("penalize_hack", -GH[held_idx]),
                   ("reinforce_clean", GC[held_idx]), ("penalize_clean", -GC[held_idx]),
                   ("clean_vs_clean", GC[held_idx] - GC[j]), ("hack_vs_hack", GH[held_idx] - GH[j])):
        r, n = evaluate(X, D_fit, V, names, offsets), evaluate(X, D_fit, V_null, names, offsets)
        out[key] = {"removed_fraction": r["removed_fraction"], "mean_cosine": r["mean_cosine"],
                    "null_removed_fraction": n["removed_fraction"], "null_mean_cosine": n["mean_cosine"]}
    return out


def vhack_overlap(old: dict, new: dict) -> float:
    """Basis overlap of two v_hack sets: mean over modules (union) of ||V_old V_new^T||_F^2 / k, with k the
    larger of the two ranks; 1 = same subspaces, 0 = orthogonal (a module present in only one counts 0)."""
    names = list(dict.fromkeys(list(old) + list(new)))
    if not names:
        return 1.0
    tot = 0.0
    for name in names:
        a, b = old.get(name), new.get(name)
        if a is None or b is None or a.numel() == 0 or b.numel() == 0:
            continue
        M = a.double().cpu() @ b.double().cpu().T
        tot += float((M ** 2).sum()) / max(a.shape[0], b.shape[0])
    return tot / len(names)


# ----------------------------------------------------------------------------- end-to-end extraction


@dataclass
class Extraction:
    V: dict
    S: dict
    fit_idx: list
    held_idx: list
    report: dict = field(default_factory=dict)
    seconds: float = 0.0


class _hack_knob_off:
    """Route arm: extraction sees the deployed policy, so the quarantine knob is switched off meanwhile
    (the adapter re-merges on each toggle). Also makes sure merged weights match the current knob."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.was_on = getattr(adapter, "delta_hack", None) is not None and adapter.hack_enabled

    def __enter__(self):
        if self.was_on:
            self.adapter.hack_enabled = False
        else:
            self.adapter.merge()  # a no-op in factored mode
        return self

    def __exit__(self, *exc):
        if self.was_on:
            self.adapter.hack_enabled = True
        return False


def run_extraction(model, adapter, tokenizer, pairs, k: int = 4, cut: float = 0.25, heldout: float = 0.0,
                   seed: int = 0, max_tokens: int | None = None, log=None, contrast: float = 0.0,
                   enable_thinking: bool = False, placebo=None, comm=None) -> Extraction:
    """Gradients for every pair (split over the ranks of `comm`, if given), per-pair normalised D, fit on the
    fit split, report on the held-out split (if any) against three nulls (random with the gradients'
    anisotropy, generic-gradient, and the placebo fit on `placebo` pairs when given)."""
    t0 = time.time()
    pids = [p.get("problem_id") if isinstance(p, dict) else None for p in pairs]
    fit_idx, held_idx = split_pairs(len(pairs), heldout, seed, groups=pids if None not in pids else None)
    was_training = model.training
    model.eval()  # no dropout: the gradient of the policy as it samples
    try:
        with _hack_knob_off(adapter):
            GH, GC = pair_grads(model, adapter, tokenizer, pairs, max_tokens=max_tokens, log=log,
                                enable_thinking=enable_thinking, comm=comm)
            if placebo and held_idx:
                held_problems = {pids[i] for i in held_idx}
                placebo = [p for p in placebo if p.get("problem_id") not in held_problems]   # never a held-out prompt
                PH, PC = pair_grads(model, adapter, tokenizer, placebo, max_tokens=max_tokens, log=log,
                                    enable_thinking=enable_thinking, comm=comm) if placebo else (None, None)
    finally:
        model.train(was_training)
    D = normalize_rows(GH - GC)
    names, offsets = list(adapter.names), list(adapter.offsets)
    D_fit = D[fit_idx]
    N_fit = contrast_rows(GH, GC, fit_idx, seed) if contrast > 0 else None
    V, S = fit_vhack(D_fit, names, offsets, k=k, cut=cut, N=N_fit, contrast=contrast)
    if comm is not None:   # rank 0's fit on every rank: the ranks must project against the very same v_hack
        V, S = comm.broadcast((V, S), "the v_hack broadcast")
    report = {"n_pairs": len(pairs), "n_fit": len(fit_idx), "n_heldout": len(held_idx), "k": k, "cut": cut,
              "contrast": contrast, "seed": seed, "modules_total": len(names), "modules_kept": len(V),
              "directions_kept": int(sum(v.shape[0] for v in V.values())), "normalisation": "per-pair unit norm",
              "reduction": "sum"}
    if held_idx:
        D_held = D[held_idx]
        real = evaluate(D_held, D_fit, V, names, offsets)
        nulls = {"random": anisotropic_null(V, torch.cat([GH[fit_idx], GC[fit_idx]]), names, offsets, seed),
                 "generic": generic_null(V, contrast_rows(GH, GC, fit_idx, seed), names, offsets, seed)}
        if placebo:
            Vp, _ = fit_vhack(normalize_rows(PH - PC), names, offsets, k=k, cut=0.0)
            nulls["placebo"] = {n: Vp[n][:V[n].shape[0]] for n in V if n in Vp}
        report["heldout"] = real
        report["nulls"] = {}
        for key, Vn in nulls.items():
            ev = evaluate(D_held, D_fit, Vn, names, offsets)
            report["nulls"][key] = {**{m: ev[m] for m in ("accuracy", "mean_cosine", "removed_fraction",
                                                          "captured_fraction")},
                                    "vs_vhack_captured": compare(real, ev, "captured_fraction"),
                                    "vs_vhack_removed": compare(real, ev, "removed_fraction")}
        report["beats"] = {key: v["vs_vhack_captured"]["beats"] and v["vs_vhack_removed"]["beats"]
                           for key, v in report["nulls"].items()}
        report["null"] = evaluate(D_held, D_fit, nulls["random"], names, offsets)   # the old key: the random null
        for p, i in zip(real["per_pair"], held_idx):
            p["pair"] = i
            p["problem_id"] = pairs[i].get("problem_id")
            p["style"] = pairs[i].get("style")
        report["leave_one_style_out"] = leave_one_style_out(GH, GC, pairs, names, offsets, k, cut, seed, contrast)
        report["collateral"] = collateral(GH, GC, held_idx, D_fit, V, names, offsets, seed)
    return Extraction(V=V, S=S, fit_idx=fit_idx, held_idx=held_idx, report=report, seconds=time.time() - t0)


def extract_vhack(model, adapter, tokenizer, pairs, k: int = 4, cut: float = 0.25, seed: int = 0,
                  max_tokens: int | None = None, log=None, contrast: float = 0.0, enable_thinking: bool = False,
                  comm=None) -> dict:
    """The trainer's refresh entry point: v_hack {name: V [k_m, r_m] fp32} from all pairs at the current
    knobs (quarantine knob off). Leaves the adapter's grads cleared and its merge state as it found it.
    With `comm` on N ranks the pairs are split across the ranks (see pair_grads)."""
    return run_extraction(model, adapter, tokenizer, pairs, k=k, cut=cut, heldout=0.0, seed=seed,
                          max_tokens=max_tokens, log=log, contrast=contrast, enable_thinking=enable_thinking,
                          comm=comm).V


# ----------------------------------------------------------------------------- file format


def save_vhack(path, V: dict, S: dict, metadata: dict | None = None) -> None:
    """safetensors with V/<module> [k, r] and S/<module> [k]; metadata values are stored as strings."""
    from safetensors.torch import save_file
    tensors = {}
    for name, v in V.items():
        tensors[f"V/{name}"] = v.detach().float().cpu().contiguous()
        tensors[f"S/{name}"] = S[name].detach().float().cpu().contiguous()
    meta = {str(a): (b if isinstance(b, str) else json.dumps(b)) for a, b in (metadata or {}).items()}
    meta["modules"] = json.dumps(list(V))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_vhack(path) -> tuple[dict, dict, dict]:
    """(V {name: [k, r] fp32}, S {name: [k] fp32}, metadata {str: str}) in the saved module order."""
    from safetensors import safe_open
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: v_hack file not found (run `pgrpo extract` or `make extract`).")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = set(f.keys())
            order = json.loads(meta.get("modules", "[]")) or sorted(k[2:] for k in keys if k.startswith("V/"))
            V = {n: f.get_tensor(f"V/{n}").float() for n in order}
            S = {n: f.get_tensor(f"S/{n}").float() if f"S/{n}" in keys else torch.zeros(V[n].shape[0]) for n in order}
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise UserError(f"{path}: not a readable v_hack file ({e}).") from None
    for n, v in V.items():   # a NaN/inf row would poison every projected step (and Adam's moments) silently
        if not torch.isfinite(v).all() or not torch.isfinite(S[n]).all():
            raise UserError(f"{path}: v_hack of module {n} holds non-finite values (NaN or inf); re-extract it.")
    return V, S, meta


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def format_report(rep: dict) -> str:
    lines = [f"v_hack: {rep['modules_kept']}/{rep['modules_total']} modules, {rep['directions_kept']} directions "
             f"(k={rep['k']}, cut={rep['cut']}, contrast={rep.get('contrast', 0.0)}), fit on {rep['n_fit']} pairs, held out {rep['n_heldout']}"]
    if "heldout" in rep:
        h = rep["heldout"]

        def f(x):
            return "n/a" if x is None else f"{x:.3f}"
        lines.append(f"{'held-out D':18}{'accuracy':>10}{'mean_cos':>10}{'removed':>10}{'captured':>10}  v_hack beats it?")
        lines.append(f"{'v_hack':18}{f(h['accuracy']):>10}{f(h['mean_cosine']):>10}{f(h['removed_fraction']):>10}"
                     f"{f(h.get('captured_fraction')):>10}")
        for key, r in (rep.get("nulls") or {}).items():
            c = r["vs_vhack_captured"]
            lines.append(f"{key + ' null':18}{f(r['accuracy']):>10}{f(r['mean_cosine']):>10}"
                         f"{f(r['removed_fraction']):>10}{f(r['captured_fraction']):>10}  "
                         f"{'yes' if rep['beats'][key] else 'NO'} (captured {c['diff']:+.3f})")
    sc = rep.get("collateral") or {}
    if sc:
        lines.append("collateral: one-sided removed fraction of other GRPO gradients (held-out; v_hack/null):")
        lines.append("  " + ", ".join(f"{key} {v['removed_fraction']:.2f}/{v['null_removed_fraction']:.2f}"
                                      for key, v in sc.items()))
    lo = rep.get("leave_one_style_out") or {}
    if lo and all(v["mean_cosine"] is not None for v in lo.values()):
        worst = min(lo, key=lambda s: lo[s]["mean_cosine"])
        mean = sum(v["mean_cosine"] for v in lo.values()) / len(lo)
        null = sum(v["null_mean_cosine"] for v in lo.values()) / len(lo)
        beat = sum(v["mean_cosine"] > v["null_mean_cosine"] for v in lo.values())
        lines.append(f"leave-one-style-out: mean cosine {mean:.3f} vs null {null:.3f}; v_hack beats the null on "
                     f"{beat}/{len(lo)} unseen styles (weakest: {worst} {lo[worst]['mean_cosine']:.3f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- `pgrpo extract`


def report_path(out) -> str:
    """vhack.safetensors -> vhack.report.json (next to it)."""
    out = os.fspath(out)
    base = out[: -len(".safetensors")] if out.endswith(".safetensors") else out
    return base + ".report.json"


def config_hash(cfg) -> str:
    """Hash of everything in a config that changes the gradients extraction sees (model, seed of the
    embedded model, dtype, adapter layout and mode); the run's other keys (steps, lr, ...) do not count."""
    device, dtype = resolve_device_dtype(cfg)
    key = {"model": cfg.model.name, "seed": cfg.seed, "dtype": dtype,
           "targets": list(cfg.adapter.targets), "layers": cfg.adapter.layers, "mode": cfg.adapter.mode}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_model_adapter(cfg):
    """(model, adapter, tokenizer) as the trainer builds them from a config (fresh knobs, step 0)."""
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import load_model
    device, dtype = resolve_device_dtype(cfg)
    model, tok = load_model(cfg.model.name, dtype=dtype, device=device, seed=cfg.seed)
    adapter = SVDAdapter(model, targets=tuple(cfg.adapter.targets), layers=cfg.adapter.layers,
                         mode=cfg.adapter.mode, cache_dir=cfg.adapter.svd_cache_dir)
    return model, adapter, tok


CACHE_KEYS = ("pairs_sha256", "model", "k", "cut", "contrast", "heldout", "split", "seed", "config_hash", "max_tokens",
              "enable_thinking", "reduction", "normalisation", "placebo_sha256")


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="pgrpo extract",
                                 description="Extract v_hack from contrastive pairs at the config's model/adapter.")
    ap.add_argument("--config", required=True, help="job preset (model, adapter, seed, device, dtype)")
    ap.add_argument("--out", required=True, help="output .safetensors (the report goes next to it)")
    ap.add_argument("--pairs", help="pairs file (default: the config's arm.refresh_pairs, else the shipped pairs.json)")
    ap.add_argument("--k", type=int, default=4, help="directions per module before the cut (default 4)")
    ap.add_argument("--cut", type=float, default=0.25, help="drop this bottom fraction of all singular values (default 0.25)")
    ap.add_argument("--contrast", type=float, default=0.0,
                    help="contrastive PCA weight: steer v_hack away from generic (clean-vs-clean, hack-vs-hack) "
                         "gradient directions; 0 = plain SVD of D (default)")
    ap.add_argument("--heldout", type=float, default=0.2, help="fraction of pairs held out for validation (default 0.2)")
    ap.add_argument("--seed", type=int, default=None, help="split/null seed (default: the config's seed)")
    ap.add_argument("--max-tokens", type=int, default=None, help="truncate prompt+completion to this many tokens (left)")
    ap.add_argument("--placebo", help="placebo pairs (a contrast that is not the exploit, e.g. the substrate's "
                                      "placebo.json): fit the same way and reported as a null")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--force", action="store_true", help="re-extract even if --out is up to date")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 for the embedded tiny model on cpu, else torch's default)")
    a = ap.parse_args(argv)
    if a.k < 1:
        raise UserError(f"--k must be >= 1, got {a.k}.")
    if not 0 <= a.cut < 1:
        raise UserError(f"--cut must be in [0, 1), got {a.cut}.")
    if a.contrast < 0:
        raise UserError(f"--contrast must be >= 0, got {a.contrast}.")
    if not 0 <= a.heldout < 1:
        raise UserError(f"--heldout must be in [0, 1), got {a.heldout}.")

    from pgrpo import config as C
    from pgrpo.data.pairs import DEFAULT_PATH, load_pairs, pairs_sha256
    from pgrpo.files import check_out_file
    check_out_file(a.out)   # before the model loads and the extraction runs
    cfg = C.load(a.config, a.set, check_files=False)
    pairs_path = a.pairs or cfg.arm.refresh_pairs or DEFAULT_PATH
    pairs = load_pairs(pairs_path)
    seed = cfg.seed if a.seed is None else a.seed
    device, dtype = resolve_device_dtype(cfg)
    meta = {"pairs_sha256": pairs_sha256(pairs_path), "pairs_path": os.fspath(pairs_path), "model": cfg.model.name,
            "k": str(a.k), "cut": str(a.cut), "contrast": str(a.contrast), "heldout": str(a.heldout), "split": "by_problem", "seed": str(seed),
            "config_hash": config_hash(cfg), "adapter_mode": cfg.adapter.mode, "dtype": dtype, "step": "0",
            "max_tokens": str(a.max_tokens), "n_pairs": str(len(pairs)),
            "enable_thinking": str(cfg.rollout.enable_thinking), "reduction": "sum", "normalisation": "pair",
            "placebo_sha256": pairs_sha256(a.placebo) if a.placebo else "None"}

    if os.path.exists(a.out) and not a.force:
        try:
            _, _, old = load_vhack(a.out)
        except UserError:
            old = {}
        if all(old.get(key) == meta[key] for key in CACHE_KEYS) and os.path.exists(report_path(a.out)):
            print(f"extract: {a.out} is up to date (same pairs sha256, model, k, cut, config hash); skipping. "
                  f"Use --force to re-extract.")
            with open(report_path(a.out)) as f:
                print(format_report(json.load(f)))
            return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    # The tiny model's ops are so small that intra-op threading costs more than it gains: on a shared 2-core
    # box 2 threads measured ~12x slower per completion than 1 (0.08 s vs 1.0 s).
    threads = a.threads if a.threads is not None else (1 if device == "cpu" and cfg.model.name == "tiny" else None)
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}.")
        torch.set_num_threads(threads)
    from pgrpo import dist
    comm = dist.init(device, cfg.dist_timeout_s)   # under torchrun: pairs split across the ranks, rank 0 writes
    t0 = time.time()
    model, adapter, tok = build_model_adapter(cfg)
    t_load = time.time() - t0
    log(f"extract: {cfg.model.name} on {device}/{dtype}, {len(adapter.names)} modules, R={adapter.R}, "
        f"{len(pairs)} pairs from {pairs_path} (loaded in {t_load:.1f}s)")
    ex = run_extraction(model, adapter, tok, pairs, k=a.k, cut=a.cut, heldout=a.heldout, seed=seed,
                        max_tokens=a.max_tokens, log=log, contrast=a.contrast,
                        enable_thinking=cfg.rollout.enable_thinking,
                        placebo=load_pairs(a.placebo) if a.placebo else None, comm=comm)
    if not comm.is_main:
        comm.close()
        return 0
    ex.report.update({"seconds_extract": round(ex.seconds, 3), "seconds_load": round(t_load, 3),
                      "fit_pairs": ex.fit_idx, "heldout_pairs": ex.held_idx,
                      "metadata": meta, "out": os.fspath(a.out)})
    if not ex.V:
        raise UserError("no module kept a direction (all singular values were cut or zero); lower --cut.")
    save_vhack(a.out, ex.V, ex.S, meta)
    rp = report_path(a.out)
    tmp = f"{rp}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(ex.report, f, indent=1)
    os.replace(tmp, rp)
    print(format_report(ex.report))
    print(f"extract: wrote {a.out} and {rp} ({ex.seconds:.1f}s extraction)")
    comm.close()
    return 0
