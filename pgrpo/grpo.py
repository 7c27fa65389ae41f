"""The GRPO math, kept apart from the loop so it can be read and tested on its own.

- `group_advantages`: rewards [P, G] -> mean-centred advantages (optionally / group std) and which groups
  carry signal (zero reward variance -> no gradient -> skipped and counted).
- `completion_logprobs` / `completion_nll`: per-token log-probs of a completion under the model; the
  v_hack extractor reuses `completion_nll` for its per-completion gradients.
- `pg_token_loss`: token-level PPO-clip policy-gradient loss (+ optional k3 KL to the delta_S = 0 reference),
  summed (the caller divides by the step's constant denominator, see docs/training.md).
- `quarantine_zeroed`: the route arm's quarantine knob switched off for a block (refresh, evaluation).
- `project_grad` (the arm: vanilla / projected / route, with its diagnostics) and `apply_update` (clipping,
  AdamW, projection of the actual update and of Adam's first moment): everything between
  `adapter.collect_grad()` and the re-merge.
- `lr_at`: linear warmup then cosine (or constant).
"""
from __future__ import annotations

import contextlib
import math

import torch

from pgrpo import ops


# ----------------------------------------------------------------------------- advantages

def group_advantages(rewards: torch.Tensor, std_scale: bool = False, eps: float = 1e-6):
    """rewards [P, G] -> (advantages [P, G] fp32, keep [P] bool). A group whose rewards are all equal has
    zero advantage everywhere, so its forward/backward would be wasted work: `keep` is False for it."""
    r = rewards.float()
    adv = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
    keep = (r.max(dim=1).values - r.min(dim=1).values) > 0
    if std_scale:
        adv = adv / (std + eps)
    return adv * keep[:, None], keep


def loss_denominator(groups, scored, loss_norm: str, max_new_tokens: int) -> int:
    """What the step's summed token loss is divided by (docs/training.md):
    - constant: every token slot of the step, P * G * max_new_tokens (the seed's; independent of lengths);
    - token: the completion tokens that carry a gradient, i.e. of the groups in the loss (`scored[gi]`: groups
      with reward variance, plus the zero-variance ones when the KL term is on)."""
    if loss_norm == "constant":
        return sum(len(grp.completions) for grp in groups) * max_new_tokens
    if loss_norm == "token":
        return max(1, sum(len(c) for grp, s in zip(groups, scored) if s for c in grp.completions))
    raise ValueError(f"unknown loss_norm {loss_norm!r}")


# ----------------------------------------------------------------------------- log-probs

LOGPROB_CHUNK_BYTES = 256 << 20   # fp32 logits per chunk of the chunked log-prob (~440 tokens at a 151k vocab)


def completion_logprobs(model, input_ids: torch.Tensor, attn_mask: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0):
    """Per-token log p(token | prefix) for the completion tokens; 0 elsewhere. All inputs [B, T].

    `temperature`: the sampling temperature of the rollout (the trainer passes `rollout.temperature`); the
    logits are divided by it before the log-softmax, so the policy gradient is taken on the distribution the
    completions were sampled from (T=0.7 sampling scored at T=1 would be another policy). 0 (greedy) counts as 1.

    `completion_mask[b, t] = 1` marks token t of row b as a scored completion token (prompt and padding 0).
    `temperature` divides the logits before the log-softmax (score the policy that sampled at that
    temperature); 0 (greedy sampling, no distribution to match) scores the untempered logits. Position ids follow the attention mask, so left- and right-padded batches both work;
    use_cache=False: nothing is reused across forwards here.

    Memory: full-vocabulary fp32 logits are never materialised for the batch. The decoder's last hidden
    states are gathered at the scored positions only, and `_TokenLogprob` turns them into log-probs a chunk
    of tokens at a time (at most LOGPROB_CHUNK_BYTES of fp32 logits live at once, in forward and backward,
    which recomputes each chunk's logits instead of saving them). Models whose logits are not a plain
    ``lm_head(hidden)`` (soft-capping, a logit scale, a hooked head) take `completion_logprobs_full`.
    """
    B, T = input_ids.shape
    temperature = float(temperature) if temperature and temperature > 0 else 1.0
    cm = completion_mask.bool().clone()
    cm[:, 0] = False  # token 0 has no prefix to predict it
    if not cm.any():
        return torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    head = _plain_head(model)
    if head is None:
        return completion_logprobs_full(model, input_ids, attn_mask, completion_mask, temperature)
    pos = (attn_mask.long().cumsum(dim=1) - 1).clamp_min(0)
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=input_ids, attention_mask=attn_mask, position_ids=pos, use_cache=False).last_hidden_state
    rows, cols = cm.nonzero(as_tuple=True)                    # scored token (b, t) is predicted at (b, t - 1)
    h = hidden[rows, cols - 1]                                # [N, d]
    chunk = max(1, LOGPROB_CHUNK_BYTES // (4 * head.weight.shape[0]))
    logp = _TokenLogprob.apply(h, head.weight, input_ids[rows, cols], float(temperature), chunk)
    full = torch.zeros(B, T, dtype=logp.dtype, device=logp.device)
    return full.index_put((rows, cols), logp)


def _plain_head(model):
    """The output Linear when logits = hidden @ W^T exactly (no bias, hook, soft-cap or scale), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    cfg = getattr(model, "config", None)
    if (head is None or decoder is None or decoder is model or getattr(head, "bias", None) is not None
            or head._forward_hooks or head._forward_pre_hooks
            or any(getattr(cfg, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))):
        return None
    return head


class _TokenLogprob(torch.autograd.Function):
    """log_softmax(h W^T / temperature)[target] per row of h [N, d], a chunk of rows at a time.

    The logits are formed in the model dtype (as the lm_head Linear would) and upcast to fp32 for the
    log-softmax, exactly like `completion_logprobs_full`; backward recomputes each chunk's logits and
    returns the same gradients (d logp / d logits = (onehot - softmax) / temperature) without ever
    holding more than one chunk of fp32 logits."""

    @staticmethod
    def forward(ctx, h, W, targets, temperature, chunk):
        N = h.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            z = (h[a:b] @ W.T).float()
            if temperature != 1.0:
                z = z / temperature
            lse[a:b] = torch.logsumexp(z, dim=-1)
            out[a:b] = z.gather(1, targets[a:b, None]).squeeze(1) - lse[a:b]
        ctx.save_for_backward(h, W, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, W, targets, lse = ctx.saved_tensors
        T, chunk, N = ctx.temperature, ctx.chunk, h.shape[0]
        gh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        gW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if ctx.needs_input_grad[1] else None
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            z = (h[a:b] @ W.T).float()
            if T != 1.0:
                z = z / T
            g = grad_out[a:b].float()
            dz = torch.exp(z - lse[a:b, None]).mul_(-g[:, None])             # -g * softmax
            dz.scatter_add_(1, targets[a:b, None], g[:, None])               # + g * onehot
            if T != 1.0:
                dz = dz / T
            dz = dz.to(h.dtype)
            if gh is not None:
                gh[a:b] = dz @ W
            if gW is not None:
                gW += (dz.T @ h[a:b]).float()
        return gh, (gW.to(W.dtype) if gW is not None else None), None, None, None


def completion_logprobs_full(model, input_ids, attn_mask, completion_mask, temperature: float = 1.0):
    """The plain formulation (reference in tests, fallback for heads `_plain_head` refuses): the model's
    logits from the first completion position on (`logits_to_keep`), fp32 log-softmax over the whole
    vocabulary for every row and position. Memory: [B, T_completion, V] fp32, ~5.6 GB for 6 x 1536 tokens
    at a 151k vocabulary."""
    B, T = input_ids.shape
    temperature = float(temperature) if temperature and temperature > 0 else 1.0
    cm = completion_mask.bool()
    if not cm.any():
        return torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    has = cm.any(dim=1)
    first_per_row = torch.where(has, cm.float().argmax(dim=1), torch.full_like(has, T, dtype=torch.long))
    first = max(int(first_per_row.min()), 1)  # token 0 has no prefix to predict it
    pos = (attn_mask.long().cumsum(dim=1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attn_mask, position_ids=pos, use_cache=False,
                logits_to_keep=T - first + 1)
    logits = out.logits[:, :-1].float()                      # positions first-1 .. T-2 -> tokens first .. T-1
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, first:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    full = torch.zeros(B, T, dtype=logp.dtype, device=logp.device)
    full[:, first:] = logp
    return full * cm


def completion_nll(model, input_ids, attn_mask, completion_mask, temperature: float = 1.0):
    """Mean token NLL of each row's completion, [B] (differentiable). Rows without completion tokens give 0."""
    logp = completion_logprobs(model, input_ids, attn_mask, completion_mask, temperature)
    n = completion_mask.float().sum(dim=1).clamp_min(1)
    return -(logp.sum(dim=1) / n)


# ----------------------------------------------------------------------------- loss

def pg_token_loss(logp, old_logp, adv, mask, clip_eps=0.2, ref_logp=None, kl_coef=0.0):
    """Token-level PPO-clip loss, summed over tokens (not normalised). logp/old_logp/ref_logp/mask [B, T], adv [B].

    With one update per batch old_logp = logp.detach(), so ratio = 1 and the gradient is the plain policy
    gradient; the clipped form is kept so that more inner epochs would be correct. KL uses the k3 estimator
    exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0; Schulman 2020).
    Returns (loss_sum, {"clip_frac": .., "kl_sum": ..}).
    """
    m = mask.float()
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None].to(logp.dtype)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    loss = (pg * m).sum()
    stats = {"clip_frac": float((((ratio - 1).abs() > clip_eps).float() * m).sum()), "kl_sum": 0.0}
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        loss = loss + kl_coef * (kl * m).sum()
        stats["kl_sum"] = float((kl.detach() * m).sum())
    return loss, stats


@contextlib.contextmanager
def quarantine_zeroed(adapter):
    """Run the block with the route arm's quarantine knob delta_S_hack switched off (evaluation, v_hack
    refresh); the adapter re-merges on each toggle. A no-op for adapters without the hack knob.
    The KL reference (delta_S = 0 and no hack knob) is `adapter.disabled()`: in merged mode it points the
    weights at W0 without a copy, in factored mode it skips the hooks."""
    if getattr(adapter, "delta_hack", None) is None or not adapter.hack_enabled:
        yield
        return
    adapter.hack_enabled = False
    try:
        yield
    finally:
        adapter.hack_enabled = True


# ----------------------------------------------------------------------------- schedule

def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1) -> float:
    """LR for optimizer step `step` (1-based): linear warmup to lr, then cosine down to min_lr_ratio * lr."""
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- v_hack geometry

def vhack_components(g: torch.Tensor, g_offsets: torch.Tensor, packed) -> torch.Tensor:
    """Per module, ||V_m g_m|| (the norm of g's component inside the v_hack subspace), [M].

    Uses the projection op itself (two-sided, overshoot 1 on a copy): its removed norm is ||V^T V g|| = ||V g||
    for orthonormal rows, so no second implementation of the geometry exists."""
    stats = ops.project_(g.detach().clone(), g_offsets, packed.v, packed.v_offsets, packed.ks, 1.0, False)
    return stats[:, 1]


def hackward_components(u: torch.Tensor, g_offsets: torch.Tensor, packed) -> torch.Tensor:
    """Per module, the norm of the hack-ward part relu(V u) of a gradient-convention vector u, [M]."""
    stats = ops.project_(u.detach().clone(), g_offsets, packed.v, packed.v_offsets, packed.ks, 1.0, True)
    return stats[:, 1]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def projection_stats(stats: torch.Tensor, ks: torch.Tensor) -> dict:
    """project_ stats [M,2] -> removed fraction (mean over modules that have a v_hack and a nonzero grad) and
    the fraction of those modules where the projection removed anything."""
    active = (ks > 0) & (stats[:, 0] > 0)
    if not bool(active.any()):
        return {"proj_removed_frac": 0.0, "proj_fired_frac": 0.0}
    frac = stats[active, 1] / stats[active, 0]
    return {"proj_removed_frac": float(frac.mean()), "proj_fired_frac": float((stats[active, 1] > 0).float().mean())}


# ----------------------------------------------------------------------------- the arm + optimizer step

def g_offsets_of(adapter, device=None) -> torch.Tensor:
    return torch.tensor(adapter.offsets, dtype=torch.int64, device=device or adapter.delta.device)


def random_subspace(names, ranks, frac: float, seed: int, device="cpu"):
    """The random-subspace control's basis: per module an isotropic random orthonormal [ceil(frac * r), r],
    seeded (the same for every run of one seed), packed like v_hack."""
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    V = {}
    for name, r in zip(names, ranks):
        k = max(1, min(r, math.ceil(frac * r)))
        Q, _ = torch.linalg.qr(torch.randn(r, k, generator=gen, dtype=torch.float64))
        V[name] = Q.T.float().contiguous()
    return ops.pack_vhack(names, ranks, V, device)


def matched_random_(x: torch.Tensor, g_offsets, packed, packed_random, overshoot: float, one_sided: bool):
    """The random-subspace control, in place on the flat vector x: per module, remove from x the part that lies
    in the random subspace R, scaled so that the removed norm equals what the v_hack projection would remove
    from the same x (min(1, rho_m / ||P_R x_m||) * P_R x_m; rho_m = ||removed by v_hack||). So the control takes
    exactly as much gradient norm, module by module and step by step, as projection does, only in directions
    unrelated to hacking. Returns stats [M, 2] (norm before, removed) and the v_hack removal it matched [M]."""
    rho = ops.project_(x.detach().clone(), g_offsets, packed.v, packed.v_offsets, packed.ks, overshoot,
                       one_sided)[:, 1]
    rest = x.detach().clone()
    st = ops.project_(rest, g_offsets, packed_random.v, packed_random.v_offsets, packed_random.ks, 1.0, False)
    p = st[:, 1]                                                  # ||P_R x_m||
    c = torch.where(p > 0, torch.clamp(rho / torch.where(p > 0, p, torch.ones_like(p)), max=1.0), torch.zeros_like(p))
    lengths = (g_offsets[1:] - g_offsets[:-1]).to(c.device)
    scale = torch.repeat_interleave(c.to(x.dtype), lengths)
    x.sub_(scale * (x - rest))                                    # x - rest = P_R x
    out = torch.stack([st[:, 0], (c * p).to(st.dtype)], dim=1)
    return out, rho


def project_grad(g: torch.Tensor, arm, packed, g_offsets: torch.Tensor, packed_random=None):
    """The arm, applied to the collected flat gradient g (fp32 [R], modified in place for projected/route).

    arm: the `ArmConfig` (name vanilla|projected|route, overshoot, one_sided); packed: `ops.PackedVHack` in the
    adapter's module order, or None.
    - vanilla: g is used as is; with a v_hack, what the projection *would* remove is still measured.
    - projected: g <- g - overshoot * relu(V g) V per module (two-sided: without relu), one op call for all modules.
    - route: the same projection, and the removed part becomes the gradient of the quarantine knob delta_hack.
    - random: the control; `matched_random_` with `packed_random` (removes as much norm as projection would,
      in a random subspace). `vhack_removed_frac` logs what v_hack would have removed.
    Returns (g, g_hack or None, diagnostics).
    """
    out = {"grad_norm_raw": float(g.norm())}
    if packed is None or int(packed.ks.sum()) == 0:
        return g, None, out
    along = vhack_components(g, g_offsets, packed)
    out["grad_vhack_cos"] = _ratio(float(along.pow(2).sum().sqrt()), out["grad_norm_raw"])
    if arm.name == "vanilla":  # measure only
        stats = ops.project_(g.detach().clone(), g_offsets, packed.v, packed.v_offsets, packed.ks,
                             arm.overshoot, arm.one_sided)
        out.update(projection_stats(stats, packed.ks))
        return g, None, out
    if arm.name == "random":
        stats, rho = matched_random_(g, g_offsets, packed, packed_random, arm.overshoot, arm.one_sided)
        out.update(projection_stats(stats, packed.ks))
        out["vhack_removed_frac"] = projection_stats(torch.stack([stats[:, 0], rho], 1), packed.ks)["proj_removed_frac"]
        return g, None, out
    g_before = g.clone() if arm.name == "route" else None
    stats = ops.project_(g, g_offsets, packed.v, packed.v_offsets, packed.ks, arm.overshoot, arm.one_sided)
    out.update(projection_stats(stats, packed.ks))
    return g, (g_before - g if arm.name == "route" else None), out


def apply_update(adapter, opt, g: torch.Tensor, g_hack, arm, packed, g_offsets, max_grad_norm: float = 0.0,
                 packed_random=None) -> dict:
    """Grad clipping + AdamW on the knob(s), with the projected arms' guarantees on the *actual* update.

    Clipping is joint over delta and delta_hack (one scale, so the route arm's orthogonal split survives).
    Adam's per-coordinate 1/sqrt(v) rescales a projected gradient and can rotate it back onto v_hack, so with
    `arm.project_update` the update of delta itself is projected too (overshoot 1: one-sided leaves no hack-ward
    component, two-sided no component at all), and with `arm.project_momentum` Adam's first moment is projected
    after the step (it matters when v_hack changes at a refresh or overshoot < 1: old momentum can point along
    the new V). The caller re-merges. Returns diagnostics, including the update's component along v_hack
    before (`update_along_vhack_preproj`) and after projection (`update_along_vhack`, as a fraction of ||update||).
    """
    delta = adapter.delta
    hack = getattr(adapter, "delta_hack", None)
    delta.grad = g.view_as(delta).to(delta.dtype)
    if hack is not None:
        hack.grad = g_hack.view_as(hack).to(hack.dtype) if g_hack is not None else torch.zeros_like(hack)
    params = [p for p in (delta, hack) if p is not None]
    out = {}
    if max_grad_norm > 0:
        out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    else:
        out["grad_norm"] = float(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in params)))
    projecting = packed is not None and int(packed.ks.sum()) > 0 and arm.name in ("projected", "route")

    before = delta.detach().clone()
    opt.step()
    with torch.no_grad():
        upd = delta.detach() - before                       # the actual update of the main knob
        if packed is not None and int(packed.ks.sum()) > 0:
            u = -upd.float()                                # gradient convention: hack-ward = V u > 0
            out["update_along_vhack_preproj"] = _ratio(
                float(vhack_components(u, g_offsets, packed).pow(2).sum().sqrt()), float(u.norm()))
            if projecting and arm.project_update:
                ops.project_(u, g_offsets, packed.v, packed.v_offsets, packed.ks, 1.0, arm.one_sided)
                delta.copy_(before - u.to(delta.dtype))
                upd = delta.detach() - before
            if arm.name == "random" and packed_random is not None and arm.project_update:
                matched_random_(u, g_offsets, packed, packed_random, 1.0, arm.one_sided)   # the same, on the update
                delta.copy_(before - u.to(delta.dtype))
                upd = delta.detach() - before
            if projecting and arm.project_momentum:
                m = opt.state[delta].get("exp_avg")
                if m is not None:
                    mf = m.view(-1).float().clone()
                    ops.project_(mf, g_offsets, packed.v, packed.v_offsets, packed.ks, 1.0, arm.one_sided)
                    m.copy_(mf.view_as(m))
            u = -upd.float()
            along_abs = float(vhack_components(u, g_offsets, packed).pow(2).sum().sqrt())
            out["update_along_vhack_abs"] = along_abs
            out["update_along_vhack"] = _ratio(along_abs, float(u.norm()))
            out["update_hackward_abs"] = float(hackward_components(u, g_offsets, packed).pow(2).sum().sqrt())
            out["update_hackward"] = _ratio(out["update_hackward_abs"], float(u.norm()))
        out["update_norm"] = float(upd.norm())
        out["delta_norm"] = float(delta.norm())
        out["delta_hack_norm"] = float(hack.norm()) if hack is not None else 0.0
    return out
