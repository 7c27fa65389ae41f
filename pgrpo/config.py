"""Job configuration: plain nested dataclasses, loaded from a YAML preset plus `--set a.b=value` overrides.

Why strict: a typo in a key (`grpo.lr_rate`) or a value of the wrong type silently falls back to a default
and changes every number a run reports, hours later. So unknown keys, wrong types and impossible values stop
the job with one sentence naming the dotted key, before any model is loaded.

Torch-free on purpose: validation runs before the heavy imports, so a bad flag fails in a fraction of a second.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from pgrpo.errors import UserError

ARMS = ("vanilla", "projected", "route", "random")
ADAPTER_MODES = ("merged", "factored")
LOOPHOLE_MODES = ("none", "run_tests", "sentinel", "stdout_marker", "file_marker")  # = pgrpo.data.prompts
SCHEDULES = ("cosine", "constant")
LOSS_NORMS = ("constant", "token")
DTYPES = ("float32", "bfloat16", "float16", "auto")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name: str = "tiny"                 # "tiny" = the embedded random Qwen3; else an HF id or a local path


@dataclass
class AdapterConfig:
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    layers: Optional[list[int]] = None  # None = every layer; else explicit layer indices
    mode: str = "merged"               # merged (fast path) | factored (reference semantics)
    svd_cache_dir: Optional[str] = ".cache/svd"  # thin SVDs of W0 cached by hash; None = no cache
    merge_rounding: str = "nearest"    # bf16 W_eff from the fp32 merge: nearest | stochastic (unbiased)


@dataclass
class DataConfig:
    problems: str = "builtin"          # "builtin" or a path to a problems .jsonl
    loophole: str = "run_tests"        # loophole mode hinted in every prompt
    prompts_per_step: int = 4          # distinct problems per step; rollouts/step = prompts_per_step * G
    max_problems: int = 0              # 0 = all; else use only the first N problems (quick experiments)
    eval_problems: int = 0             # hold out the file's last N problems for evaluation (never trained on)
    eval_every: int = 0                # evaluate every K steps and at the end; 0 = never
    eval_samples: int = 4              # sampled completions per held-out problem


@dataclass
class RolloutConfig:
    group_size: int = 4                # G completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0           # 0 = greedy
    top_p: float = 1.0
    groups_per_generate: int = 4       # most groups per generate() call (fewer if memory binds); 0 = no cap
    compile: bool = False              # static KV cache + torch.compile of the decode step (HF auto-compile)
    enable_thinking: bool = False      # Qwen3 chat template's thinking mode (False = the empty <think> block)


@dataclass
class GRPOConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0          # decoupled decay pulls delta_S toward 0, i.e. toward the base model
    warmup_steps: int = 0
    schedule: str = "cosine"           # cosine (to min_lr_ratio * lr at the last step) | constant
    min_lr_ratio: float = 0.1
    clip_eps: float = 0.2              # PPO clip epsilon
    kl_coef: float = 0.0               # k3 KL to the delta_S = 0 reference; 0 skips the reference forward
    std_scale_adv: bool = False        # divide advantages by the group std (GRPO original) or not (Dr. GRPO)
    loss_norm: str = "constant"        # constant: sum / (prompts * G * max_new_tokens); token: sum / #tokens
    max_grad_norm: float = 1.0         # 0 = no clipping
    micro_batch: int = 0               # sequences per loss fwd/bwd; 0 = one whole group of G; -1 = from free memory


@dataclass
class ArmConfig:
    name: str = "vanilla"              # vanilla | projected | route
    vhack_path: Optional[str] = None   # safetensors from `pgrpo extract`; required by projected/route
    overshoot: float = 1.0             # remove overshoot * the hack-ward component (1 = exactly)
    one_sided: bool = True             # remove only the hack-ward (positive) part; False = both signs
    project_update: bool = True        # also project the AdamW update itself (see docs/training.md)
    project_momentum: bool = False     # also project AdamW's first moment after each step
    vhack_refresh_every: int = 0       # 0 = frozen v_hack; K = re-extract every K steps
    refresh_pairs: Optional[str] = None  # pairs file for refresh (None = the extractor's default)
    random_frac: float = 0.5           # arm random: random subspace dim per module = ceil(random_frac * r)


@dataclass
class TeacherConfig:
    pool: Optional[str] = None         # "builtin" (canonical solutions + shipped pairs) or a jsonl of {"id", "completion"}
    mix: float = 0.0                   # fraction of each group replaced by teacher completions


@dataclass
class LoggingConfig:
    tensorboard: bool = False          # also write per-step scalars to RUN/tensorboard/ (needs the tensorboard package)
    rollouts: bool = True              # save every completion to RUN/rollouts/step_NNNNNN.jsonl.gz


@dataclass
class ProbeConfig:
    path: Optional[str] = None         # held-out probe rows (the substrate's probe.json) for the teacher-forced hack probe
    every: int = 0                     # every K steps (and step 1): the probe and the per-rollout v_hack cosines; 0 = off


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    arm: ArmConfig = field(default_factory=ArmConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    steps: int = 6
    seed: int = 0
    checkpoint_every: int = 25         # 0 = only at the end
    metrics_port: int = 0              # Prometheus /metrics port; 0 = off
    metrics_linger_s: float = 0.0      # keep serving /metrics this long after the run ends
    grader_socket: Optional[str] = None  # None = start a local grader child process
    grader_workers: int = 2
    grader_time_limit_s: float = 5.0
    device: str = "auto"               # auto = cuda if available else cpu
    dtype: str = "auto"                # auto = bfloat16 on cuda, float32 on cpu
    cpu_threads: int = 0               # torch intra-op threads; 0 = torch's default (all cores)
    run_name: Optional[str] = None     # Prometheus `run` label; default = the run dir's name
    dist_timeout_s: float = 1800.0     # torchrun runs: a collective that waits longer stops every rank


# ----------------------------------------------------------------------------- (de)serialisation

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key):
    """Check `value` (already YAML-decoded) against type `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise UserError(f"config key {key} must be a {_type_name(tp)}, got {value!r}.")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key {key} must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key {key} must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string; people write it anyway
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key {key} must be a finite number, got {value!r}.")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key {key} must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"config key {key} must be a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this file, not the user's


def _from_dict(cls, d, prefix=""):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '(top level)'} must be a mapping, got {d!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise UserError(f"unknown config key {prefix}{k} (known keys here: {', '.join(sorted(names))}).")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _from_dict(tp, d[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(d[f.name], tp, key)
    return cls(**kwargs)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, check_files: bool = True) -> Config:
    cfg = _from_dict(Config, d)
    validate(cfg, check_files=check_files)
    return cfg


def _set_dotted(d: dict, dotted: str, raw: str):
    """Apply one `a.b.c=value` override to the nested dict; the value is parsed as a YAML scalar/flow."""
    try:
        value = yaml.safe_load(io.StringIO(raw)) if raw.strip() else ""
    except yaml.YAMLError:
        raise UserError(f"--set {dotted}={raw}: the value is not valid YAML.") from None
    parts = dotted.split(".")
    cur, cls = d, Config
    for i, p in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        key = ".".join(parts[: i + 1])
        if p not in names:
            raise UserError(f"unknown config key {key} in --set (known keys here: {', '.join(sorted(names))}).")
        tp = typing.get_type_hints(cls)[p]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise UserError(f"--set {key}=... must name a single key inside the section, e.g. {key}.{dataclasses.fields(tp)[0].name}=...")
            cur[p] = value
        else:
            if not dataclasses.is_dataclass(tp):
                raise UserError(f"config key {key} is not a section, so {dotted} does not exist.")
            if not isinstance(cur.get(p), dict):
                cur[p] = {}
            cur, cls = cur[p], tp


def load_yaml_mapping(path: str, what: str) -> dict:
    """A YAML file that must hold a mapping (a preset, a sweep); every failure is one sentence naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML ({str(e).splitlines()[0]}).") from None
    if not isinstance(d, dict):
        raise UserError(f"{what} {path} must hold a mapping of keys, not {type(d).__name__}.")
    return d


def load(path: Optional[str] = None, overrides: typing.Sequence[str] = (), check_files: bool = True) -> Config:
    """Preset YAML (or the defaults) + `key=value` overrides -> a validated Config.

    check_files=False skips the existence checks of input files (`pgrpo extract` loads the smoke-projected
    preset to learn the model/adapter before the v_hack it names exists)."""
    d: dict = load_yaml_mapping(path, "config file") if path is not None else {}
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"--set expects key=value, got {ov!r}.")
        k, v = ov.split("=", 1)
        _set_dotted(d, k.strip(), v)
    return from_dict(d, check_files=check_files)


def validate(cfg: Config, check_files: bool = True) -> None:
    """Impossible values, named by their dotted key."""
    def bad(key, why):
        raise UserError(f"config key {key} {why}.")

    def choice(key, value, options):
        if value not in options:
            bad(key, f"must be one of {', '.join(options)}, got {value!r}")

    if not cfg.model.name:
        bad("model.name", "must name a model (\"tiny\", an HF id or a local path)")
    if not cfg.adapter.targets:
        bad("adapter.targets", "must list at least one module name")
    choice("adapter.mode", cfg.adapter.mode, ADAPTER_MODES)
    choice("adapter.merge_rounding", cfg.adapter.merge_rounding, ("nearest", "stochastic"))
    if cfg.adapter.layers is not None:
        if not cfg.adapter.layers:
            bad("adapter.layers", "must be null (all layers) or a non-empty list of layer indices")
        if any(i < 0 for i in cfg.adapter.layers):
            bad("adapter.layers", "must hold layer indices >= 0")
    choice("data.loophole", cfg.data.loophole, LOOPHOLE_MODES)
    if cfg.data.problems != "builtin" and not cfg.data.problems:
        bad("data.problems", "must be \"builtin\" or a path to a .jsonl file")
    if cfg.data.prompts_per_step < 1:
        bad("data.prompts_per_step", "must be at least 1")
    if cfg.data.max_problems < 0:
        bad("data.max_problems", "must be >= 0 (0 = all)")
    if cfg.data.eval_problems < 0:
        bad("data.eval_problems", "must be >= 0 (0 = no held-out evaluation)")
    if cfg.data.eval_every < 0:
        bad("data.eval_every", "must be >= 0 (0 = never)")
    if cfg.data.eval_every and not cfg.data.eval_problems:
        bad("data.eval_every", "needs data.eval_problems > 0 (the held-out problems to evaluate on)")
    if cfg.data.eval_samples < 1:
        bad("data.eval_samples", "must be at least 1")
    if cfg.rollout.group_size < 2:
        bad("rollout.group_size", f"must be at least 2 (group-relative advantages need two samples), got {cfg.rollout.group_size}")
    if cfg.rollout.max_new_tokens < 1:
        bad("rollout.max_new_tokens", "must be at least 1")
    if cfg.rollout.temperature < 0:
        bad("rollout.temperature", f"must be >= 0 (0 = greedy), got {cfg.rollout.temperature}")
    if not 0 < cfg.rollout.top_p <= 1:
        bad("rollout.top_p", f"must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg.rollout.groups_per_generate < 0:
        bad("rollout.groups_per_generate", "must be >= 0 (0 = as many as memory allows)")
    g = cfg.grpo
    if g.lr <= 0:
        bad("grpo.lr", f"must be > 0, got {g.lr}")
    if len(g.betas) != 2 or not all(0 <= b < 1 for b in g.betas):
        bad("grpo.betas", f"must be two numbers in [0, 1), got {g.betas}")
    if g.eps <= 0:
        bad("grpo.eps", "must be > 0")
    if g.weight_decay < 0:
        bad("grpo.weight_decay", "must be >= 0")
    if g.warmup_steps < 0:
        bad("grpo.warmup_steps", "must be >= 0")
    choice("grpo.schedule", g.schedule, SCHEDULES)
    if not 0 <= g.min_lr_ratio <= 1:
        bad("grpo.min_lr_ratio", "must be in [0, 1]")
    if not 0 < g.clip_eps < 1:
        bad("grpo.clip_eps", f"must be in (0, 1), got {g.clip_eps}")
    if g.kl_coef < 0:
        bad("grpo.kl_coef", "must be >= 0")
    choice("grpo.loss_norm", g.loss_norm, LOSS_NORMS)
    if g.micro_batch < -1:
        bad("grpo.micro_batch", "must be >= -1 (0 = the whole group, -1 = chosen from free memory)")
    if g.max_grad_norm < 0:
        bad("grpo.max_grad_norm", "must be >= 0 (0 = no clipping)")
    a = cfg.arm
    choice("arm.name", a.name, ARMS)
    if not 0 < a.random_frac <= 1:
        bad("arm.random_frac", f"must be in (0, 1], got {a.random_frac}")
    if a.name in ("projected", "route", "random") and not a.vhack_path:
        bad("arm.vhack_path", f"must point at a v_hack file (from `pgrpo extract`) for arm {a.name}")
    if check_files and a.vhack_path and not os.path.isfile(a.vhack_path):
        bad("arm.vhack_path", f"points at {a.vhack_path}, which does not exist (run `make extract` first)")
    if a.overshoot <= 0:
        bad("arm.overshoot", f"must be > 0, got {a.overshoot}")
    if a.vhack_refresh_every < 0:
        bad("arm.vhack_refresh_every", "must be >= 0 (0 = frozen)")
    if a.vhack_refresh_every and not a.vhack_path:
        bad("arm.vhack_refresh_every", "needs arm.vhack_path (a first v_hack to refresh)")
    t = cfg.teacher
    if not 0 <= t.mix <= 1:
        bad("teacher.mix", f"must be in [0, 1], got {t.mix}")
    if t.mix > 0 and not t.pool:
        bad("teacher.pool", "must point at a teacher pool file when teacher.mix > 0")
    if check_files and t.pool and t.pool != "builtin" and not os.path.isfile(t.pool):
        bad("teacher.pool", f"points at {t.pool}, which does not exist")
    if cfg.probe.every < 0:
        bad("probe.every", "must be >= 0 (0 = off)")
    if cfg.probe.path and not cfg.probe.every:
        bad("probe.every", "must be > 0 when probe.path is set (how often to run the probe)")
    if check_files and cfg.probe.path and not os.path.isfile(cfg.probe.path):
        bad("probe.path", f"points at {cfg.probe.path}, which does not exist (build the substrate first)")
    if cfg.steps < 1:
        bad("steps", "must be at least 1")
    if cfg.seed < 0:
        bad("seed", f"must be >= 0 (numpy's seeded generators refuse negative seeds), got {cfg.seed}")
    if cfg.checkpoint_every < 0:
        bad("checkpoint_every", "must be >= 0 (0 = only at the end)")
    if not 0 <= cfg.metrics_port <= 65535:
        bad("metrics_port", "must be a TCP port in [0, 65535] (0 = off)")
    if cfg.metrics_linger_s < 0:
        bad("metrics_linger_s", "must be >= 0")
    if not 1 <= cfg.grader_workers <= 256:
        bad("grader_workers", f"must be in [1, 256] (the grader's own limit), got {cfg.grader_workers}")
    if cfg.grader_time_limit_s <= 0:
        bad("grader_time_limit_s", "must be > 0")
    if not (cfg.device in ("auto", "cpu", "cuda") or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit())):
        bad("device", f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    choice("dtype", cfg.dtype, DTYPES)
    if cfg.cpu_threads < 0:
        bad("cpu_threads", "must be >= 0 (0 = torch's default)")
    if cfg.dist_timeout_s <= 0:
        bad("dist_timeout_s", "must be > 0 seconds")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str) -> None:
    """Write the resolved config (temp file + rename, so a crash never leaves half a file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dump_yaml(cfg))
    os.replace(tmp, path)
