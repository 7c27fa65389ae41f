"""The SVD-basis adapter: W_eff = W0 + U diag(delta_S) Vh for every targeted Linear.

Each targeted ``nn.Linear`` gets a thin SVD of its frozen weight W0 = U diag(S) Vh (fp32, r =
min(d_out, d_in)); the trainable knob is ``delta_S`` in R^r per module, zero-initialised, so the
adapted model starts as exactly the base model (a free reference policy for KL).

All modules' delta_S live in ONE flat fp32 Parameter ``delta`` [R] so AdamW, clipping and the
projection each run on one tensor. Module m owns ``delta[offsets[m]:offsets[m+1]]``. Modules are
ordered by shape group (modules with equal (d_out, d_in), in order of first appearance), then by
position in the model, so each shape group is one contiguous ``[L, r]`` block of the knob.

Two modes, tested against each other:
- ``factored`` (reference): a forward hook adds ``((x Vh^T) * delta_S) U^T`` to the frozen Linear's
  output; autograd fills ``delta.grad``.
- ``merged`` (fast path): the Linear's weight IS W_eff, a view into a per-shape-group stack
  [L, o, i]; ``merge()`` rebuilds every stack with one batched GEMM (baddbmm) per group. Each weight
  has requires_grad=True (it is not an optimizer parameter) and its ``.grad`` is a view into a
  per-group grad stack, so autograd accumulates G_W in place into one contiguous [L, o, i] tensor;
  ``collect_grad()`` then turns each stack into delta_S gradients with ``ops.basis_change``
  (g_l = diag(U_l^T G_l Vh_l^T)) — no per-module Python loop, no stacking copies.

Why views for grads: AccumulateGrad adds into an existing ``.grad`` in place (backward runs with
grad mode off), so a view into a preallocated stack receives the gradient without a copy.
``collect_grad`` checks that every weight's grad still points into its stack (data_ptr) and copies
any that do not (someone replaced ``.grad``), so it is correct either way.

bf16 fidelity (docs/training.md, "bf16 fidelity of the merged path"):
- The G_W stacks are in the model dtype, so summing many micro-batch gradients into them would round in
  bf16 at every add. ``accumulate_grad()`` (the trainer calls it after each group) turns the stacks into
  delta_S gradients with one basis change into an fp32 [R] accumulator and zeroes them, so at most one
  group's micro-batches are ever summed in bf16; ``collect_grad`` adds what is left. The accumulator costs
  4 bytes per knob (2 MB at Qwen3-4B) where fp32 stacks would cost 14.5 GB.
- ``merge()`` forms W0 + U diag(knob) Vh in fp32, a few modules at a time (bounded scratch), and rounds to
  the model dtype ONCE. W0 is exactly representable, so with round-to-nearest a knob update whose weight
  change is under half an ulp of W0 would vanish from the forward (the fp32 knob keeps it, the model does
  not see it). The factored path loses the same updates in bf16 (its correction is added to the bf16
  x W0^T), and tests/test_bf16_fidelity.py measures merged round-to-nearest (the default) as faithful to an
  fp32 run as factored bf16. ``merge_rounding="stochastic"`` (bf16 only) rounds up or down with probability
  proportional to the distance, so W_eff equals W0 + U diag(knob) Vh in expectation (an unbiased
  compensation, noisier per merge); its random bits are seeded from the knob's bytes, so a merge is a pure
  function of the knob (bitwise resume holds). Every merge records ``merge_stats`` (fraction of weights
  changed, lost fraction of the update's norm, fraction of entries under half an ulp).

Route arm: ``with_hack_knob=True`` adds a second knob ``delta_hack`` with the same layout;
while ``hack_enabled`` the model uses delta + delta_hack. Both knobs then see the same gradient
(d loss/d delta == d loss/d delta_hack), which ``collect_grad`` returns (and assigns to both).
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math
import os
import re
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pgrpo import ops
from pgrpo.errors import UserError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MERGE_ROUNDINGS = ("nearest", "stochastic")
MERGE_SCRATCH_BYTES = 256 << 20   # fp32 scratch per merge chunk (a few Qwen3-4B modules at a time)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ----------------------------------------------------------------------------- SVD + disk cache

def _weight_key(W: torch.Tensor) -> str:
    """sha256 of the weight's raw bytes plus dtype and shape: the SVD cache key."""
    h = hashlib.sha256(f"{W.dtype}|{tuple(W.shape)}|".encode())
    h.update(W.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def thin_svd(W: torch.Tensor, cache_dir: str | None = None, stats: dict | None = None):
    """(U [o,r], Vh [r,i]) of W in W's dtype and device, computed in fp32, optionally disk-cached.

    The cache file is ``cache_dir/svd-<sha256>.safetensors``, written to a temp name and renamed,
    so concurrent runs never read half a file. An unreadable cache file is recomputed and replaced.
    """
    from safetensors.torch import load_file, save_file

    stats = stats if stats is not None else {}
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"svd-{_weight_key(W)}.safetensors")
        if os.path.exists(path):
            try:
                d = load_file(path)
                U, Vh = d["U"], d["Vh"]
                r = min(W.shape)
                if U.shape == (W.shape[0], r) and Vh.shape == (r, W.shape[1]) and U.dtype == W.dtype:
                    stats["cache_hits"] = stats.get("cache_hits", 0) + 1
                    return U.to(W.device), Vh.to(W.device)
            except Exception as e:  # corrupt / truncated file: recompute below
                warnings.warn(f"SVD cache file {path} unreadable ({e}); recomputing")
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    stats["svd_computed"] = stats.get("svd_computed", 0) + 1
    U, Vh = U.to(W.dtype).contiguous(), Vh.to(W.dtype).contiguous()
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".svd-", suffix=".tmp", dir=cache_dir)
        os.close(fd)
        try:
            save_file({"U": U.cpu(), "Vh": Vh.cpu(), "S": S.cpu().contiguous()}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return U, Vh


# ----------------------------------------------------------------------------- rounding

def _stochastic_round_bf16(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding each value up or down with probability proportional to its distance
    (unbiased: E[round(x)] = x). bf16 is the top 16 bits of fp32, so adding uniform 16-bit noise to the low
    half of the bits and truncating rounds the magnitude up with exactly that probability, for either sign."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, device=x.device, dtype=torch.int32)
    out = (bits + noise) & -65536                           # clear the low 16 bits (0xFFFF0000)
    finite = torch.isfinite(x)                              # never carry inf/nan bits across the exponent
    return torch.where(finite, out.view(torch.float32), x).to(torch.bfloat16)


_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}


def _ulp(W: torch.Tensor) -> torch.Tensor:
    """Spacing of W's floating-point grid at each entry, as fp32: 2^(exponent - mantissa bits), read from the
    fp32 bit pattern with integer ops (supported for every dtype on every device, unlike nextafter). Zero and
    subnormals get the smallest normal fp32 spacing, which only matters for the statistics."""
    e = (W.detach().float().abs().contiguous().view(torch.int32) >> 23) & 0xFF   # biased fp32 exponent
    return ((e - _MANTISSA_BITS.get(W.dtype, 23)).clamp_min(1) << 23).view(torch.float32)


@torch.no_grad()
def merge_stack(W0, U, Vh, dS, out, gen: torch.Generator | None = None, acc: dict | None = None):
    """out[l] = round(W0[l] + U[l] diag(dS[l]) Vh[l]) for a [L, o, i] stack: the product and the sum in fp32, a
    few modules at a time (MERGE_SCRATCH_BYTES of fp32 scratch), one rounding to out's dtype (stochastic when
    `gen` is given, bf16 only). With `acc`, the rounding is measured into it (n, changed, sub = entries whose
    update is under half an ulp, err2 / upd2 = squared norms of the rounding error and of the update)."""
    L, o, i = W0.shape
    step = max(1, MERGE_SCRATCH_BYTES // (4 * o * i))
    for a in range(0, L, step):
        b = min(L, a + step)
        w0, u, vh, d = W0[a:b], U[a:b].float(), Vh[a:b].float(), dS[a:b].float()
        D = torch.bmm(u * d[:, None, :], vh) if o <= i else torch.bmm(u, vh * d[:, :, None])   # scale the smaller
        exact = w0.float() + D
        W = _stochastic_round_bf16(exact, gen) if gen is not None else exact.to(out.dtype)
        out[a:b].copy_(W)
        if acc is not None:   # what the rounding did (cheap next to the GEMM)
            got = W.float() - w0.float()
            acc["n"] += w0.numel()
            acc["changed"] += int((got != 0).sum())
            acc["sub"] += int((D.abs() < 0.5 * _ulp(w0)).sum())
            acc["err2"] += float((got - D).double().pow(2).sum())
            acc["upd2"] += float(D.double().pow(2).sum())
    return out


# ----------------------------------------------------------------------------- selection

def _layer_index(name: str):
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _layer_filter(layers):
    """None = all; tuple/range (start, stop) = half-open range; list/set = explicit indices."""
    if layers is None:
        return lambda i: True
    if isinstance(layers, range):
        keep = set(layers)
    elif isinstance(layers, tuple):
        if len(layers) != 2:
            raise UserError(f"layers={layers!r}: a tuple means a (start, stop) range; pass a list for indices.")
        keep = set(range(int(layers[0]), int(layers[1])))
    else:
        keep = {int(i) for i in layers}
    return lambda i: i is not None and i in keep


def _matches(name: str, target: str) -> bool:
    """A target is a module's last name component ("q_proj") or a glob on the full name."""
    if any(c in target for c in "*?["):
        return fnmatch.fnmatchcase(name, target)
    return name.rsplit(".", 1)[-1] == target


def select_linears(model: nn.Module, targets=DEFAULT_TARGETS, layers=None) -> list[tuple[str, nn.Linear]]:
    if isinstance(targets, str):
        targets = (targets,)
    keep_layer = _layer_filter(layers)
    matched = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(_matches(n, t) for t in targets)]
    out = [(n, m) for n, m in matched if keep_layer(_layer_index(n))]
    if layers is not None and not isinstance(layers, tuple):
        present = sorted({i for i in map(_layer_index, (n for n, _ in matched)) if i is not None})
        absent = sorted({int(i) for i in layers} - set(present))
        if absent:
            have = f"layers {present[0]}..{present[-1]}" if present else "no numbered layers"
            raise UserError(f"Adapter layers {absent} do not exist in this model (it has {have}).")
    if not out:
        raise UserError(f"No Linear module matches targets={list(targets)} and layers={layers!r}.")
    return out


# ----------------------------------------------------------------------------- adapter

@dataclass
class ShapeGroup:
    """Modules with one (d_out, d_in): stacked tensors and their contiguous block of the knob."""
    shape: tuple[int, int]
    idx: list[int]                   # module indices (positions in adapter.names), consecutive
    start: int                       # offset of the group's [L, r] block in the flat knob
    U: torch.Tensor = None           # [L, o, r] model dtype
    Vh: torch.Tensor = None          # [L, r, i] model dtype
    W0: torch.Tensor | None = None   # [L, o, i] merged mode: frozen base weights (a copy)
    W: torch.Tensor | None = None    # [L, o, i] merged mode: W_eff, the Linears' weights are views
    G: torch.Tensor | None = None    # [L, o, i] merged mode: grad stack, the weights' .grad are views
    linears: list = field(default_factory=list)

    @property
    def L(self):
        return len(self.idx)

    @property
    def r(self):
        return min(self.shape)


class SVDAdapter:
    """Wraps the targeted Linears of a HF causal LM in place; see the module docstring.

    The optimizer gets ``adapter.parameters()`` (delta, plus delta_hack when present); call
    ``merge()`` after every optimizer step in merged mode.
    """

    def __init__(self, model: nn.Module, targets=DEFAULT_TARGETS, layers=None, mode: str = "merged",
                 cache_dir: str | None = None, with_hack_knob: bool = False, merge_rounding: str = "nearest"):
        if mode not in ("merged", "factored"):
            raise UserError(f"Adapter mode must be 'merged' or 'factored', not {mode!r}.")
        if merge_rounding not in MERGE_ROUNDINGS:
            raise UserError(f"Adapter merge_rounding must be one of {', '.join(MERGE_ROUNDINGS)}, not {merge_rounding!r}.")
        self.model, self.mode, self.merge_rounding = model, mode, merge_rounding
        self.merge_stats: dict = {}
        for p in model.parameters():
            p.requires_grad_(False)
        found = select_linears(model, targets, layers)
        dev = found[0][1].weight.device
        self.dtype = found[0][1].weight.dtype

        # Group by shape in first-appearance order; the knob layout is group-major.
        by_shape: dict[tuple, list] = {}
        for name, lin in found:
            by_shape.setdefault(tuple(lin.weight.shape), []).append((name, lin))
        self.names, self.ranks, self.offsets, self.groups = [], [], [0], []
        self._linears: list[nn.Linear] = []
        self.svd_stats: dict = {}
        for shape, mods in by_shape.items():
            g = ShapeGroup(shape=shape, idx=[], start=self.offsets[-1])
            Us, Vhs = [], []
            for name, lin in mods:
                known = getattr(lin, "svd_factors", None)   # a model built from its factors (qwen3-4b-shape)
                if known is not None and known[0].shape == (shape[0], min(shape)) and known[1].shape == (min(shape), shape[1]):
                    U, Vh = known[0].to(lin.weight.dtype), known[1].to(lin.weight.dtype)
                    del lin.svd_factors
                    self.svd_stats["known"] = self.svd_stats.get("known", 0) + 1
                else:
                    U, Vh = thin_svd(lin.weight.data, cache_dir, self.svd_stats)
                Us.append(U)
                Vhs.append(Vh)
                g.idx.append(len(self.names))
                g.linears.append(lin)
                self.names.append(name)
                self.ranks.append(g.r)
                self.offsets.append(self.offsets[-1] + g.r)
                self._linears.append(lin)
            g.U, g.Vh = torch.stack(Us), torch.stack(Vhs)
            del Us, Vhs
            if mode == "merged":  # link per group so the original weights are freed as we go
                g.W0 = torch.stack([lin.weight.data for _, lin in mods])
                g.W = g.W0.clone()
                g.G = torch.zeros_like(g.W)
                self._link([g])
            self.groups.append(g)
        self._index = {n: i for i, n in enumerate(self.names)}
        R = self.offsets[-1]
        self.delta = nn.Parameter(torch.zeros(R, dtype=torch.float32, device=dev))
        self.delta_hack = (nn.Parameter(torch.zeros(R, dtype=torch.float32, device=dev))
                           if with_hack_knob else None)
        self._hack_enabled = with_hack_knob
        self._gacc = None   # fp32 [R] delta_S-gradient accumulator (merged mode), see accumulate_grad
        self._disabled = False
        self._hooks = []
        if mode == "factored":
            for g in self.groups:
                for j, lin in enumerate(g.linears):
                    a = self.offsets[g.idx[j]]
                    self._hooks.append(lin.register_forward_hook(self._make_hook(g, j, a, a + g.r)))

    # ------------------------------------------------------------------ knob views
    @property
    def R(self) -> int:
        return self.offsets[-1]

    @property
    def device(self) -> torch.device:
        return self.delta.device

    def parameters(self) -> list[nn.Parameter]:
        return [self.delta] + ([self.delta_hack] if self.delta_hack is not None else [])

    @property
    def hack_enabled(self) -> bool:
        return self._hack_enabled

    @hack_enabled.setter
    def hack_enabled(self, on: bool):
        """Toggle use of delta_hack; in merged mode the weights are re-merged to match."""
        if on and self.delta_hack is None:
            raise UserError("hack_enabled needs an adapter built with with_hack_knob=True.")
        changed = bool(on) != self._hack_enabled
        self._hack_enabled = bool(on)
        if changed and self.mode == "merged":
            self.merge()

    def knob(self) -> torch.Tensor:
        """The effective flat knob the model uses: delta (+ delta_hack while hack_enabled)."""
        if self.delta_hack is not None and self._hack_enabled:
            return self.delta + self.delta_hack
        return self.delta

    def _slice(self, name: str):
        if name not in self._index:
            raise KeyError(f"{name!r} is not an adapted module")
        m = self._index[name]
        return self.offsets[m], self.offsets[m + 1]

    def delta_S(self, name: str) -> torch.Tensor:
        a, b = self._slice(name)
        return self.delta[a:b]

    def U(self, name: str) -> torch.Tensor:
        g, j = self._where(name)
        return g.U[j]

    def Vh(self, name: str) -> torch.Tensor:
        g, j = self._where(name)
        return g.Vh[j]

    def _where(self, name):
        m = self._index[name]
        for g in self.groups:
            if g.idx[0] <= m <= g.idx[-1]:
                return g, m - g.idx[0]
        raise KeyError(name)

    # ------------------------------------------------------------------ factored
    def _make_hook(self, g: ShapeGroup, j: int, a: int, b: int):
        def hook(mod, args, out):
            if self._disabled:
                return out
            x = args[0]
            dS = self.knob()[a:b].to(x.dtype)
            return out + F.linear(F.linear(x, g.Vh[j]) * dS, g.U[j])
        return hook

    # ------------------------------------------------------------------ merged
    def _link(self, groups=None):
        """Point every adapted Linear's weight at its slice of W (and its .grad at G)."""
        for g in self.groups if groups is None else groups:
            for j, lin in enumerate(g.linears):
                lin.weight.data = g.W[j]
                lin.weight.requires_grad_(True)
                lin.weight.grad = g.G[j]

    def _check_linked(self):
        """Merged weights must still be views of the stacks (model.to() after wrapping breaks that)."""
        for g in self.groups:
            want = g.W0 if self._disabled else g.W
            for j, lin in enumerate(g.linears):
                if lin.weight.data_ptr() != want[j].data_ptr():
                    raise RuntimeError("The adapted model's weights were moved or replaced after wrapping "
                                       "(model.to()?); move it with adapter.to(device) instead.")

    @torch.no_grad()
    def merge(self) -> dict:
        """W_eff = W0 + U diag(knob) Vh for every module, in fp32, rounded to the model dtype once.

        A group whose knob block is all zero gets W0 copied, so delta = 0 reproduces the base weights bit
        for bit. The fp32 product is formed a few modules at a time (at most MERGE_SCRATCH_BYTES of scratch)
        with one baddbmm each, scaling the smaller of U / Vh. Low-precision models round stochastically
        (``merge_rounding``, see the module docstring) or to nearest. Returns (and keeps in
        ``merge_stats``) the measured rounding: ``changed_frac`` (weights that differ from W0),
        ``lost_frac`` = ||W_eff - W0 - U diag(knob) Vh|| / ||U diag(knob) Vh|| (1.0 = the forward sees none
        of the update, 0.0 = all of it), and ``sub_half_ulp_frac`` (entries whose update is below half an
        ulp of W0: round-to-nearest drops exactly these).
        """
        if self.mode != "merged":
            return {}
        self._check_linked()
        knob = self.knob().detach()
        low = self.dtype in (torch.bfloat16, torch.float16)
        stochastic = low and self.merge_rounding == "stochastic" and self.dtype == torch.bfloat16
        gen = None
        if stochastic:  # the random bits are a pure function of the knob: a resumed run re-merges identically
            seed = zlib.crc32(knob.float().cpu().numpy().tobytes())
            gen = torch.Generator(device=knob.device).manual_seed(seed)
        acc = {"n": 0, "changed": 0, "sub": 0, "err2": 0.0, "upd2": 0.0}
        for g in self.groups:
            dS = knob[g.start:g.start + g.L * g.r].view(g.L, g.r)
            if not bool(dS.any()):
                g.W.copy_(g.W0)
                acc["n"] += g.W.numel()
                continue
            merge_stack(g.W0, g.U, g.Vh, dS, g.W, gen if stochastic else None, acc)
        stats = {"merge_changed_frac": acc["changed"] / max(1, acc["n"]),
                 "merge_lost_frac": math.sqrt(acc["err2"] / acc["upd2"]) if acc["upd2"] > 0 else 0.0,
                 "merge_sub_half_ulp_frac": acc["sub"] / max(1, acc["n"])}
        self.merge_stats = stats
        return stats

    @contextlib.contextmanager
    def disabled(self):
        """The base model (delta = 0) without touching the knob: the KL reference policy.

        Merged mode points the weights at W0 (no copy); factored mode skips the hooks.
        """
        self._disabled = True
        if self.mode == "merged":
            for g in self.groups:
                for j, lin in enumerate(g.linears):
                    lin.weight.data = g.W0[j]
        try:
            yield self.model
        finally:
            self._disabled = False
            if self.mode == "merged":
                for g in self.groups:
                    for j, lin in enumerate(g.linears):
                        lin.weight.data = g.W[j]

    # ------------------------------------------------------------------ gradients
    def zero_grad(self):
        """Clear the knob grads and (merged) zero the grad stacks and the fp32 accumulator, re-pointing
        weight grads at the stacks."""
        for p in self.parameters():
            p.grad = None
        self._gacc = None
        if self.mode == "merged":
            for g in self.groups:
                g.G.zero_()
                for j, lin in enumerate(g.linears):
                    gr = lin.weight.grad
                    if gr is None or gr.data_ptr() != g.G[j].data_ptr():
                        lin.weight.grad = g.G[j]

    def _stacks_to_basis(self, out: torch.Tensor, add: bool):
        """out[R] (+)= basis_change of every grad stack (fp32); grads someone replaced are copied back in."""
        for grp in self.groups:
            for j, lin in enumerate(grp.linears):
                gr = lin.weight.grad
                if gr is None:
                    grp.G[j].zero_()
                elif gr.data_ptr() != grp.G[j].data_ptr():
                    grp.G[j].copy_(gr)
                    lin.weight.grad = grp.G[j]
            gl = ops.basis_change(grp.G, grp.U, grp.Vh).reshape(-1)  # [L*r] fp32
            dst = out[grp.start:grp.start + grp.L * grp.r]
            dst.add_(gl) if add else dst.copy_(gl)

    @torch.no_grad()
    def accumulate_grad(self):
        """Merged mode: fold the G_W stacks accumulated so far into the fp32 delta_S-gradient accumulator and
        zero the stacks, so bf16 stacks never sum more than one group's micro-batches (call after each group's
        backward; factored mode: a no-op, autograd already accumulates delta.grad in fp32)."""
        if self.mode != "merged":
            return
        self._check_linked()
        if self._gacc is None:
            self._gacc = torch.zeros(self.R, dtype=torch.float32, device=self.device)
        self._stacks_to_basis(self._gacc, add=True)
        for grp in self.groups:
            grp.G.zero_()

    def collect_grad(self) -> torch.Tensor:
        """d loss / d delta as a flat fp32 [R] tensor, after backward. The returned tensor IS delta.grad,
        so in-place edits (projection, clipping) are what the optimizer sees.

        Merged: the fp32 accumulator (``accumulate_grad``) plus one ``ops.basis_change`` per shape group on
        what the G_W stacks hold since. Factored: autograd's delta.grad. With the hack knob enabled the same
        gradient is the gradient of delta_hack too, and is assigned to delta_hack.grad (a copy).
        """
        if self.mode == "factored":
            g = self.delta.grad
            flat = torch.zeros_like(self.delta) if g is None else g.detach().clone()
        else:
            self._check_linked()
            flat = torch.empty(self.R, dtype=torch.float32, device=self.device)
            with torch.no_grad():
                self._stacks_to_basis(flat, add=False)
                if self._gacc is not None:
                    flat.add_(self._gacc)
        self.delta.grad = flat
        if self.delta_hack is not None:
            self.delta_hack.grad = flat.clone() if self._hack_enabled else None
        return flat

    def merged_weights(self):
        """(module name, W_eff view) for every adapted Linear: what a separate inference engine must copy
        after each merge to generate with the current policy (see rollout.GenerationBackend.sync_weights)."""
        knob = self.knob().detach()
        for g in self.groups:
            for j, m in enumerate(g.idx):
                if self.mode == "merged":
                    yield self.names[m], g.W0[j] if self._disabled else g.W[j]
                else:   # factored: the Linear holds W0; form W_eff the way merge() would
                    a = self.offsets[m]
                    W0 = self._linears[m].weight.detach()
                    out = torch.empty_like(W0)
                    dS = torch.zeros(1, g.r, device=knob.device) if self._disabled else knob[a:a + g.r][None]
                    yield self.names[m], merge_stack(W0[None], g.U[j][None], g.Vh[j][None], dS, out[None])[0]

    # ------------------------------------------------------------------ state
    def knob_state_dict(self, hack: bool = False) -> dict[str, torch.Tensor]:
        """{module name: delta_S} (fp32 clones on the knob's device); hack=True for delta_hack."""
        src = self._src(hack)
        return {n: src[self.offsets[m]:self.offsets[m + 1]].detach().clone() for m, n in enumerate(self.names)}

    def load_knob_state_dict(self, d: dict, hack: bool = False):
        """Load {module name: delta_S}; names and shapes must match exactly. Re-merges in merged mode."""
        missing = [n for n in self.names if n not in d]
        extra = [k for k in d if k not in self._index]
        if missing or extra:
            raise UserError(f"Knob state does not match the adapter: missing {missing[:3]}"
                            f"{'...' if len(missing) > 3 else ''} ({len(missing)}), unexpected {extra[:3]}"
                            f"{'...' if len(extra) > 3 else ''} ({len(extra)}).")
        for m, n in enumerate(self.names):
            if tuple(d[n].shape) != (self.ranks[m],):
                raise UserError(f"Knob {n} has shape {tuple(d[n].shape)}, expected ({self.ranks[m]},).")
        src = self._src(hack)
        with torch.no_grad():
            for m, n in enumerate(self.names):
                src[self.offsets[m]:self.offsets[m + 1]].copy_(d[n])
        self.merge()

    def _src(self, hack):
        if hack and self.delta_hack is None:
            raise UserError("This adapter has no hack knob (with_hack_knob=False).")
        return self.delta_hack if hack else self.delta

    def to(self, device):
        """Move model, knobs (same Parameter objects) and stacks; re-link views. Returns self."""
        device = torch.device(device)
        self.model.to(device)
        for p in self.parameters():
            p.data = p.data.to(device)
            if p.grad is not None:
                p.grad = p.grad.to(device)
        if self._gacc is not None:
            self._gacc = self._gacc.to(device)
        for g in self.groups:
            for attr in ("U", "Vh", "W0", "W", "G"):
                t = getattr(g, attr)
                if t is not None:
                    setattr(g, attr, t.to(device))
        if self.mode == "merged":
            self._link()
        return self

    def remove(self):
        """Detach the adapter: factored hooks removed; merged weights stay W_eff (call after merge)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __repr__(self):
        return (f"SVDAdapter(mode={self.mode}, modules={len(self.names)}, R={self.R}, "
                f"groups={[(g.shape, g.L) for g in self.groups]}, hack_knob={self.delta_hack is not None})")
