"""Every numeric config key's bounds, table-driven: for each bound the value just outside is refused naming the key,
the boundary value itself is accepted. Loosening (or tightening) any bound in pgrpo/config.py breaks a row here; a
new numeric key without a row breaks `test_every_numeric_key_has_a_row`. Plus the adapter's (start, stop) layer
range where an off-by-one would show."""
import dataclasses
import re
import typing

import pytest

from pgrpo import config as C
from pgrpo.errors import UserError

# key: (refused values, accepted boundary values[, extra overrides that make the value meaningful])
TABLE = {
    "data.prompts_per_step": ([0, -1], [1]),
    "data.max_problems": ([-1], [0]),
    "data.eval_problems": ([-1], [0]),
    "data.eval_every": ([-1], [0, 1], ["data.eval_problems=1"]),
    "data.eval_samples": ([0], [1]),
    "rollout.group_size": ([1, 0], [2]),
    "rollout.max_new_tokens": ([0], [1]),
    "rollout.temperature": ([-0.01], [0, 0.0]),
    "rollout.top_p": ([0, 0.0, 1.01], [1e-6, 1.0]),
    "rollout.groups_per_generate": ([-1], [0, 1]),
    "grpo.lr": ([0, -1e-3], [1e-12]),
    "grpo.betas": ([[0.9], [0.9, 0.99, 0.9], [1.0, 0.9], [0.9, 1.0], [-0.01, 0.9]], [[0.0, 0.0], [0.9999, 0.9999]]),
    "grpo.eps": ([0, -1e-8], [1e-30]),
    "grpo.weight_decay": ([-1e-9], [0]),
    "grpo.warmup_steps": ([-1], [0]),
    "grpo.min_lr_ratio": ([-0.01, 1.01], [0, 1]),
    "grpo.clip_eps": ([0, 1, -0.1, 1.5], [1e-6, 0.999]),
    "grpo.kl_coef": ([-1e-6], [0]),
    "grpo.micro_batch": ([-2], [-1, 0, 1]),
    "grpo.max_grad_norm": ([-1e-6], [0]),
    "arm.overshoot": ([0, -1.0], [1e-6, 2.0]),
    "arm.vhack_refresh_every": ([-1], [0]),
    "arm.random_frac": ([0, -0.1, 1.01], [1e-6, 1.0]),
    "probe.every": ([-1], [0, 1]),
    "teacher.mix": ([-0.01, 1.01], [0, 1], ["teacher.pool=builtin"]),
    "steps": ([0, -1], [1]),
    "seed": ([-1], [0]),
    "checkpoint_every": ([-1], [0]),
    "metrics_port": ([-1, 65536], [0, 65535]),
    "metrics_linger_s": ([-0.01], [0]),
    "grader_workers": ([0, 257], [1, 256]),
    "grader_time_limit_s": ([0, -1.0], [1e-3]),
    "cpu_threads": ([-1], [0, 1]),
    "dist_timeout_s": ([0, -1.0], [1e-3]),
}
CHOICES = {
    "device": (["gpu", "cuda0", "cuda:", "CPU", ""], ["auto", "cpu", "cuda", "cuda:0", "cuda:7"]),
    "dtype": (["fp32", "bf16", "float64"], list(C.DTYPES)),
    "adapter.mode": (["fused"], list(C.ADAPTER_MODES)),
    "adapter.merge_rounding": (["up", ""], ["nearest", "stochastic"]),
    "adapter.layers": ([[], [-1]], [None, [0], [0, 1]]),
    "data.loophole": (["overwrite"], list(C.LOOPHOLE_MODES)),
    "grpo.schedule": (["linear"], list(C.SCHEDULES)),
    "grpo.loss_norm": (["sum"], list(C.LOSS_NORMS)),
    "arm.name": (["projection"], ["vanilla"]),
}
ROWS = [(k, v, False, row[2] if len(row) > 2 else []) for k, row in {**TABLE, **CHOICES}.items() for v in row[0]] + \
       [(k, v, True, row[2] if len(row) > 2 else []) for k, row in {**TABLE, **CHOICES}.items() for v in row[1]]


def _load(key, value, extra):
    d = {}
    for ov in extra:
        k, v = ov.split("=", 1)
        C._set_dotted(d, k, v)
    cur = d
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return C.from_dict(d, check_files=False)


@pytest.mark.parametrize("key,value,ok,extra", ROWS, ids=[f"{k}={v!r}-{'ok' if ok else 'refused'}" for k, v, ok, _ in ROWS])
def test_bounds(key, value, ok, extra):
    if ok:
        cfg = _load(key, value, extra)
        got = cfg
        for p in key.split("."):
            got = getattr(got, p)
        assert got == value
    else:
        with pytest.raises(UserError, match="config key " + re.escape(key) + " "):
            _load(key, value, extra)


def _numeric_keys(cls=C.Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, f"{prefix}{f.name}.")
            continue
        args = typing.get_args(tp)
        inner = args[0] if typing.get_origin(tp) is list else tp
        if typing.get_origin(tp) is typing.Union:
            inner = [a for a in args if a is not type(None)][0]
        if inner in (int, float):
            yield prefix + f.name


def test_every_numeric_key_has_a_row():
    missing = sorted(set(_numeric_keys()) - set(TABLE) - set(CHOICES))
    assert not missing, f"numeric config keys without a bounds row: {missing}"


def test_eval_every_needs_held_out_problems():
    with pytest.raises(UserError, match="data.eval_every needs data.eval_problems"):
        C.load(overrides=["data.eval_every=1"])


def test_projected_arm_needs_a_vhack():
    with pytest.raises(UserError, match="config key arm.vhack_path must point at a v_hack file"):
        C.load(overrides=["arm.name=projected"])


def test_adapter_layer_range_is_half_open_where_an_off_by_one_shows():
    """(start, stop) on a 4-layer model with stop < 4: an inclusive stop would add layer 3, a shifted start would
    drop layer 1."""
    from pgrpo.adapter import SVDAdapter
    from pgrpo.model import build_tiny_model
    m = build_tiny_model(num_hidden_layers=4)
    ad = SVDAdapter(m, targets=("q_proj",), layers=(1, 3), mode="merged")
    assert ad.names == ["model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    ad = SVDAdapter(build_tiny_model(num_hidden_layers=4), targets=("q_proj",), layers=(0, 1), mode="merged")
    assert ad.names == ["model.layers.0.self_attn.q_proj"]
    ad = SVDAdapter(build_tiny_model(num_hidden_layers=4), targets=("q_proj",), layers=range(2, 4), mode="merged")
    assert ad.names == ["model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    with pytest.raises(UserError, match="No Linear module matches"):
        SVDAdapter(build_tiny_model(num_hidden_layers=4), targets=("q_proj",), layers=(2, 2), mode="merged")
