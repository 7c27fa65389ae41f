"""Config: presets load, overrides apply, and every kind of mistake stops with the dotted key's name
before any model is loaded (checked through the real CLI in a subprocess)."""
import os
import subprocess
import sys
import time

import pytest
import yaml

from pgrpo import config as C
from pgrpo.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(ROOT, "jobs")
PRESETS = ["fast-dev-run", "smoke-vanilla", "smoke-projected", "full-vanilla", "full-projected"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = C.load(os.path.join(JOBS, f"{name}.yaml"), check_files=False)
    assert cfg.rollout.group_size >= 2
    if name.startswith("full"):
        assert cfg.model.name == "Qwen/Qwen3-4B" and cfg.dtype == "bfloat16"
        assert cfg.data.prompts_per_step * cfg.rollout.group_size == 258
        assert 1024 <= cfg.rollout.max_new_tokens <= 1536
        assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.steps) == (0.7, 0.95, 200)
    if name.endswith("projected"):
        assert cfg.arm.name == "projected" and cfg.arm.vhack_path
    if name == "fast-dev-run":
        assert cfg.model.name == "tiny" and 0 < cfg.checkpoint_every < cfg.steps


def test_overrides_parse_as_yaml_and_apply():
    cfg = C.load(os.path.join(JOBS, "fast-dev-run.yaml"),
                 ["grpo.lr=3e-4", "grpo.betas=[0.8, 0.9]", "rollout.group_size=8", "arm.one_sided=false",
                  "grader_socket=/tmp/g.sock", "adapter.layers=[0, 1]", "grpo.weight_decay=1"])
    assert cfg.grpo.lr == 3e-4 and cfg.grpo.betas == [0.8, 0.9] and cfg.rollout.group_size == 8
    assert cfg.arm.one_sided is False and cfg.grader_socket == "/tmp/g.sock" and cfg.adapter.layers == [0, 1]
    assert cfg.grpo.weight_decay == 1.0 and isinstance(cfg.grpo.weight_decay, float)  # int accepted as a float


@pytest.mark.parametrize("overrides,key", [
    (["grpo.lr_rate=1"], "grpo.lr_rate"),
    (["nonsense=1"], "nonsense"),
    (["rollout.group_size=four"], "rollout.group_size"),
    (["steps=1.5"], "steps"),
    (["arm.one_sided=maybe"], "arm.one_sided"),
    (["grpo.betas=0.9"], "grpo.betas"),
    (["rollout.group_size=1"], "rollout.group_size"),
    (["grpo.lr=0"], "grpo.lr"),
    (["rollout.temperature=-0.1"], "rollout.temperature"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["rollout.top_p=0"], "rollout.top_p"),
    (["arm.name=magic"], "arm.name"),
    (["adapter.mode=lora"], "adapter.mode"),
    (["arm.name=projected"], "arm.vhack_path"),
    (["arm.vhack_path=/nonexistent/v.safetensors"], "arm.vhack_path"),
    (["data.loophole=backdoor"], "data.loophole"),
    (["grpo.betas=[0.9, 1.0]"], "grpo.betas"),
    (["grpo.loss_norm=mean"], "grpo.loss_norm"),
    (["teacher.mix=0.5", "teacher.pool=null"], "teacher.pool"),
    (["metrics_port=70000"], "metrics_port"),
    (["rollout=3"], "rollout"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(UserError) as e:
        C.load(os.path.join(JOBS, "fast-dev-run.yaml"), overrides)
    assert key in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"rollout": {"group_size": 4, "max_new_token": 5}}))
    with pytest.raises(UserError, match=r"rollout\.max_new_token"):
        C.load(str(p))
    p.write_text("rollout: [1, 2]\n")
    with pytest.raises(UserError, match="rollout"):
        C.load(str(p))
    p.write_text("rollout: {group_size: 4\n")
    with pytest.raises(UserError, match="not valid YAML"):
        C.load(str(p))


def test_save_roundtrip(tmp_path):
    cfg = C.load(os.path.join(JOBS, "full-vanilla.yaml"), ["seed=7"])
    path = str(tmp_path / "config.yaml")
    C.save(cfg, path)
    assert C.load(path) == cfg
    assert os.listdir(tmp_path) == ["config.yaml"]  # no temp file left behind


@pytest.mark.parametrize("args,key", [
    (["--set", "rollout.group_size=1"], "rollout.group_size"),
    (["--set", "grpo.lr_rate=0.1"], "grpo.lr_rate"),
    (["--set", "rollout.temperature=hot"], "rollout.temperature"),
])
def test_cli_rejects_before_loading_a_model(tmp_path, args, key):
    out = tmp_path / "run"
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pgrpo", "train", "--config", os.path.join(JOBS, "fast-dev-run.yaml"),
                        "--out", str(out), *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2, p.stderr
    assert key in p.stderr and len(p.stderr.strip().splitlines()) == 1  # one sentence, no traceback
    assert "train:" not in p.stdout     # the model-loaded banner never printed
    assert not out.exists()             # nothing was created
    assert time.time() - t0 < 30


def test_cli_bad_flags_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pgrpo", "train", "--bogus"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "--bogus" in p.stderr
    p = subprocess.run([sys.executable, "-m", "pgrpo", "train", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 2 and "does not exist" in p.stderr
