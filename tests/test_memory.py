"""pgrpo.memory's arithmetic against a real (scaled) Qwen3-4B-shape model, and the full presets on one 80 GB GPU."""
import pytest
import torch

from pgrpo import config as C
from pgrpo import memory
from pgrpo.adapter import SVDAdapter
from pgrpo.model import build_qwen3_4b_shape, qwen3_4b_shape_config


def test_qwen3_4b_counts():
    total, adapted, uvh, R = memory.param_counts(memory.QWEN3_4B)
    assert total == 4_022_468_096 and R == 534_528          # Qwen3-4B: 4.02B parameters; the presets' knob count
    assert memory.kv_bytes_per_token(memory.QWEN3_4B) == 147_456   # 2 x 36 layers x 8 kv heads x 128 x bf16


def test_shapes_params_kv_and_activations_match_a_real_model():
    torch.set_num_threads(1)
    c = qwen3_4b_shape_config(16)
    m, _ = build_qwen3_4b_shape(16, dtype=torch.bfloat16)
    assert sum(p.numel() for p in m.parameters()) == memory.param_counts(c)[0]
    ad = SVDAdapter(m, mode="merged")
    assert ad.R == memory.param_counts(c)[3]
    ids = torch.randint(0, 256, (2, 48))
    out = m(input_ids=ids, use_cache=True)
    kv = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
    assert kv == ids.numel() * memory.kv_bytes_per_token(c, 2)
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.model(input_ids=ids).last_hidden_state
    weights = {p.untyped_storage().data_ptr() for p in m.parameters()} | {g.W.untyped_storage().data_ptr() for g in ad.groups}
    per_token = sum(b for k, b in saved.items() if k not in weights) / ids.numel()
    est = memory.activation_bytes_per_token(c, 2)
    assert per_token <= est <= 1.3 * per_token, (per_token, est)   # the plan errs on the safe side, not by much


@pytest.mark.parametrize("prompt_tokens", [512, 1024])
@pytest.mark.parametrize("preset", ["jobs/full-projected.yaml", "jobs/full-vanilla.yaml"])
def test_full_presets_fit_one_80gb_gpu(preset, prompt_tokens):
    cfg = C.load(preset, check_files=False)
    p = memory.plan_for_config(cfg, prompt_tokens=prompt_tokens, gpu_bytes=80 * 10**9)
    assert memory.fits(p), memory.format_table(p, preset)
    assert p["generate_calls"] <= 3                           # memory-sized batching: no more calls than before
    big = memory.plan_for_config(cfg, prompt_tokens=prompt_tokens, gpu_bytes=141 * 10**9)   # an H200
    assert big["generate_calls"] <= 2 and memory.fits(big)
    # a fixed micro_batch of 3 would not fit with long prompts: why the presets pick it from memory
    fixed = memory.plan_for_config(C.load(preset, ["grpo.micro_batch=3"], check_files=False), prompt_tokens=1024)
    assert not memory.fits(fixed)


def test_groups_per_call_caps_and_balances():
    cfg = C.load(None, ["data.prompts_per_step=43", "rollout.group_size=6", "rollout.max_new_tokens=1536",
                        "rollout.groups_per_generate=0"])
    per_group = 6 * ((512 + 1536) * 147_456 + 4 * 151_936 * 4)
    assert memory.generate_groups_for(memory.QWEN3_4B, cfg, 10**13, 512) == 43
    assert memory.generate_groups_for(memory.QWEN3_4B, cfg, int(21.5 * per_group / 0.9), 512) == 15   # 3 x 15, not 21+21+1
