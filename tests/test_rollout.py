"""Rollout batching, early stop, compile option and the generation backend seam, on the real tiny Qwen3."""
import copy
import dataclasses
import time

import pytest
import torch
from torch import nn

from pgrpo import rollout
from pgrpo.adapter import SVDAdapter
from pgrpo.config import RolloutConfig
from pgrpo.model import ByteTokenizer, build_tiny_model


@pytest.fixture(scope="module")
def tm():
    torch.set_num_threads(1)
    tok = ByteTokenizer()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (9, 14, 5)]
    return build_tiny_model(seed=0), tok, prompts


def _old_path(model, tok, prompts, cfg):
    """The trainer's generation before memory-driven batching: fixed groups_per_generate chunks."""
    kw = rollout._gen_kwargs(tok, cfg)
    out = []
    for s in range(0, len(prompts), cfg.groups_per_generate):
        chunk = prompts[s:s + cfg.groups_per_generate]
        seqs = [p for p in chunk for _ in range(cfg.group_size)]
        ids, attn = rollout._left_pad(seqs, tok.pad_token_id, "cpu")
        new = model.generate(input_ids=ids, attention_mask=attn, **kw)[:, ids.shape[1]:].tolist()
        out += [rollout._cut(r, set(tok.eos_token_ids), tok.pad_token_id) for r in new]
    return out


@pytest.mark.parametrize("cap", [2, 0])
def test_memory_batched_rollout_is_identical_to_the_fixed_batch_path(tm, cap):
    model, tok, prompts = tm
    cfg = RolloutConfig(group_size=3, max_new_tokens=12, temperature=1.0, top_p=0.9, groups_per_generate=cap)
    torch.manual_seed(11)
    groups = rollout.generate_groups(model, tok, prompts, [0, 1, 2], cfg, "cpu")
    torch.manual_seed(11)
    old = _old_path(model, tok, prompts, dataclasses.replace(cfg, groups_per_generate=cap or len(prompts)))
    assert [c for g in groups for c in g.completions] == old
    assert len({tuple(c) for c in old}) > 1   # sampled, not degenerate


def test_groups_per_call_from_free_memory(tm):
    model, tok, prompts = tm
    cfg = RolloutConfig(group_size=4, max_new_tokens=100, groups_per_generate=0)
    ps = prompts * 5                                          # 15 groups
    assert rollout.groups_per_call(model, ps, cfg, "cpu", free=10**12) == 15
    per_group = 4 * ((14 + 100) * 2 * 2 * 2 * 16 * 4 + 4 * 260 * 4)   # KV (fp32) + sampling temporaries
    # room for 6 groups -> 3 calls of 5, not 6 + 6 + 3
    assert rollout.groups_per_call(model, ps, cfg, "cpu", free=int(6.5 * per_group / 0.9)) == 5
    assert rollout.groups_per_call(model, ps, cfg, "cpu", free=1) == 1
    assert rollout.groups_per_call(model, ps, dataclasses.replace(cfg, groups_per_generate=4), "cpu", free=10**12) == 4


def test_a_call_stops_when_every_sequence_has_ended(tm):
    _, tok, prompts = tm
    model = build_tiny_model(seed=0)
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 10.0                    # EOS always wins
    model.lm_head = head
    forwards = []
    model.model.register_forward_hook(lambda *a: forwards.append(1))
    cfg = RolloutConfig(group_size=2, max_new_tokens=50, temperature=0.0)
    groups = rollout.generate_groups(model, tok, prompts, [0, 1, 2], cfg, "cpu")
    assert all(c == [tok.eos_token_id] for g in groups for c in g.completions)
    assert len(forwards) == 1                                  # one call (ample memory), one forward, then stop


def test_replica_backend_sees_the_policy_only_through_sync_weights(tm):
    _, tok, prompts = tm
    model = build_tiny_model(seed=0)
    replica = copy.deepcopy(model)
    ad = SVDAdapter(model, mode="merged")
    with torch.no_grad():
        ad.delta.copy_(torch.randn(ad.R, generator=torch.Generator().manual_seed(2)) * 0.5)
    ad.merge()
    cfg = RolloutConfig(group_size=2, max_new_tokens=10, temperature=0.0)
    ref = rollout.generate_groups(model, tok, prompts, [0, 1, 2], cfg, "cpu")
    backend = rollout.ReplicaGenerate(replica, tok, "cpu")
    stale = rollout.generate_groups(model, tok, prompts, [0, 1, 2], cfg, "cpu", backend=backend)
    assert [g.completions for g in stale] != [g.completions for g in ref]
    backend.sync_weights(ad)
    synced = rollout.generate_groups(model, tok, prompts, [0, 1, 2], cfg, "cpu", backend=backend)
    assert [g.completions for g in synced] == [g.completions for g in ref]
    assert [g.texts for g in synced] == [g.texts for g in ref]


def test_compile_option_static_cache_gives_the_same_greedy_tokens(tm, monkeypatch):
    """rollout.compile: static cache + a dynamo-compiled decode step. The eager backend keeps this test in
    seconds; inductor (the default) is timed by `pgrpo bench step` and the GPU check."""
    monkeypatch.setattr(rollout, "COMPILE_BACKEND", "eager")
    model, tok, prompts = tm
    cfg = RolloutConfig(group_size=2, max_new_tokens=8, temperature=0.0)
    ref = rollout.generate_groups(model, tok, prompts, [0, 1, 2], cfg, "cpu")
    t0 = time.perf_counter()
    got = rollout.generate_groups(model, tok, prompts, [0, 1, 2], dataclasses.replace(cfg, compile=True), "cpu")
    print(f"compiled rollout: {time.perf_counter() - t0:.1f}s")
    assert [g.completions for g in got] == [g.completions for g in ref]


def test_replica_sync_from_a_factored_adapter_gives_its_policy(tm):
    _, tok, prompts = tm
    model = build_tiny_model(seed=0)
    replica = copy.deepcopy(model)
    ad = SVDAdapter(model, mode="factored")
    with torch.no_grad():
        ad.delta.copy_(torch.randn(ad.R, generator=torch.Generator().manual_seed(2)) * 0.5)
    cfg = RolloutConfig(group_size=2, max_new_tokens=10, temperature=0.0)
    ref = rollout.generate_groups(model, tok, prompts, [0, 1, 2], cfg, "cpu")
    backend = rollout.ReplicaGenerate(replica, tok, "cpu")
    backend.sync_weights(ad)
    got = rollout.generate_groups(model, tok, prompts, [0, 1, 2], cfg, "cpu", backend=backend)
    assert [g.completions for g in got] == [g.completions for g in ref]
