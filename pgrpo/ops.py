"""The two gradient ops of the merged path, and their pure-torch twins.

Layout shared by every op (the contract the trainer, the adapter and the kernels agree on):

- ``basis_change(G [L,o,i], U [L,o,r], Vh [L,r,i]) -> g [L,r] float32``:
  ``g_l = diag(U_l^T G_l Vh_l^T)``; G/U/Vh may be fp32/bf16/fp16 (same dtype), g is fp32.
- ``project_(g [R] fp32, g_offsets [M+1] int64, v [P] fp32, v_offsets [M+1] int64, ks [M] int64,
  overshoot, one_sided) -> stats [M,2] fp32`` modifies ``g`` in place. Module m owns
  ``g[g_offsets[m]:g_offsets[m+1]]`` (length r_m, ragged allowed) and
  ``v[v_offsets[m]:v_offsets[m+1]]`` viewed as a row-major ``[k_m, r_m]`` matrix with orthonormal
  rows (``k_m = 0``: the module passes through). One-sided: ``c = relu(V g)``; two-sided: ``c = V g``;
  then ``g -= overshoot * c @ V``. ``stats[m] = (||g_before||, ||g_before - g_after||)``.
  All index tensors live on g's device.
- ``svd_grad_project(G, U, Vh, v, v_offsets, ks, overshoot, one_sided) -> (g [L,r], stats [L,2])``:
  both stages fused for one uniform stack of L modules.

The pure-torch twins (``*_torch``) are the reference semantics in tests and the fallback when the
extension ``pgrpo._C`` is not built (or ``PGRPO_DISABLE_EXT=1``): the public names ``basis_change``,
``project_`` and ``svd_grad_project`` validate their inputs (ValueError with one clear sentence), then
call ``torch.ops.pgrpo.*`` when the extension has a kernel for the tensors' device and the twin
otherwise, warning once per process about the slower path.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch


# ----------------------------------------------------------------------------- pure-torch twins

def basis_change_torch(G: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """Reference: g[l, j] = sum_a U[l,a,j] * (G_l Vh_l^T)[a,j]; never forms an r x r product."""
    T = torch.bmm(G.float(), Vh.float().transpose(1, 2))  # [L,o,r]
    return (U.float() * T).sum(dim=1)


def project_torch_(g, g_offsets, v, v_offsets, ks, overshoot: float = 1.0, one_sided: bool = True):
    """Reference projection: a per-module loop, in place on g. Returns stats [M,2]."""
    M = ks.numel()
    stats = torch.zeros(M, 2, dtype=torch.float32, device=g.device)
    go, vo, kk = g_offsets.tolist(), v_offsets.tolist(), ks.tolist()
    for m in range(M):
        gm = g[go[m]:go[m + 1]]
        r, k = gm.numel(), kk[m]
        stats[m, 0] = gm.norm()
        if k == 0 or r == 0:
            continue
        V = v[vo[m]:vo[m] + k * r].view(k, r)
        c = V @ gm
        if one_sided:
            c = c.clamp_min(0)
        removed = overshoot * (c @ V)
        gm.sub_(removed)
        stats[m, 1] = removed.norm()
    return stats


def svd_grad_project_torch(G, U, Vh, v, v_offsets, ks, overshoot: float = 1.0, one_sided: bool = True):
    g = basis_change_torch(G, U, Vh)
    L, r = g.shape
    g_offsets = torch.arange(0, (L + 1) * r, r, dtype=torch.int64, device=g.device)
    flat = g.view(-1)
    stats = project_torch_(flat, g_offsets, v, v_offsets, ks, overshoot, one_sided)
    return g, stats


# ----------------------------------------------------------------------------- packing helper

@dataclass
class PackedVHack:
    """v_hack for M modules packed in the layout ``project_`` expects."""
    v: torch.Tensor          # [P] fp32
    v_offsets: torch.Tensor  # [M+1] int64
    ks: torch.Tensor         # [M] int64

    def to(self, device) -> "PackedVHack":
        return PackedVHack(self.v.to(device), self.v_offsets.to(device), self.ks.to(device))


def pack_vhack(names: Sequence[str], ranks: Sequence[int], vhack: dict, device="cpu") -> PackedVHack:
    """Pack {module name: V [k, r]} in module order; modules absent from ``vhack`` get k = 0."""
    chunks, offsets, ks = [], [0], []
    for name, r in zip(names, ranks):
        V = vhack.get(name)
        if V is None or V.numel() == 0:
            ks.append(0)
            offsets.append(offsets[-1])
            continue
        if V.dim() != 2 or V.shape[1] != r:
            raise ValueError(f"v_hack for {name} has shape {tuple(V.shape)}, expected [k, {r}]")
        chunks.append(V.detach().float().reshape(-1).cpu())
        ks.append(V.shape[0])
        offsets.append(offsets[-1] + V.numel())
    v = torch.cat(chunks) if chunks else torch.zeros(0)
    return PackedVHack(v.to(device), torch.tensor(offsets, dtype=torch.int64, device=device),
                       torch.tensor(ks, dtype=torch.int64, device=device))


# ----------------------------------------------------------------------------- extension loading

HAVE_EXTENSION = False
_EXT_MISSING_WHY = ""
if os.environ.get("PGRPO_DISABLE_EXT") == "1":
    _EXT_MISSING_WHY = "disabled by PGRPO_DISABLE_EXT=1"
else:
    try:
        from pgrpo import _C  # noqa: F401  (registers torch.ops.pgrpo.*)
        HAVE_EXTENSION = True
    except (ImportError, OSError) as e:  # not built, or built against another torch
        _EXT_MISSING_WHY = f"{type(e).__name__}: {e}"

_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


_kernel_cache: dict = {}


def _use_extension(op: str, device: torch.device) -> bool:
    """True when torch.ops.pgrpo.<op> has a kernel for ``device`` (else warn once, use the twin)."""
    if not HAVE_EXTENSION:
        _warn_once("missing", "pgrpo: the C++/CUDA extension pgrpo._C is not available "
                   f"({_EXT_MISSING_WHY}); using the slower pure-torch ops. "
                   "Build it with `pip install -e . --no-build-isolation`.")
        return False
    if device.type == "meta":
        return True
    key = (op, device.type)
    if key not in _kernel_cache:
        dk = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
        _kernel_cache[key] = dk is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"pgrpo::{op}", dk)
    if not _kernel_cache[key]:
        _warn_once(f"device-{device.type}", f"pgrpo: the extension has no {device.type} kernels "
                   "(built without CUDA?); using the pure-torch ops on that device.")
    return _kernel_cache[key]


if HAVE_EXTENSION:
    @torch.library.register_fake("pgrpo::basis_change")
    def _basis_change_fake(G, U, Vh):
        return G.new_empty((G.shape[0], U.shape[2]), dtype=torch.float32)

    @torch.library.register_fake("pgrpo::project_")
    def _project_fake(g, g_offsets, v, v_offsets, ks, overshoot, one_sided):
        return g.new_empty((ks.shape[0], 2), dtype=torch.float32)

    @torch.library.register_fake("pgrpo::svd_grad_project")
    def _svd_grad_project_fake(G, U, Vh, v, v_offsets, ks, overshoot, one_sided):
        L, r = G.shape[0], U.shape[2]
        return G.new_empty((L, r), dtype=torch.float32), G.new_empty((L, 2), dtype=torch.float32)


# ----------------------------------------------------------------------------- input checks
# Metadata checks only (no device sync); offset values and non-finite g are checked by the kernels
# (TORCH_CHECK_VALUE -> ValueError) or, on the twin path, by _check_project_values.

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_basis_change(G, U, Vh, who="basis_change"):
    for name, t in (("G", G), ("U", U), ("Vh", Vh)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{who}: {name} must be a 3-D tensor (G [L,o,i], U [L,o,r], Vh [L,r,i]), "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    L, o, i = G.shape
    if U.shape[:2] != (L, o) or Vh.shape[0] != L or Vh.shape[2] != i or U.shape[2] != Vh.shape[1]:
        raise ValueError(f"{who}: shape mismatch, expected G [L,o,i], U [L,o,r], Vh [L,r,i], got "
                         f"G {list(G.shape)}, U {list(U.shape)}, Vh {list(Vh.shape)}")
    if G.dtype not in _FLOAT_DTYPES or U.dtype != G.dtype or Vh.dtype != G.dtype:
        raise ValueError(f"{who}: G, U, Vh must share one dtype among float32/bfloat16/float16, got "
                         f"{G.dtype}, {U.dtype}, {Vh.dtype}")
    if U.device != G.device or Vh.device != G.device:
        raise ValueError(f"{who}: G, U, Vh must be on one device, got {G.device}, {U.device}, {Vh.device}")


def _check_project_meta(g, g_offsets, v, v_offsets, ks, overshoot, who="project_"):
    if not isinstance(g, torch.Tensor) or g.dim() != 1 or g.dtype != torch.float32 or not g.is_contiguous():
        raise ValueError(f"{who}: g must be a contiguous 1-D float32 tensor, got "
                         f"{getattr(g, 'dtype', type(g).__name__)} {list(getattr(g, 'shape', []))}")
    _check_vhack(g.device, g_offsets, v, v_offsets, ks, overshoot, who)


def _check_vhack(device, g_offsets, v, v_offsets, ks, overshoot, who):
    """v_hack layout checks shared by project_ and svd_grad_project (g_offsets None: built by the op)."""
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.dtype != torch.float32:
        raise ValueError(f"{who}: v must be a 1-D float32 tensor, got "
                         f"{getattr(v, 'dtype', type(v).__name__)} {list(getattr(v, 'shape', []))}")
    index = [("v_offsets", v_offsets), ("ks", ks)] + ([("g_offsets", g_offsets)] if g_offsets is not None else [])
    for name, t in index:
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
            raise ValueError(f"{who}: {name} must be a 1-D int64 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")
    M = ks.numel()
    if v_offsets.numel() != M + 1 or (g_offsets is not None and g_offsets.numel() != M + 1):
        got = f"{g_offsets.numel()} and {v_offsets.numel()}" if g_offsets is not None else f"{v_offsets.numel()}"
        raise ValueError(f"{who}: with M = ks.numel() = {M} modules, g_offsets and v_offsets need M+1 "
                         f"entries, got {got}")
    for name, t in [("v", v)] + index:
        if t.device != device:
            raise ValueError(f"{who}: {name} is on {t.device} but the gradients are on {device}; "
                             "all must share one device")
    if not (isinstance(overshoot, (int, float)) and math.isfinite(float(overshoot))):
        raise ValueError(f"{who}: overshoot must be a finite number, got {overshoot!r}")


def _check_project_values(g, g_offsets, v, v_offsets, ks, who="project_"):
    """Offsets consistency and finite g, for the twin path (the kernels check the same in C++)."""
    go, vo, kk = g_offsets.tolist(), v_offsets.tolist(), ks.tolist()
    M = len(kk)
    if go[0] != 0 or go[M] != g.numel():
        raise ValueError(f"{who}: g_offsets must start at 0 and end at g.numel() = {g.numel()}, "
                         f"got {go[0]} .. {go[M]}")
    if vo[0] != 0 or vo[M] != v.numel():
        raise ValueError(f"{who}: v_offsets must start at 0 and end at v.numel() = {v.numel()}, "
                         f"got {vo[0]} .. {vo[M]}")
    for m in range(M):
        if go[m + 1] < go[m]:
            raise ValueError(f"{who}: g_offsets must be non-decreasing, but g_offsets[{m + 1}] = {go[m + 1]} "
                             f"< g_offsets[{m}] = {go[m]}")
        if kk[m] < 0:
            raise ValueError(f"{who}: ks must be >= 0, got ks[{m}] = {kk[m]}")
    for m in range(M):
        r = go[m + 1] - go[m]
        if vo[m + 1] - vo[m] != kk[m] * r:
            raise ValueError(f"{who}: module {m} has k = {kk[m]} and r = {r} so v_offsets[{m + 1}] - "
                             f"v_offsets[{m}] must be {kk[m] * r}, got {vo[m + 1] - vo[m]}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{who}: g contains non-finite values (NaN or Inf); refusing to project")


# ----------------------------------------------------------------------------- public face

def basis_change(G: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """g [L,r] fp32 with g[l] = diag(U_l^T G_l Vh_l^T): the delta_S gradient from a weight gradient."""
    _check_basis_change(G, U, Vh)
    if _use_extension("basis_change", G.device):
        return torch.ops.pgrpo.basis_change(G, U, Vh)
    return basis_change_torch(G, U, Vh)


def project_(g, g_offsets, v, v_offsets, ks, overshoot: float = 1.0, one_sided: bool = True) -> torch.Tensor:
    """Project every module's slice of the flat g away from its v_hack, in place; returns stats [M,2]."""
    _check_project_meta(g, g_offsets, v, v_offsets, ks, overshoot)
    if _use_extension("project_", g.device):
        return torch.ops.pgrpo.project_(g, g_offsets, v, v_offsets, ks, float(overshoot), bool(one_sided))
    _check_project_values(g, g_offsets, v, v_offsets, ks)
    return project_torch_(g, g_offsets, v, v_offsets, ks, float(overshoot), bool(one_sided))


def svd_grad_project(G, U, Vh, v, v_offsets, ks, overshoot: float = 1.0, one_sided: bool = True):
    """Both stages for one uniform stack of L modules: (g [L,r] fp32 projected, stats [L,2])."""
    who = "svd_grad_project"
    _check_basis_change(G, U, Vh, who)
    L, r = G.shape[0], U.shape[2]
    if not isinstance(ks, torch.Tensor) or ks.dim() != 1 or ks.numel() != L:
        raise ValueError(f"{who}: ks must be a 1-D tensor with one k per module (L = {L}), got "
                         f"{list(getattr(ks, 'shape', []))}")
    _check_vhack(G.device, None, v, v_offsets, ks, overshoot, who)
    if _use_extension("svd_grad_project", G.device):
        return torch.ops.pgrpo.svd_grad_project(G, U, Vh, v, v_offsets, ks, float(overshoot), bool(one_sided))
    g_offsets = torch.arange(L + 1, dtype=torch.int64, device=G.device) * r
    g = basis_change_torch(G, U, Vh)
    flat = g.view(-1)
    _check_project_values(flat, g_offsets, v, v_offsets, ks, who)
    stats = project_torch_(flat, g_offsets, v, v_offsets, ks, float(overshoot), bool(one_sided))
    return g, stats
