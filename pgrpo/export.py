"""`pgrpo export RUN [--step N] --out DIR [--quarantine off|on]`: a plain Hugging Face model directory.

The trainer's policy is the base model with every adapted Linear's weight replaced by W_eff = W0 + U diag(delta_S) Vh
(`SVDAdapter.merge`). Export rebuilds exactly that from the run's checkpoint (same config, same SVD basis) and
saves the merged weights with `save_pretrained`, so `AutoModelForCausalLM.from_pretrained(DIR)` gives the trainer's
logits bit for bit (tests/test_export.py), with no pgrpo code needed to load it.

- The route arm's quarantine knob delta_S_hack is off by default (`--quarantine off`): the deployed policy, the one
  the held-out evaluation measures. `--quarantine on` keeps it (the policy that generated the training rollouts).
- The tokenizer: an HF model's own tokenizer is saved next to it. The embedded tiny model's ByteTokenizer is
  written as an equivalent `tokenizers` byte-level tokenizer (ids 0..255 = bytes, then the four specials, and the
  same chat template), which encodes, decodes and renders chats identically.
- The directory is written under a temp name beside DIR and renamed into place: never half a model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

from pgrpo import checkpoint as ckpt
from pgrpo import config as C
from pgrpo.errors import UserError
from pgrpo.files import check_out_dir

# the ByteTokenizer's chat template (pgrpo.model.ByteTokenizer.apply_chat_template) as Jinja
BYTE_CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer_hf():
    """The embedded ByteTokenizer as a transformers PreTrainedTokenizerFast with the same ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    from pgrpo.model import ByteTokenizer
    b2u = bytes_to_unicode()   # the byte-level pre-tokenizer's byte -> printable char map
    t = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[], fuse_unk=False))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ByteTokenizer.SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   chat_template=BYTE_CHAT_TEMPLATE)


def policy_from_run(run_dir: str, step: int | None = None, quarantine: bool = False, device: str = "cpu"):
    """(model with merged weights, tokenizer, config, step) of a run's checkpoint, as the trainer had it."""
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import load_model, resolve_device_dtype
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run directory.")
    if step is None:
        _, (step, tensors, cfg_d, _) = ckpt.load_newest(run_dir)
    else:
        path = os.path.join(run_dir, f"ckpt_{step:06d}.safetensors")
        if not os.path.isfile(path):
            have = ", ".join(str(s) for s, _ in sorted(ckpt.steps_of(run_dir))) or "none"
            raise UserError(f"{run_dir}: no checkpoint of step {step} (checkpointed steps: {have}).")
        step, tensors, cfg_d, _ = ckpt.load(path)
    cfg = C.from_dict(cfg_d, check_files=False)
    # the run's dtype, on the device asked for here (a run trained on cuda exports on a CPU-only machine too)
    _, dtype = resolve_device_dtype(C.from_dict(dict(cfg_d, device=device), check_files=False))
    model, tok = load_model(cfg.model.name, dtype=dtype, device=device, seed=cfg.seed)
    ad = SVDAdapter(model, targets=tuple(cfg.adapter.targets), layers=cfg.adapter.layers, mode="merged",
                    cache_dir=cfg.adapter.svd_cache_dir, with_hack_knob=cfg.arm.name == "route")
    if tensors["delta"].shape != ad.delta.shape:
        raise UserError(f"{run_dir}: the checkpoint's delta_S does not fit the model its config names.")
    with torch.no_grad():
        ad.delta.copy_(tensors["delta"])
        if ad.delta_hack is not None and "delta_hack" in tensors:
            ad.delta_hack.copy_(tensors["delta_hack"])
    if ad.delta_hack is not None and not quarantine:
        ad.hack_enabled = False
    ad.merge()
    for lin in ad._linears:   # own storage per weight (merged weights are views of a per-shape stack)
        lin.weight = torch.nn.Parameter(lin.weight.data.clone(), requires_grad=False)
    ad.remove()
    return model, tok, cfg, step


def export(run_dir: str, out: str, step: int | None = None, quarantine: bool = False) -> dict:
    check_out_dir(out)
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"--out {out} is not empty; give a new directory (export never overwrites a model).")
    model, tok, cfg, step = policy_from_run(run_dir, step, quarantine)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        hf_tok = byte_tokenizer_hf() if cfg.model.name == "tiny" or cfg.model.name.startswith("tiny:") else tok.tok
        hf_tok.save_pretrained(tmp)
        info = {"run": os.path.abspath(run_dir), "step": step, "arm": cfg.arm.name, "seed": cfg.seed,
                "base_model": cfg.model.name, "quarantine": quarantine, "config": C.to_dict(cfg)}
        with open(os.path.join(tmp, "pgrpo_export.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)   # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def cli(argv) -> int:
    ap = argparse.ArgumentParser(prog="pgrpo export", description="Write a run's policy as a plain HF model dir.")
    ap.add_argument("run", help="run directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--out", required=True, help="new (or empty) output directory")
    ap.add_argument("--quarantine", choices=("off", "on"), default="off",
                    help="route arm: keep the quarantine knob delta_S_hack (default off: the deployed policy)")
    a = ap.parse_args(argv)
    info = export(a.run, a.out, step=a.step, quarantine=a.quarantine == "on")
    print(f"export: {a.run} step {info['step']} ({info['arm']}, quarantine {a.quarantine}) -> {a.out}; "
          f"load it with AutoModelForCausalLM.from_pretrained({a.out!r})", file=sys.stderr)
    return 0
