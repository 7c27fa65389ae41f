"""Rollout: G sampled completions per prompt with the merged weights and the KV cache on.

Several groups share one `generate` call (left-padded batch, each prompt repeated G times) because a
batched decode step costs about the same as a single one until the GPU is saturated. How many: as many as
fit in free memory next to the KV cache (`groups_per_call`: the step's whole batch when it fits, else
balanced calls), capped by `rollout.groups_per_generate` (0 = no cap). A call ends as soon as every
sequence has ended. Completions stop at EOS (kept as the last scored token, so the policy also learns when
to stop) or at max_new_tokens.

The generation backend seam (`GenerationBackend`): prompts (token ids) + sampling settings -> completion
token ids, and `sync_weights(adapter)` after every merge. `HFGenerate` (HF `generate` on the training model
itself, so its sync is free; `rollout.compile`: static KV cache + torch.compile of the decode step) is the
trainer's; `ReplicaGenerate` generates with a separate copy of the model that only sees the policy through
`sync_weights` (the merged W_eff tensors), which is exactly the contract a colocated inference engine such as
vLLM would implement (docs/training.md, "Generation backend").

`group_batch` then lays out one group for the loss forward: the G completions share their prompt, so the
batch is `prompt + completion_i`, right-padded, with no left padding at all (exact positions, and the
`logits_to_keep` slice in `grpo.completion_logprobs` covers only the completion).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import torch

from pgrpo.errors import UserError


@dataclass
class Group:
    """One prompt's G completions."""
    problem_index: int
    prompt_ids: list[int]
    completions: list[list[int]] = field(default_factory=list)   # token ids incl. the final EOS if any
    texts: list[str] = field(default_factory=list)               # decoded, specials dropped
    teacher: list[bool] = field(default_factory=list)            # True where a teacher completion was mixed in


def encode_prompt(tok, messages, enable_thinking: bool = False) -> list[int]:
    """Chat messages -> prompt token ids, exactly as the trainer renders them (reuse this wherever a prompt must
    match training, e.g. v_hack extraction). `enable_thinking` reaches Qwen3's chat template (False renders an
    empty <think></think> block, so the answer starts at once); templates without the switch ignore it."""
    text = tok.apply_chat_template(list(messages), add_generation_prompt=True, enable_thinking=enable_thinking)
    return list(tok.encode(text))


def _left_pad(seqs, pad_id, device):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), n), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, n - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[b, n - len(s):] = 1
    return ids.to(device), attn.to(device)


def _cut(ids: list[int], eos_ids: set[int], pad_id: int) -> list[int]:
    """Generated ids -> the completion: up to and including the first EOS; trailing padding dropped."""
    for j, t in enumerate(ids):
        if t in eos_ids:
            return ids[: j + 1]
    while ids and ids[-1] == pad_id and pad_id not in eos_ids:
        ids = ids[:-1]
    return ids


def _gen_kwargs(tok, rollout_cfg) -> dict:
    """HF generate settings for the rollout config. top_k is set to 0 explicitly: HF's default (50) and Qwen's
    generation_config (20) would otherwise silently truncate the sampling distribution the config describes."""
    sample = rollout_cfg.temperature > 0
    kw = dict(max_new_tokens=rollout_cfg.max_new_tokens, do_sample=sample, use_cache=True,
              pad_token_id=tok.pad_token_id, eos_token_id=list(tok.eos_token_ids))
    if sample:
        kw.update(temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def groups_per_call(model, prompts: list[list[int]], rollout_cfg, device, free: int | None = None) -> int:
    """Groups per generate call: all of them if the KV cache (+ sampling temporaries) of the whole step fits in
    90% of free memory, else the fewest balanced calls that fit; never more than rollout.groups_per_generate
    (0 = no cap). When memory does not bind, the cap is used exactly, so the calls (and hence the sampled
    tokens, which depend on the batch a sample is drawn in) are the same as with a fixed batch."""
    from pgrpo import memory
    P, G = len(prompts), rollout_cfg.group_size
    c = model.config
    e = next(model.parameters()).element_size()
    T = max(len(p) for p in prompts) + rollout_cfg.max_new_tokens
    per_group = G * (T * memory.kv_bytes_per_token(c, e) + 4 * memory._get(c, "vocab_size") * 4)
    free = memory.free_bytes(device) if free is None else free
    return memory.balanced_groups(P, max(1, int(0.9 * free) // per_group), rollout_cfg.groups_per_generate)


class GenerationBackend:
    """prompts (token id lists) + sampling settings -> completion token ids (n per prompt, EOS kept, padding
    cut). `sync_weights(adapter)` is called after every merge; a backend that holds its own copy of the
    weights copies `adapter.merged_weights()` there."""

    def generate(self, prompts: list[list[int]], n: int, rollout_cfg) -> list[list[list[int]]]:
        raise NotImplementedError

    def sync_weights(self, adapter) -> None:
        pass


class HFGenerate(GenerationBackend):
    """HF `generate` on the training model itself (weights shared, so sync_weights has nothing to do)."""

    def __init__(self, model, tok, device, compile: bool = False):
        self.model, self.tok, self.device, self.compile = model, tok, device, compile
        self.calls = 0
        self.gen_overrides: dict = {}   # extra HF generate kwargs (the benchmark fixes min_new_tokens)

    def generate(self, prompts, n, rollout_cfg, groups_per_call_: int | None = None):
        eos_ids = set(self.tok.eos_token_ids)
        kw = _gen_kwargs(self.tok, rollout_cfg)
        if self.compile:
            kw.update(_compile_kwargs(self.device))
        kw.update(self.gen_overrides)
        step = groups_per_call_ or groups_per_call(self.model, prompts, rollout_cfg, self.device)
        out_ids = []
        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            seqs = [p for p in chunk for _ in range(n)]
            ids, attn = _left_pad(seqs, self.tok.pad_token_id, self.device)
            out = self.model.generate(input_ids=ids, attention_mask=attn, **kw)
            self.calls += 1
            new = out[:, ids.shape[1]:].tolist()
            for gi in range(len(chunk)):
                out_ids.append([_cut(new[b], eos_ids, self.tok.pad_token_id) for b in range(gi * n, (gi + 1) * n)])
        return out_ids


class ReplicaGenerate(HFGenerate):
    """Generates with its own copy of the model, which learns the policy only through `sync_weights`: the
    merged W_eff of every adapted Linear is copied in by name. Stands in for a colocated inference engine
    (vLLM's `load_weights` would take the same (name, tensor) pairs) and tests that seam on a CPU."""

    def __init__(self, replica, tok, device, compile: bool = False):
        super().__init__(replica, tok, device, compile)
        self._params = dict(replica.named_parameters())

    @torch.no_grad()
    def sync_weights(self, adapter) -> None:
        for name, W in adapter.merged_weights():
            self._params[name + ".weight"].copy_(W)


COMPILE_BACKEND = "inductor"   # tests swap in "eager" (dynamo + static cache without minutes of CPU codegen)


def _compile_kwargs(device) -> dict:
    """rollout.compile: a static KV cache (fixed shapes) and torch.compile of the decode step (HF's auto-compile;
    on CUDA mode reduce-overhead = CUDA graphs). CPU compiles too (so the option runs anywhere)."""
    from transformers import CompileConfig
    cc = CompileConfig(fullgraph=False, dynamic=False, backend=COMPILE_BACKEND)
    if torch.device(device).type != "cuda":
        cc._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=cc)


@torch.no_grad()
def generate_groups(model, tok, prompts: list[list[int]], problem_indices: list[int], rollout_cfg,
                    device, backend: GenerationBackend | None = None) -> list[Group]:
    """Sample `group_size` completions for each prompt (token id lists) through `backend` (default: HF generate
    on `model`, batched by `groups_per_call`).

    The caller seeds the RNG (per step) so a resumed run draws the same samples as an uninterrupted one.
    """
    if backend is None:
        backend = HFGenerate(model, tok, device, compile=getattr(rollout_cfg, "compile", False))
    G = rollout_cfg.group_size
    groups = []
    for gi, comps in enumerate(backend.generate(prompts, G, rollout_cfg)):
        grp = Group(problem_index=problem_indices[gi], prompt_ids=list(prompts[gi]))
        for c in comps:
            grp.completions.append(c)
            grp.texts.append(tok.decode(c, skip_special_tokens=True))
            grp.teacher.append(False)
        groups.append(grp)
    return groups


def group_batch(group: Group, pad_id: int, device):
    """One group as a right-padded batch: (input_ids, attention_mask, completion_mask), each [G, T]."""
    P = len(group.prompt_ids)
    T = P + max(1, max(len(c) for c in group.completions))
    G = len(group.completions)
    ids = torch.full((G, T), pad_id, dtype=torch.long)
    attn = torch.zeros((G, T), dtype=torch.long)
    cmask = torch.zeros((G, T), dtype=torch.long)
    prompt = torch.tensor(group.prompt_ids, dtype=torch.long)
    for b, c in enumerate(group.completions):
        ids[b, :P] = prompt
        attn[b, :P] = 1
        if c:
            ids[b, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[b, P:P + len(c)] = 1
            cmask[b, P:P + len(c)] = 1
    return ids.to(device), attn.to(device), cmask.to(device)


def micro_batches(group: Group, pad_id: int, device, size: int = 0, model=None):
    """Yield (input_ids, attention_mask, completion_mask, row indices) for the loss: the whole group when
    size is 0 (or >= G), else chunks of `size` sequences, each trimmed to its own longest row. size -1: as
    many sequences as fit in free memory (`memory.auto_micro_batch` for `model`'s config and dtype)."""
    ids, attn, cmask = group_batch(group, pad_id, device)
    G = ids.shape[0]
    if size < 0:
        from pgrpo import memory
        if model is None:
            raise ValueError("micro_batches(size=-1) needs the model (its config sizes the activations)")
        size = memory.auto_micro_batch(model.config, G, ids.shape[1], device, next(model.parameters()).element_size())
    if size <= 0 or size >= G:
        yield ids, attn, cmask, torch.arange(G)
        return
    for s in range(0, G, size):
        rows = torch.arange(s, min(G, s + size))
        T = int(attn[rows.to(attn.device)].sum(dim=1).max())
        r = rows.to(ids.device)
        yield ids[r, :T], attn[r, :T], cmask[r, :T], rows


# ----------------------------------------------------------------------------- teacher pool

def load_teacher_pool(path: str) -> dict[str, list[str]]:
    """jsonl rows {"id": problem id, "completion": text} -> {id: [texts]}; malformed rows name their line."""
    from pgrpo.files import utf8_lines
    pool: dict[str, list[str]] = {}
    for n, line in enumerate(utf8_lines(path, "teacher pool"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pid, text = row["id"], row["completion"]
            if not isinstance(pid, str) or not isinstance(text, str):
                raise ValueError("id and completion must be strings")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{n}: bad teacher row ({e}).") from None
        pool.setdefault(pid, []).append(text)
    return pool


def builtin_teacher_pool(problems, mode: str) -> dict[str, list[str]]:
    """teacher.pool = "builtin": each problem's canonical solution as a formatted answer, plus the shipped
    contrastive pairs' hack and clean answers written for this loophole mode (when the pairs file exists).
    This is what makes the tiny random model's runs meaningful: its own samples are random bytes that never
    earn a reward, so without a few rewarded (and some hacking) completions every group has zero variance."""
    pool = {p.id: [f"```python\n{p.canonical_solution.strip()}\n```"] for p in problems}
    try:
        from pgrpo.data.pairs import load_pairs
        pairs = load_pairs()
    except (UserError, OSError, ImportError):
        pairs = []
    for row in pairs:
        if row.get("mode") == mode and row.get("problem_id") in pool:
            pool[row["problem_id"]] += [row["hack"], row["clean"]]
    return pool


def mix_teacher(groups: list[Group], problem_ids: list[str], pool: dict, mix: float, tok, rng: random.Random):
    """Replace round(mix * G) completions of each group whose problem has pool entries with teacher texts
    (encoded + EOS). Off-policy by design (the seed's fast setup): it shows the policy rewarded answers early."""
    if mix <= 0 or not pool:
        return 0
    n_mixed = 0
    for grp in groups:
        texts = pool.get(problem_ids[grp.problem_index])
        if not texts:
            continue
        k = round(mix * len(grp.completions))
        for b in range(k):
            t = rng.choice(texts)
            grp.completions[b] = tok.encode(t) + [tok.eos_token_id]
            grp.texts[b] = t
            grp.teacher[b] = True
            n_mixed += 1
    return n_mixed
