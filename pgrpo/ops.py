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
extension ``pgrpo._C`` is not built.
"""
from __future__ import annotations

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


# ----------------------------------------------------------------------------- public face
# The extension-backed versions (torch.ops.pgrpo.*) replace these names when pgrpo._C is built.

basis_change = basis_change_torch
project_ = project_torch_
svd_grad_project = svd_grad_project_torch
HAVE_EXTENSION = False
