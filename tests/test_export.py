"""`pgrpo export`: the exported HF directory loads with plain transformers and gives the trainer's logits exactly;
the embedded tiny model's byte tokenizer round-trips; the route arm's quarantine knob is off unless asked for."""
import os
import subprocess
import sys

import pytest
import torch

from pgrpo import checkpoint as ckpt
from pgrpo import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FDR = os.path.join(ROOT, "jobs", "fast-dev-run.yaml")
QUICK = ["--set", "rollout.max_new_tokens=8", "--set", "grader_workers=1", "--set", "steps=2"]


def pgrpo(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pgrpo", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def trainer_policy(run_dir, hack=True):
    """The policy exactly as pgrpo.train builds it: base model, SVDAdapter, the checkpoint's knobs, merge()."""
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import load_model
    _, tensors, cfg_d, _ = ckpt.load(ckpt.latest(run_dir))
    cfg = C.from_dict(cfg_d, check_files=False)
    model, tok = load_model(cfg.model.name, dtype="float32", device="cpu", seed=cfg.seed)
    cache = cfg.adapter.svd_cache_dir   # the run's SVD basis (a fresh SVD could differ in the last bit)
    ad = SVDAdapter(model, targets=tuple(cfg.adapter.targets), layers=cfg.adapter.layers, mode=cfg.adapter.mode,
                    cache_dir=cache if cache is None else os.path.join(ROOT, cache), with_hack_knob=cfg.arm.name == "route")
    with torch.no_grad():
        ad.delta.copy_(tensors["delta"])
        if ad.delta_hack is not None:
            ad.delta_hack.copy_(tensors["delta_hack"])
            ad.hack_enabled = hack
    ad.merge()
    return model, tok, tensors


def ids_batch(tok):
    texts = [tok.apply_chat_template([{"role": "user", "content": "Write a function. ✓"}]), "def f(x):\n  return 1"]
    seqs = [tok.encode(t) for t in texts]
    n = min(len(s) for s in seqs)
    return torch.tensor([s[:n] for s in seqs])


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("exp") / "run")
    p = pgrpo("train", "--config", FDR, "--out", d, *QUICK)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return d


def test_export_round_trips_logits_and_tokenizer_exactly(vanilla_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "hf"
    p = pgrpo("export", vanilla_run, "--out", str(out))
    assert p.returncode == 0, p.stderr
    model, tok, tensors = trainer_policy(vanilla_run)
    assert tensors["delta"].abs().sum() > 0   # the knobs moved, so this is not the base model
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = ids_batch(tok)
    with torch.no_grad():
        want, got = model(ids).logits, hf(ids).logits
    assert torch.equal(want, got)
    from pgrpo.model import load_model
    base, _ = load_model("tiny", "float32", "cpu", seed=0)
    with torch.no_grad():
        assert not torch.equal(base(ids).logits, got)
    htok = AutoTokenizer.from_pretrained(str(out))
    for s in ["hello wörld ✓ 🎉\n  x", "<|im_start|>user\nhi<|im_end|>\n", "a\tb\r\n\x00"]:
        enc = htok.encode(s, add_special_tokens=False)
        assert enc == tok.encode(s)
        assert htok.decode(enc, skip_special_tokens=True) == tok.decode(enc)
        assert htok.decode(enc, skip_special_tokens=False) == tok.decode(enc, skip_special_tokens=False)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "solve ✓"}]
    assert htok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(msgs)
    assert htok.eos_token_id == tok.eos_token_id and htok.pad_token_id == tok.pad_token_id
    # pgrpo loads the exported dir as an ordinary HF model
    m2, t2 = load_model(str(out), "float32", "cpu")
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, want)
    assert t2.eos_token_ids == tok.eos_token_ids


def test_export_refuses_a_non_empty_out_and_a_missing_step(vanilla_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    p = pgrpo("export", vanilla_run, "--out", str(tmp_path / "full"))
    assert p.returncode == 2 and "not empty" in p.stderr and (tmp_path / "full" / "x").read_text() == "keep me"
    p = pgrpo("export", vanilla_run, "--step", "7", "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "no checkpoint of step 7" in p.stderr and not (tmp_path / "x").exists()


def test_route_export_quarantine_off_by_default(tmp_path):
    from transformers import AutoModelForCausalLM
    import test_train
    vpath, _ = test_train._random_vhack_file(tmp_path)
    d = str(tmp_path / "route")
    p = pgrpo("train", "--config", FDR, "--out", d, *QUICK, "--set", "arm.name=route", "--set", f"arm.vhack_path={vpath}")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert pgrpo("export", d, "--out", str(tmp_path / "off")).returncode == 0
    assert pgrpo("export", d, "--out", str(tmp_path / "on"), "--quarantine", "on").returncode == 0
    off_model, tok, tensors = trainer_policy(d, hack=False)
    on_model, _, _ = trainer_policy(d, hack=True)
    assert tensors["delta_hack"].abs().sum() > 0
    ids = ids_batch(tok)
    with torch.no_grad():
        off = AutoModelForCausalLM.from_pretrained(str(tmp_path / "off"), dtype=torch.float32)(ids).logits
        on = AutoModelForCausalLM.from_pretrained(str(tmp_path / "on"), dtype=torch.float32)(ids).logits
        assert torch.equal(off, off_model(ids).logits) and torch.equal(on, on_model(ids).logits)
        assert not torch.equal(off, on)
