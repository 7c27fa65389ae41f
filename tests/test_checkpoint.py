"""Checkpoints round-trip everything a resume needs, are written atomically, and a corrupted file is
refused with a UserError (and through the CLI with exit 2) instead of being half-loaded."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pgrpo import checkpoint as ckpt
from pgrpo.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _opt_with_state():
    p = torch.nn.Parameter(torch.zeros(10))
    q = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.AdamW([p, q], lr=0.1, betas=(0.9, 0.99))
    for _ in range(3):
        p.grad, q.grad = torch.randn(10), torch.randn(10)
        opt.step()
    return p, q, opt


def _tensors(opt, p):
    t = {"delta": p.detach(), "data_order": torch.arange(12)}
    t.update(ckpt.optimizer_tensors(opt))
    t.update(ckpt.rng_state_tensors())
    return t


def test_roundtrip_restores_optimizer_rng_and_rows(tmp_path):
    torch.manual_seed(1)
    p, q, opt = _opt_with_state()
    random.seed(5)
    np.random.seed(5)
    rows = [{"step": 1, "reward_mean": 0.5}, {"step": 2, "reward_mean": 1.0}]
    path = ckpt.save(str(tmp_path), 2, _tensors(opt, p), {"seed": 3}, rows)
    assert os.path.basename(path) == "ckpt_000002.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000002.safetensors"]  # no temp file left
    expect = (torch.rand(3), random.random(), np.random.rand())

    step, tensors, config, rows2 = ckpt.load(path)
    assert step == 2 and config == {"seed": 3} and rows2 == rows
    assert torch.equal(tensors["delta"], p.detach())
    p2, q2 = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(10))
    opt2 = torch.optim.AdamW([p2, q2], lr=0.1, betas=(0.9, 0.99))
    ckpt.load_optimizer_tensors(opt2, tensors)
    for a, b in ((p, p2), (q, q2)):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][k], opt2.state[b][k])
    ckpt.restore_rng(tensors)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expect[0], got[0]) and expect[1:] == got[1:]
    # the restored optimizer continues exactly like the original
    g = torch.randn(10)
    p.grad, q.grad, p2.data, q2.data = g, g, p.detach().clone(), q.detach().clone()
    p2.grad, q2.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, p2)


def test_latest_picks_highest_step(tmp_path):
    _, _, opt = _opt_with_state()
    p = torch.nn.Parameter(torch.zeros(10))
    for s in (2, 10, 4):
        ckpt.save(str(tmp_path), s, {"delta": p.detach(), "data_order": torch.arange(3),
                                     **ckpt.rng_state_tensors()}, {}, [])
    assert ckpt.latest(str(tmp_path)).endswith("ckpt_000010.safetensors")
    assert ckpt.latest(str(tmp_path / "none")) is None


def _good(tmp_path):
    p, _, opt = _opt_with_state()
    return ckpt.save(str(tmp_path), 3, _tensors(opt, p), {"a": 1}, [{"step": 1}])


@pytest.mark.parametrize("damage", ["truncate", "garble_header", "garble_data", "empty"])
def test_corrupted_file_is_refused(tmp_path, damage):
    path = _good(tmp_path)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garble_header":
        data[8:40] = b"\xff" * 32
    elif damage == "garble_data":  # header intact, one byte of tensor data flipped: caught by the checksum
        hdr = int.from_bytes(data[:8], "little") + 8
        data[(hdr + len(data)) // 2] ^= 0x01
    else:
        data = bytearray()
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError, match="ckpt_000003"):
        ckpt.load(path)


def _meta_ok(**kw):
    t = {"delta": torch.zeros(3), "data_order": torch.arange(3), "rng/torch_cpu": torch.get_rng_state()}
    return t, {"format": ckpt.FORMAT, "step": "1", "config": "{}", "rows": "[]", "sha256": ckpt._digest(t), **kw}


@pytest.mark.parametrize("bad,match", [
    ({"format": "something-else"}, "not a pgrpo checkpoint"),
    ({"step": "x"}, "corrupted metadata"),
    ({"config": "{not json"}, "corrupted metadata"),
    ({"rows": None}, "corrupted metadata"),
    ({"sha256": "0" * 64}, "checksum"),
])
def test_bad_metadata_is_refused(tmp_path, bad, match):
    path = str(tmp_path / "ckpt_000001.safetensors")
    t, meta = _meta_ok()
    save_file(t, path, metadata=meta)
    assert ckpt.load(path)[0] == 1  # the well-formed file loads
    meta = {k: v for k, v in {**meta, **bad}.items() if v is not None}
    save_file(t, path, metadata=meta)
    with pytest.raises(UserError, match=match):
        ckpt.load(path)


def test_cli_resume_refuses_corrupted_checkpoint(tmp_path):
    """`pgrpo train --resume` on a run whose last checkpoint is garbage: one sentence, exit 2, nothing loaded."""
    run = tmp_path / "run"
    run.mkdir()
    # a resolved config.yaml as train writes it, plus a truncated checkpoint
    from pgrpo import config as C
    C.save(C.load(os.path.join(ROOT, "jobs", "fast-dev-run.yaml")), str(run / "config.yaml"))
    path = _good(run)
    open(path, "r+b").truncate(100)
    p = subprocess.run([sys.executable, "-m", "pgrpo", "train", "--resume", str(run)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "corrupted" in p.stderr and "not loaded" in p.stderr
    assert "train:" not in p.stdout and not (run / "metrics.jsonl").exists()
