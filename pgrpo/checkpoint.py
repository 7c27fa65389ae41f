"""Checkpoints: one safetensors file per save, everything needed to continue bit for bit.

Tensors: the knobs (`delta`, `delta_hack`), AdamW state (`optim/<i>/exp_avg`, `optim/<i>/exp_avg_sq`,
`optim/<i>/step`), the data order, and the RNG states (torch cpu/cuda, python `random`, numpy) stored as
uint8 tensors. Metadata (safetensors allows only str -> str): format version, step, the resolved config and
the per-step metric rows as JSON strings, so a checkpoint alone says how it was made and what it did, and a
sha256 over all tensors (a flipped byte in the data would otherwise load silently).

Written to a temp name in the same directory and `os.replace`d, so a crash never leaves a half-written
`ckpt_*.safetensors`; a file that is corrupted anyway (truncated, garbled, wrong metadata) is refused with a
UserError and never half-loaded.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import random
import re

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pgrpo.errors import UserError

FORMAT = "pgrpo-ckpt-1"
_NAME = re.compile(r"ckpt_(\d{6})\.safetensors$")


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).clone() if b else torch.zeros(0, dtype=torch.uint8)


def rng_state_tensors() -> dict[str, torch.Tensor]:
    out = {
        "rng/torch_cpu": torch.get_rng_state().clone(),
        "rng/python": _bytes_tensor(pickle.dumps(random.getstate())),
        "rng/numpy": _bytes_tensor(pickle.dumps(np.random.get_state())),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/cuda_{i}"] = s.clone()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng/torch_cpu"])
    random.setstate(pickle.loads(tensors["rng/python"].numpy().tobytes()))
    np.random.set_state(pickle.loads(tensors["rng/numpy"].numpy().tobytes()))
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as flat named tensors (param index order = the optimizer's param order)."""
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            out[f"optim/{i}/{k}"] = t.detach().cpu().contiguous()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        state = {}
        for name, t in tensors.items():
            pre = f"optim/{i}/"
            if name.startswith(pre):
                k = name[len(pre):]
                # AdamW keeps `step` as a cpu scalar tensor (capturable=False); moments live with the param
                state[k] = t.clone() if k == "step" else t.to(p.device, dtype=p.dtype if t.is_floating_point() else t.dtype).clone()
        if state:
            opt.state[p] = state


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: any flipped byte of the data is caught on load."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(run_dir: str, step: int, tensors: dict[str, torch.Tensor], config: dict, rows: list[dict],
         info: dict | None = None) -> str:
    """Write run_dir/ckpt_{step:06d}.safetensors atomically and return its path. `info`: facts about the run that
    are not config (e.g. the sha256 of the v_hack file it started from), read back by `info()`."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "step": str(step),
        "config": json.dumps(config),
        "rows": json.dumps(rows),
        "info": json.dumps(info or {}),
        "sha256": _digest(tensors),
    }
    path = os.path.join(run_dir, f"ckpt_{step:06d}.safetensors")
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path: str) -> tuple[int, dict[str, torch.Tensor], dict, list[dict]]:
    """Read a checkpoint -> (step, tensors, config dict, rows); any corruption is a UserError."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist.") from None
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers and data
        raise UserError(f"checkpoint {path} is corrupted and was not loaded ({type(e).__name__}: {str(e)[:120]}).") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a pgrpo checkpoint (metadata format {meta.get('format')!r}); not loaded.")
    try:
        step = int(meta["step"])
        config = json.loads(meta["config"])
        rows = json.loads(meta["rows"])
        if not isinstance(config, dict) or not isinstance(rows, list):
            raise ValueError("config must be an object and rows a list")
    except (KeyError, ValueError) as e:
        raise UserError(f"checkpoint {path} has corrupted metadata ({e}); not loaded.") from None
    if meta.get("sha256") != _digest(tensors):
        raise UserError(f"checkpoint {path} is corrupted (its tensors do not match the checksum in its metadata); not loaded.")
    for need in ("delta", "data_order", "rng/torch_cpu"):
        if need not in tensors:
            raise UserError(f"checkpoint {path} lacks tensor {need!r}; not loaded.")
    if not torch.isfinite(tensors["delta"]).all():
        raise UserError(f"checkpoint {path} holds non-finite delta_S values; not loaded.")
    return step, tensors, config, rows


def info(path: str) -> dict:
    """The `info` metadata of a checkpoint ({} for one written before it existed); no tensor is read."""
    try:
        with safe_open(path, framework="pt") as f:
            d = json.loads((f.metadata() or {}).get("info", "{}"))
    except Exception:
        return {}
    return d if isinstance(d, dict) else {}


def steps_of(run_dir: str) -> list[tuple[int, str]]:
    """[(step, path)] of every ckpt_NNNNNN.safetensors in run_dir, newest first."""
    found = []
    for p in glob.glob(os.path.join(run_dir, "ckpt_*.safetensors")):
        m = _NAME.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def load_newest(run_dir: str) -> tuple[str, tuple]:
    """(path, load(path)) of the newest checkpoint. A corrupted newest one is refused, and the message names the
    newest intact one and how to resume from it (the corrupted file is never moved or deleted by us)."""
    found = steps_of(run_dir)
    if not found:
        raise UserError(f"--resume {run_dir}: no checkpoint (ckpt_*.safetensors) in that directory.")
    path = found[0][1]
    try:
        return path, load(path)
    except UserError as e:
        first = str(e)
    for step, older in found[1:]:
        try:
            load(older)
        except UserError:
            continue
        raise UserError(f"{first.rstrip('.')}; the newest intact checkpoint is {older} (step {step}): to resume "
                        f"from it, move the damaged file aside (mv {path} {path}.corrupt) and run "
                        f"`pgrpo train --resume {run_dir}` again.")
    raise UserError(f"{first.rstrip('.')}; no older intact checkpoint in {run_dir} either, so the run must start "
                    f"over (--overwrite).")


def latest(run_dir: str) -> str | None:
    """Path of the newest checkpoint in run_dir (by step in the name), or None."""
    found = []
    for p in glob.glob(os.path.join(run_dir, "ckpt_*.safetensors")):
        m = _NAME.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None
