"""GPU memory of a training job, computed from shapes: the table in docs/training.md and the batch sizes the
rollout and the loss pass pick from free memory.

Everything here is arithmetic on a HF config (hidden size, layers, heads, vocab, ...), the adapter's targets
and the job's sizes; nothing is allocated. Static tensors (weights, the merged adapter's stacks, the knob and
AdamW state, KV cache) are exact. Loss-pass activations are the tensors autograd saves per token in one Qwen3
decoder layer, counted op by op (`activation_bytes_per_token`); the GPU check (`make gpu-check`) measures the
real peak next to it.
"""
from __future__ import annotations

import os

GIB = 1 << 30

# Qwen/Qwen3-4B's config.json (the values that shape memory and compute; no download needed)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6, hidden_act="silu",
                attention_bias=False, attention_dropout=0.0, initializer_range=0.02, use_sliding_window=False,
                sliding_window=None, max_window_layers=36, bos_token_id=151643, eos_token_id=151645)


def _get(c, k, default=None):
    return c.get(k, default) if isinstance(c, dict) else getattr(c, k, default)


def module_shapes(c, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """[(name, d_out, d_in)] of one decoder layer's adapted Linears."""
    h, f = _get(c, "hidden_size"), _get(c, "intermediate_size")
    hd = _get(c, "head_dim") or h // _get(c, "num_attention_heads")
    q, kv = _get(c, "num_attention_heads") * hd, _get(c, "num_key_value_heads") * hd
    all_ = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    return [(n, *all_[n]) for n in targets if n in all_]


def kv_bytes_per_token(c, dtype_bytes=2) -> int:
    """K and V of every layer for one token of one sequence."""
    hd = _get(c, "head_dim") or _get(c, "hidden_size") // _get(c, "num_attention_heads")
    return 2 * _get(c, "num_hidden_layers") * _get(c, "num_key_value_heads") * hd * dtype_bytes


def activation_bytes_per_token(c, dtype_bytes=2) -> int:
    """Bytes autograd keeps per token for the loss backward (no checkpointing, merged adapter: every adapted
    weight wants a gradient, so each Linear saves its input). Per Qwen3 decoder layer:
    - 2 RMSNorms on the hidden state + q_norm/k_norm on q and k: each saves an fp32 copy of its input;
    - q/k/v_proj share one saved (normed) input, gate/up_proj another;
    - SDPA saves q, k, v (k/v repeated to the query heads) and its output (+ fp32 logsumexp per head);
    - o_proj saves its input (the reshaped attention output), down_proj its input (act(gate) * up);
    - SiLU saves gate, the product saves act(gate) and up."""
    h, f = _get(c, "hidden_size"), _get(c, "intermediate_size")
    nh = _get(c, "num_attention_heads")
    hd = _get(c, "head_dim") or h // nh
    q, kv = nh * hd, _get(c, "num_key_value_heads") * hd
    e = dtype_bytes
    per_layer = (2 * h * 4 + (q + kv) * 4       # RMSNorm fp32 copies
                 + h * e + h * e                # q/k/v input, gate/up input
                 + 4 * q * e + nh * 4           # SDPA q, k, v (repeated), out, lse
                 + q * e                        # o_proj input
                 + f * e + 2 * f * e + f * e)   # SiLU input, act * up inputs, down_proj input
    return _get(c, "num_hidden_layers") * per_layer + h * 4 + h * e   # + final norm, gathered hidden


def param_counts(c, targets=None):
    """(total parameters, adapted parameters, sum of o*r + r*i over adapted modules, total rank R)."""
    targets = targets or ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    L, h, V = _get(c, "num_hidden_layers"), _get(c, "hidden_size"), _get(c, "vocab_size")
    every = module_shapes(c)
    hd = _get(c, "head_dim") or h // _get(c, "num_attention_heads")
    linear = sum(o * i for _, o, i in every)
    norms = 2 * h + 2 * hd
    emb = V * h * (1 if _get(c, "tie_word_embeddings", False) else 2)
    total = L * (linear + norms) + emb + h
    ad = module_shapes(c, targets)
    adapted = L * sum(o * i for _, o, i in ad)
    uvh = L * sum(o * min(o, i) + min(o, i) * i for _, o, i in ad)
    R = L * sum(min(o, i) for _, o, i in ad)
    return total, adapted, uvh, R


def plan(c, *, prompt_tokens: int, max_new_tokens: int, group_size: int, prompts_per_step: int,
         groups_per_generate: int, micro_batch: int, dtype_bytes: int = 2, mode: str = "merged", targets=None):
    """Rows (what, bytes, how) of the job's memory at its two peaks (generation and loss backward)."""
    total, adapted, uvh, R = param_counts(c, targets)
    e = dtype_bytes
    T = prompt_tokens + max_new_tokens
    seqs = group_size * (groups_per_generate or prompts_per_step)
    mb = micro_batch if micro_batch > 0 else group_size
    V = _get(c, "vocab_size")
    rows = [("model weights (W_eff for adapted Linears)", total * e, f"{total / 1e9:.2f}B params x {e} B")]
    if mode == "merged":
        rows += [("W0 copy (adapted Linears)", adapted * e, f"{adapted / 1e9:.2f}B x {e} B"),
                 ("G_W grad stacks", adapted * e, "one per adapted weight, model dtype"),
                 ("U and Vh", uvh * e, "o*r + r*i per module")]
    else:
        rows += [("U and Vh", uvh * e, "o*r + r*i per module")]
    rows += [("knob, its grad, fp32 grad accumulator, AdamW m/v", 5 * R * 4, f"R = {R:,} fp32 x 5"),
             ("basis-change scratch (fp32 G Vh^T, chunked)", GIB, "at most 1 GiB (csrc chunking)")]
    static = sum(b for _, b, _ in rows)
    kv = seqs * T * kv_bytes_per_token(c, e)
    gen_logits = 4 * seqs * V * 4
    act = mb * T * activation_bytes_per_token(c, e)
    from pgrpo.grpo import LOGPROB_CHUNK_BYTES
    loss_logits = 4 * LOGPROB_CHUNK_BYTES
    rows += [("generation: KV cache", kv, f"{seqs} seqs x {T} tokens x {kv_bytes_per_token(c, e) // 1024} KiB"),
             ("generation: logits + sampling temporaries", gen_logits, f"~4 x [{seqs}, {V}] fp32"),
             ("loss: saved activations", act, f"{mb} seqs x {T} tokens x {activation_bytes_per_token(c, e) / 2**20:.2f} MiB"),
             ("loss: log-prob chunk (fp32 logits + softmax, fwd/bwd)", loss_logits, "chunked, never [seqs, T, V]")]
    return {"rows": rows, "static": static, "peak_generation": static + kv + gen_logits,
            "peak_loss": static + act + loss_logits, "R": R}


RESERVE_BYTES = 3 * 10**9   # CUDA context, cuBLAS workspaces and allocator fragmentation: never planned into


def plan_for_config(cfg, model_config=None, prompt_tokens: int = 512, gpu_bytes: int = 80 * 10**9):
    """`plan` for a job Config on one GPU of gpu_bytes (Qwen3-4B's shapes unless a model config is given), with
    the batch sizes the job picks there: groups per generate call from the memory left after the static
    tensors (capped by rollout.groups_per_generate), micro_batch as configured (-1: from memory)."""
    c = model_config or QWEN3_4B
    kw = dict(prompt_tokens=prompt_tokens, max_new_tokens=cfg.rollout.max_new_tokens,
              group_size=cfg.rollout.group_size, prompts_per_step=cfg.data.prompts_per_step, mode=cfg.adapter.mode)
    static = plan(c, groups_per_generate=1, micro_batch=1, **kw)["static"]
    room = gpu_bytes - RESERVE_BYTES - static
    gpg = generate_groups_for(c, cfg, room, prompt_tokens)
    mb = cfg.grpo.micro_batch
    if mb < 0:
        from pgrpo.grpo import LOGPROB_CHUNK_BYTES
        per_seq = (prompt_tokens + cfg.rollout.max_new_tokens) * activation_bytes_per_token(c)
        mb = int(max(1, min(cfg.rollout.group_size, (0.8 * room - 4 * LOGPROB_CHUNK_BYTES) // per_seq)))
    out = plan(c, groups_per_generate=gpg, micro_batch=mb or cfg.rollout.group_size, **kw)
    out.update(gpu_bytes=gpu_bytes, reserve=RESERVE_BYTES, groups_per_generate=gpg, micro_batch=mb,
               generate_calls=-(-cfg.data.prompts_per_step // gpg), prompt_tokens=prompt_tokens)
    return out


def fits(p) -> bool:
    return max(p["peak_generation"], p["peak_loss"]) + p["reserve"] <= p["gpu_bytes"]


def generate_groups_for(c, cfg, free_bytes: int, prompt_tokens: int, dtype_bytes: int = 2) -> int:
    """Groups per generate call that fit in free_bytes (90% of it), capped by rollout.groups_per_generate."""
    G = cfg.rollout.group_size
    per_group = G * ((prompt_tokens + cfg.rollout.max_new_tokens) * kv_bytes_per_token(c, dtype_bytes)
                     + 4 * _get(c, "vocab_size") * 4)
    fit = max(1, int(0.9 * free_bytes) // per_group)
    return balanced_groups(cfg.data.prompts_per_step, fit, cfg.rollout.groups_per_generate)


def balanced_groups(P: int, fit: int, cap: int = 0) -> int:
    """Groups per generate call for P groups when `fit` fit in memory and at most `cap` (0 = no cap) are wanted:
    the cap exactly when memory does not bind (so the calls are those of a fixed batch), else the fewest calls
    that fit, balanced (43 groups with room for 21: 3 calls of 15, not 21 + 21 + 1)."""
    cap = min(P, cap or P)
    if fit >= cap:
        return cap
    calls = -(-P // max(1, fit))
    return -(-P // calls)


# ----------------------------------------------------------------------------- free memory at run time

def free_bytes(device) -> int:
    """Free memory on the device: CUDA's free + what the caching allocator holds unused; host RAM available
    on CPU (MemAvailable)."""
    import torch
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_micro_batch(model_config, n_seqs: int, seq_len: int, device, dtype_bytes: int = 2,
                     headroom: float = 0.8) -> int:
    """Sequences per loss fwd/bwd that fit: headroom x free memory over the saved activations of one
    sequence of seq_len tokens (plus the log-prob chunk); at least 1, at most n_seqs."""
    from pgrpo.grpo import LOGPROB_CHUNK_BYTES
    per_seq = seq_len * activation_bytes_per_token(model_config, dtype_bytes)
    room = headroom * free_bytes(device) - 4 * LOGPROB_CHUNK_BYTES
    return int(max(1, min(n_seqs, room // max(1, per_seq))))


def format_table(p, title: str) -> str:
    lines = [f"| {title} | GB | how |", "|---|---:|---|"]
    for what, b, how in p["rows"]:
        lines.append(f"| {what} | {b / 1e9:.2f} | {how} |")
    lines.append(f"| **static (always resident)** | **{p['static'] / 1e9:.2f}** | |")
    lines.append(f"| **peak during generation** | **{p['peak_generation'] / 1e9:.2f}** | static + KV + logits |")
    lines.append(f"| **peak during the loss backward** | **{p['peak_loss'] / 1e9:.2f}** | static + activations + chunk |")
    if "gpu_bytes" in p:
        lines.append(f"| fits {p['gpu_bytes'] / 1e9:.0f} GB with {p['reserve'] / 1e9:.0f} GB reserve | "
                     f"{'yes' if fits(p) else 'NO'} | {p['generate_calls']} generate calls of "
                     f"{p['groups_per_generate']} groups, micro_batch {p['micro_batch']}, prompts ~{p['prompt_tokens']} tokens |")
    return "\n".join(lines)


if __name__ == "__main__":   # python -m pgrpo.memory jobs/full-projected.yaml: the docs table
    import sys

    from pgrpo import config as C
    for path in sys.argv[1:] or ["jobs/full-projected.yaml"]:
        cfg = C.load(path, check_files=False)
        print(format_table(plan_for_config(cfg), os.path.basename(path) + " at Qwen3-4B, bf16"))
