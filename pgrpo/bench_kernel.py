"""`pgrpo bench kernel`: the gradient ops, three ways, on shapes that mimic Qwen3-4B.

For every stage (basis change G_W -> g, projection of g against v_hack, and both fused) it times, in
one run and on the same inputs: (a) the per-module pure-torch Python loop a careful researcher writes (one GEMM into the smaller
intermediate and a dot, no r x r product), (b) the best batched pure-torch version (one bmm per shape
group into the smaller intermediate; a padded bmm for the projection), and
(c) the extension (torch.ops.pgrpo.*). It reports medians, speedups, the max abs error of each
against a float64 reference, and, for the projection, the fraction of two memory-bandwidth ceilings
measured in the same run: a copy of the projection's own working-set size (the fair one: the same cache
level) and a large main-memory copy.

CPU: Qwen3-4B dims divided by --scale (default 8) and 8 layers (7 kinds x 8 = 56 modules).
CUDA: the real Qwen3-4B shapes (36 layers, 252 modules, bf16).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from pgrpo import ops
from pgrpo.errors import UserError

# Qwen3-4B: hidden 2560, intermediate 9728, 32 q heads x 128, 8 kv heads x 128, 36 layers.
QWEN3_4B = {"hidden": 2560, "intermediate": 9728, "q": 32 * 128, "kv": 8 * 128, "layers": 36}


def module_shapes(scale: int) -> list[tuple[str, int, int]]:
    """(kind, d_out, d_in) for the 7 adapted Linears of one decoder layer."""
    h, f = QWEN3_4B["hidden"] // scale, QWEN3_4B["intermediate"] // scale
    q, kv = QWEN3_4B["q"] // scale, QWEN3_4B["kv"] // scale
    return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
            ("gate_proj", f, h), ("up_proj", f, h), ("down_proj", h, f)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, repeat: int, reset=None, min_total_s: float = 0.2, max_calls: int = 2000):
    """(median, min) seconds of fn() over >= repeat calls (more for fast ops), reset() untimed before each."""
    return time_round_robin({"fn": (fn, reset)}, device, repeat, min_total_s, max_calls)["fn"]


def time_round_robin(fns: dict, device, repeat: int, min_total_s: float = 0.3, max_rounds: int = 1000) -> dict:
    """(median, min) seconds per impl, timing the impls in turn (one call each per round, rotating order).

    The machine may be shared: interleaving makes every impl see the same background load, so the
    ratios stay meaningful even when absolute times wobble. Fast ops get more rounds (up to
    max_rounds or min_total_s of total timed work); reset() runs untimed before each call."""
    names = list(fns)
    for name in names:  # warm-up
        fn, reset = fns[name]
        for _ in range(2):
            if reset:
                reset()
            fn()
    samples = {n: [] for n in names}
    total, rounds = 0.0, 0
    while rounds < repeat or (total < min_total_s and rounds < max_rounds):
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name in order:
            fn, reset = fns[name]
            if reset:
                reset()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            dt = time.perf_counter() - t0
            samples[name].append(dt)
            total += dt
        rounds += 1
    return {n: (statistics.median(v), min(v)) for n, v in samples.items()}


# ----------------------------------------------------------------------------- problem

def build_problem(device, dtype, scale, layers, k, seed=0):
    """Stacks per shape group (as the adapter hands them over) and v_hack packed in group-major order."""
    gen = torch.Generator().manual_seed(seed)  # v_hack (small) on the CPU
    dgen = torch.Generator(device=device).manual_seed(seed)  # the big stacks straight on the device
    groups = {}  # (o, i) -> list of kinds
    for kind, o, i in module_shapes(scale):
        groups.setdefault((o, i), []).append(kind)
    stacks, names, ranks, vh = [], [], [], {}
    for (o, i), kinds in groups.items():
        L, r = layers * len(kinds), min(o, i)
        G = torch.randn(L, o, i, generator=dgen, device=device, dtype=dtype)
        U = torch.randn(L, o, r, generator=dgen, device=device, dtype=dtype).div_(math.sqrt(o))
        Vh = torch.randn(L, r, i, generator=dgen, device=device, dtype=dtype).div_(math.sqrt(i))
        gnames = [f"{kind}.{l}" for kind in kinds for l in range(layers)]
        for n in gnames:
            q, _ = torch.linalg.qr(torch.randn(r, min(k, r), generator=gen))
            vh[n] = q.T.contiguous()
        stacks.append({"kinds": kinds, "o": o, "i": i, "r": r, "L": L, "G": G, "U": U, "Vh": Vh,
                       "packed": ops.pack_vhack(gnames, [r] * L, vh, device=device)})
        names += gnames
        ranks += [r] * L
    packed = ops.pack_vhack(names, ranks, vh, device=device)
    offs = [0]
    for r in ranks:
        offs.append(offs[-1] + r)
    g_offsets = torch.tensor(offs, dtype=torch.int64, device=device)
    return stacks, packed, g_offsets, names, ranks, vh


# ----------------------------------------------------------------------------- (a) per-module loops

def basis_loop(stacks):
    """One module at a time, the way a careful researcher writes it: one GEMM into the smaller intermediate
    (U^T G [r, i] for tall modules, G Vh^T [o, r] otherwise) and a row/column dot, never the full r x r
    product U^T G Vh^T of which only the diagonal is needed."""
    out = []
    for s in stacks:
        tall = s["o"] > s["i"]
        for l in range(s["L"]):
            U, G, Vh = s["U"][l].float(), s["G"][l].float(), s["Vh"][l].float()
            out.append((U.T @ G * Vh).sum(1) if tall else (U * (G @ Vh.T)).sum(0))
    return torch.cat(out)


def project_loop(g, g_offsets, packed, overshoot, one_sided):
    return ops.project_torch_(g, g_offsets, packed.v, packed.v_offsets, packed.ks, overshoot, one_sided)


# ----------------------------------------------------------------------------- (b) batched torch

def basis_batched(stacks):
    """One bmm per shape group into the smaller intermediate (U^T G for tall modules, else G Vh^T), fp32
    accumulate (bmm's out_dtype on CUDA for bf16/fp16), then the batched row/column dot."""
    out = []
    for s in stacks:
        G, U, Vh = s["G"], s["U"], s["Vh"]
        low_cuda = G.is_cuda and G.dtype != torch.float32

        def mm(a, b):
            return torch.bmm(a, b, out_dtype=torch.float32) if low_cuda else torch.bmm(a.float(), b.float())
        if s["o"] > s["i"]:
            g = (mm(U.transpose(1, 2), G) * Vh).sum(dim=2)          # [L, r, i] intermediate, i = r
        else:
            g = (U * mm(G, Vh.transpose(1, 2))).sum(dim=1)          # [L, o, r] intermediate, o = r
        out.append(g.reshape(-1))
    return torch.cat(out)


class PaddedProjection:
    """All modules in one padded [M, kmax, rmax] bmm pair; g is scattered in and gathered out."""

    def __init__(self, names, ranks, vh, device):
        M, rmax = len(ranks), max(ranks)
        kmax = max([vh[n].shape[0] for n in names if n in vh] or [1])
        self.Vp = torch.zeros(M, kmax, rmax, device=device)
        idx = []
        for m, (n, r) in enumerate(zip(names, ranks)):
            if n in vh:
                self.Vp[m, : vh[n].shape[0], :r] = vh[n].to(device)
            idx.append(torch.arange(r) + m * rmax)
        self.idx = torch.cat(idx).to(device)
        self.M, self.rmax = M, rmax

    def __call__(self, g, overshoot, one_sided):
        gp = g.new_zeros(self.M * self.rmax)
        gp[self.idx] = g
        gp = gp.view(self.M, self.rmax)
        before = gp.norm(dim=1)
        c = torch.bmm(self.Vp, gp.unsqueeze(2)).squeeze(2)
        if one_sided:
            c.clamp_min_(0)
        d = torch.bmm((overshoot * c).unsqueeze(1), self.Vp).squeeze(1)
        g.sub_(d.view(-1)[self.idx])
        return torch.stack([before, d.norm(dim=1)], dim=1)


# ----------------------------------------------------------------------------- (c) extension

def basis_ext(stacks):
    return torch.cat([torch.ops.pgrpo.basis_change(s["G"], s["U"], s["Vh"]).reshape(-1) for s in stacks])


def project_ext(g, g_offsets, packed, overshoot, one_sided):
    return torch.ops.pgrpo.project_(g, g_offsets, packed.v, packed.v_offsets, packed.ks, overshoot, one_sided)


def fused_ext(stacks, overshoot, one_sided):
    gs = []
    for s in stacks:
        p = s["packed"]
        g, _ = torch.ops.pgrpo.svd_grad_project(s["G"], s["U"], s["Vh"], p.v, p.v_offsets, p.ks,
                                                overshoot, one_sided)
        gs.append(g.reshape(-1))
    return torch.cat(gs)


# ----------------------------------------------------------------------------- run

def run(device, dtype, scale, layers, k, repeat, overshoot=1.0, one_sided=True):
    stacks, packed, g_offsets, names, ranks, vh = build_problem(device, dtype, scale, layers, k)
    M, R = len(ranks), sum(ranks)
    have_ext = ops.HAVE_EXTENSION and ops._use_extension("project_", device)

    # float64 references
    ref_g = torch.cat([(s["U"][l].double() * (s["G"][l].double() @ s["Vh"][l].double().T)).sum(dim=0)
                       for s in stacks for l in range(s["L"])])  # one module at a time: bounded memory
    ref_p = ref_g.clone()
    ops.project_torch_(ref_p, g_offsets, packed.v.double(), packed.v_offsets, packed.ks, overshoot, one_sided)
    g0 = basis_batched(stacks)  # the projection stage's input (fp32)

    def err(x, ref):
        return float((x.double() - ref).abs().max())

    impls, results = {}, {}
    padded = PaddedProjection(names, ranks, vh, device)
    work = g0.clone()

    def reset():
        work.copy_(g0)

    def project_ref():
        r = g0.double().clone()
        ops.project_torch_(r, g_offsets, packed.v.double(), packed.v_offsets, packed.ks, overshoot, one_sided)
        return r

    ref_proj_of_g0 = project_ref()

    stages = {
        "basis_change": {
            "torch_loop": (lambda: basis_loop(stacks), None),
            "torch_batched": (lambda: basis_batched(stacks), None),
            "extension": (lambda: basis_ext(stacks), None),
        },
        "projection": {
            "torch_loop": (lambda: project_loop(work, g_offsets, packed, overshoot, one_sided), reset),
            "torch_batched": (lambda: padded(work, overshoot, one_sided), reset),
            "extension": (lambda: project_ext(work, g_offsets, packed, overshoot, one_sided), reset),
        },
        "fused": {
            "torch_loop": (lambda: _fused_loop(stacks, g_offsets, packed, overshoot, one_sided), None),
            "torch_batched": (lambda: _fused_batched(stacks, padded, overshoot, one_sided), None),
            "extension": (lambda: fused_ext(stacks, overshoot, one_sided), None),
        },
    }
    refs = {"basis_change": ref_g, "projection": ref_proj_of_g0, "fused": ref_p}
    for stage, table in stages.items():
        if not have_ext:
            table.pop("extension")
        errs = {}
        for name, (fn, rst) in table.items():
            if rst:
                rst()
            out = fn()
            errs[name] = err(work if stage == "projection" else out, refs[stage])
        times = time_round_robin(table, device, repeat)
        for name in table:
            impls[f"{stage}/{name}"] = {"median_s": times[name][0], "min_s": times[name][1],
                                        "max_abs_err": errs[name]}

    # memory-bandwidth ceilings, timed in this same run: a large copy (DRAM; read + write), and a copy
    # whose read + write equals the projection's bytes (what the caches deliver for that working set).
    # A ceiling is the best the machine did, so it uses the fastest copy, not the median.
    proj_bytes = 4 * packed.v.numel() + 2 * 4 * R + 8 * (3 * M + 2) + 4 * 2 * M  # v, g r/w, indices, stats
    ceilings = {}
    for label, n in (("dram", (256 << 20) // 4 if device.type == "cuda" else (64 << 20) // 4),
                     ("same_size", max(1, proj_bytes // 8))):
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        t_copy = time_fn(lambda: dst.copy_(src), device, max(3, repeat))[1]
        if device.type == "cpu" and torch.get_num_threads() > 1:  # a busy machine may favour one thread
            nt = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                t_copy = min(t_copy, time_fn(lambda: dst.copy_(src), device, max(3, repeat))[1])
            finally:
                torch.set_num_threads(nt)
        ceilings[label] = 2 * src.numel() * 4 / t_copy
        del src, dst
    copy_bw = ceilings["dram"]

    def speed(base, key="median_s"):
        out = {}
        for stage in stages:
            b, x = impls.get(f"{stage}/{base}"), impls.get(f"{stage}/extension")
            out[stage] = (b[key] / x[key]) if (b and x) else None
        return out

    bw = {"copy_bytes_per_s": copy_bw, "copy_same_size_bytes_per_s": ceilings["same_size"],
          "projection_bytes": proj_bytes}
    for name in ("torch_loop", "torch_batched", "extension"):
        x = impls.get(f"projection/{name}")
        if x:
            bw[f"projection_{name}_bytes_per_s"] = proj_bytes / x["median_s"]
            bw[f"projection_{name}_fraction_of_copy_bw"] = proj_bytes / x["median_s"] / copy_bw
            bw[f"projection_{name}_fraction_of_same_size_copy_bw"] = proj_bytes / x["median_s"] / ceilings["same_size"]
    results = {
        "device": str(device) if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(device)})",
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "extension": have_ext,
        "modules": M,
        "layers": layers,
        "scale": scale,
        "k": k,
        "overshoot": overshoot,
        "one_sided": one_sided,
        "total_rank": R,
        "shapes": [{"kinds": s["kinds"], "d_out": s["o"], "d_in": s["i"], "r": s["r"], "stack": s["L"]}
                   for s in stacks],
        "impls": impls,
        "speedup_vs_torch_loop": speed("torch_loop"),
        "speedup_vs_torch_batched": speed("torch_batched"),
        "speedup_min_vs_torch_loop": speed("torch_loop", "min_s"),
        "speedup_min_vs_torch_batched": speed("torch_batched", "min_s"),
        "bandwidth": bw,
    }
    return results


def _fused_loop(stacks, g_offsets, packed, overshoot, one_sided):
    g = basis_loop(stacks)
    project_loop(g, g_offsets, packed, overshoot, one_sided)
    return g


def _fused_batched(stacks, padded, overshoot, one_sided):
    g = basis_batched(stacks)
    padded(g, overshoot, one_sided)
    return g


def format_table(res) -> str:
    lines = [f"pgrpo bench kernel: device={res['device']} dtype={res['dtype']} threads={res['threads']} "
             f"modules={res['modules']} (7 kinds x {res['layers']} layers, Qwen3-4B dims / {res['scale']}) "
             f"k={res['k']} total_r={res['total_rank']} one_sided={res['one_sided']} overshoot={res['overshoot']}",
             "shapes: " + ", ".join(f"{'+'.join(s['kinds'])} {s['d_out']}x{s['d_in']} r={s['r']} x{s['stack']}"
                                    for s in res["shapes"]),
             "speedups are median/median (min/min in brackets: the machine may be shared)",
             f"{'stage':<14}{'impl':<15}{'median':>12}{'min':>12}{'max_abs_err':>13}{'vs loop':>18}{'vs batched':>18}"]
    for key, v in res["impls"].items():
        stage, name = key.split("/")
        loop, bat = res["impls"].get(f"{stage}/torch_loop"), res["impls"].get(f"{stage}/torch_batched")

        def ratio(b):
            return f"{b['median_s'] / v['median_s']:.2f}x ({b['min_s'] / v['min_s']:.2f}x)" if b else "-"
        lines.append(f"{stage:<14}{name:<15}{_fmt_t(v['median_s']):>12}{_fmt_t(v['min_s']):>12}"
                     f"{v['max_abs_err']:>13.2e}{ratio(loop):>18}{ratio(bat):>18}")
    bw = res["bandwidth"]
    lines.append(f"memory-bandwidth ceilings (copies timed in this run): a copy of the projection's own working-set "
                 f"size ({bw['projection_bytes'] / 1e6:.2f} MB moved: v_hack + g read/write + offsets + stats) "
                 f"{bw['copy_same_size_bytes_per_s'] / 1e9:.1f} GB/s (the fair ceiling: same cache level); "
                 f"a large main-memory copy {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    for name in ("torch_loop", "torch_batched", "extension"):
        f = bw.get(f"projection_{name}_fraction_of_same_size_copy_bw")
        if f is not None:
            lines.append(f"  projection {name:<14} {bw[f'projection_{name}_bytes_per_s'] / 1e9:7.2f} GB/s = "
                         f"{100 * f:6.1f}% of the same-size copy "
                         f"({100 * bw[f'projection_{name}_fraction_of_copy_bw']:.1f}% of the large copy)")
    return "\n".join(lines)


def _fmt_t(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pgrpo bench kernel", description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 8 on CPU, 36 on CUDA)")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per impl (fast ops get more)")
    ap.add_argument("--scale", type=int, default=None, help="divide Qwen3-4B dims by this (default: 8 CPU, 1 CUDA)")
    ap.add_argument("--k", type=int, default=12, help="rows of v_hack per module")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="dtype of G/U/Vh (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--two-sided", action="store_true", help="two-sided projection (default one-sided)")
    ap.add_argument("--overshoot", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default: torch's")
    a = ap.parse_args(argv)
    if a.threads is not None:
        if a.threads < 1:
            raise UserError("--threads must be >= 1.")
        torch.set_num_threads(a.threads)
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    device = torch.device(dev)
    layers = a.layers or (36 if dev == "cuda" else 8)
    scale = a.scale or (1 if dev == "cuda" else 8)
    if layers < 1 or a.repeat < 1 or scale < 1 or a.k < 0:
        raise UserError("--layers, --repeat and --scale must be >= 1 and --k >= 0.")
    dtype = getattr(torch, a.dtype or ("bfloat16" if dev == "cuda" else "float32"))
    with torch.no_grad():
        res = run(device, dtype, scale, layers, a.k, a.repeat, a.overshoot, not a.two_sided)
    if not res["extension"]:
        ops._warn_once("bench", "pgrpo bench kernel: extension not available; only the torch baselines were timed.")
    print(json.dumps(res) if a.json else format_table(res))
    return 0
