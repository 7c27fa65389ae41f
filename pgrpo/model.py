"""Models and tokenizers: the embedded tiny Qwen3 + byte tokenizer, or any HF causal LM.

The embedded default needs no download: a randomly initialised ``Qwen3ForCausalLM`` (the same
architecture class as Qwen3-4B, tiny dims) and a byte-level tokenizer with Qwen's chat template,
both built in code. Every tokenizer handed to the trainer has the same small interface
(``Tok``): ``apply_chat_template -> str``, ``encode``, ``decode``, ``__call__`` (left-padded batch
for ``generate``), ``pad_token_id``, ``eos_token_id``, ``eos_token_ids``, ``vocab_size``.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

from pgrpo.errors import UserError

# ----------------------------------------------------------------------------- tiny model

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
"""Dims of the embedded model (vocab comes from ByteTokenizer). ~0.2M parameters: it samples
random bytes, which is all the pipeline tests need; the point is the same code path as Qwen3-4B."""


def build_tiny_model(seed: int = 0, **overrides):
    """A tiny randomly initialised Qwen3ForCausalLM in fp32, identical for identical seed/overrides.

    Uses its own RNG stream (fork_rng) so building it neither depends on nor disturbs the
    caller's global RNG state. SDPA attention: deterministic on CPU and the fastest there.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = ByteTokenizer()
    kw = dict(TINY_CONFIG, vocab_size=tok.vocab_size, bos_token_id=None,
              eos_token_id=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    cfg = Qwen3Config(**kw)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    model = model.float().eval()
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tok.pad_token_id, tok.eos_token_ids, None
    return model


def qwen3_4b_shape_config(scale: int = 1) -> dict:
    """Qwen3-4B's exact config (pgrpo.memory.QWEN3_4B: hidden 2560, 36 layers, 32 q / 8 kv heads of 128,
    intermediate 9728, vocab 151936, tied embeddings, rope theta 1e6); scale > 1 divides hidden,
    intermediate, layers, heads and vocab by `scale` (head_dim stays 128) for a CPU-sized model of the same
    proportions. The ByteTokenizer's ids (< 260) are a subset of the vocabulary, so it drives the model."""
    from pgrpo.memory import QWEN3_4B
    c = dict(QWEN3_4B)
    if scale > 1:
        c.update(hidden_size=c["hidden_size"] // scale, intermediate_size=c["intermediate_size"] // scale,
                 num_hidden_layers=max(2, c["num_hidden_layers"] // scale),
                 num_attention_heads=max(1, c["num_attention_heads"] // scale),
                 num_key_value_heads=max(1, c["num_key_value_heads"] // scale),
                 vocab_size=max(512, c["vocab_size"] // scale), max_window_layers=max(2, c["num_hidden_layers"] // scale))
    return c


def build_qwen3_4b_shape(scale: int = 1, seed: int = 0, dtype=torch.bfloat16, device="cpu",
                         svd_by_construction: bool = True):
    """A randomly initialised Qwen3ForCausalLM with Qwen3-4B's shapes (no download), built directly on
    `device` in `dtype` (a 4B model is never materialised in fp32 on the host). Its decoder Linears are
    built from known SVD factors (`_weights_from_factors`) unless svd_by_construction=False."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = ByteTokenizer()
    kw = qwen3_4b_shape_config(scale)
    kw.update(bos_token_id=None, eos_token_id=tok.eos_token_ids, pad_token_id=tok.pad_token_id)
    cfg = Qwen3Config(**kw)
    cfg._attn_implementation = "sdpa"
    dev = torch.device(device)
    prev = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        torch.set_default_dtype(resolve_dtype(dtype))
        try:
            with dev:
                model = Qwen3ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
    if svd_by_construction:
        _weights_from_factors(model, seed)
    model = model.eval()
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tok.pad_token_id, tok.eos_token_ids, None
    return model, tok


@torch.no_grad()
def _weights_from_factors(model, seed: int):
    """Replace every decoder Linear's random weight by U diag(S) Vh with random orthonormal U, Vh (QR of a
    Gaussian) and S spread over the range a Gaussian init of std 0.02 has (Marchenko-Pastur edges), and hang
    (U, Vh) on the Linear as `svd_factors`: the adapter then takes the SVD it would otherwise spend minutes
    computing for 252 large random matrices (a real checkpoint still goes through adapter.thin_svd)."""
    gen = torch.Generator(device=model.device).manual_seed(seed + 1)
    for name, lin in model.named_modules():
        if not isinstance(lin, torch.nn.Linear) or ".layers." not in name:
            continue
        o, i = lin.weight.shape
        r = min(o, i)
        U = torch.linalg.qr(torch.randn(o, r, generator=gen, device=model.device))[0]
        V = torch.linalg.qr(torch.randn(i, r, generator=gen, device=model.device))[0]
        S = 0.02 * torch.linspace(o ** 0.5 + i ** 0.5, abs(o ** 0.5 - i ** 0.5) + 0.1, r, device=model.device)
        lin.weight.copy_((U * S) @ V.T)
        lin.svd_factors = (U.to(lin.weight.dtype), V.T.contiguous().to(lin.weight.dtype))


# ----------------------------------------------------------------------------- tokenizers

def _left_pad(seqs: list[list[int]], pad_id: int, max_length: int | None = None):
    """Left-pad token lists into (input_ids, attention_mask) long tensors; truncates from the left."""
    from transformers import BatchEncoding

    if max_length is not None:
        seqs = [s[-max_length:] if len(s) > max_length else s for s in seqs]
    n = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, n - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, n - len(s):] = 1
    return BatchEncoding({"input_ids": ids, "attention_mask": mask})


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; four special tokens follow. Chat template is Qwen's format.

    Special-token strings inside text passed to ``encode`` become their ids (as HF tokenizers do),
    so ``encode(apply_chat_template(...))`` gives the prompt ids.
    """

    SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")

    def __init__(self):
        self.special_ids = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self.id_to_special = {i: s for s, i in self.special_ids.items()}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")
        self.vocab_size = 256 + len(self.SPECIALS)
        self.endoftext_id = self.special_ids["<|endoftext|>"]
        self.im_start_id = self.special_ids["<|im_start|>"]
        self.eos_token_id = self.special_ids["<|im_end|>"]
        self.pad_token_id = self.special_ids["<|pad|>"]
        self.eos_token_ids = [self.eos_token_id, self.endoftext_id]
        self.eos_token = "<|im_end|>"
        self.pad_token = "<|pad|>"

    def __len__(self):
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for part in self._split.split(text):
            sid = self.special_ids.get(part)
            if sid is not None:
                out.append(sid)
            elif part:
                out.extend(part.encode("utf-8"))
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        pieces, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if buf:
                pieces.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if not skip_special_tokens and i in self.id_to_special:
                pieces.append(self.id_to_special[i])
        if buf:
            pieces.append(buf.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def batch_decode(self, seqs, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **_):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text

    def __call__(self, texts, max_length: int | None = None, **_):
        """Left-padded batch (input_ids, attention_mask) as a BatchEncoding (has ``.to(device)``)."""
        if isinstance(texts, str):
            texts = [texts]
        return _left_pad([self.encode(t) for t in texts], self.pad_token_id, max_length)


class HFTokenizer:
    """Gives a transformers tokenizer the ByteTokenizer interface the trainer codes against."""

    def __init__(self, tok):
        self.tok = tok
        eos = tok.eos_token_id
        # Qwen chat models end a turn with <|im_end|>; generation should also stop at <|endoftext|>.
        ids = [eos] if eos is not None else []
        for s in ("<|im_end|>", "<|endoftext|>"):
            i = tok.convert_tokens_to_ids(s)
            if isinstance(i, int) and i != tok.unk_token_id and i not in ids:
                ids.append(i)
        if not ids:
            raise UserError("The tokenizer has no end-of-sequence token; generation could never stop.")
        self.eos_token_ids = ids
        self.eos_token_id = ids[0]
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id
        self.vocab_size = len(tok)

    def __len__(self):
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, seqs, skip_special_tokens: bool = True) -> list[str]:
        return self.tok.batch_decode(seqs, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False,
                            **kw):
        if getattr(self.tok, "chat_template", None) is None:
            raise UserError("The tokenizer has no chat template; use a chat/instruct model.")
        return self.tok.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                            tokenize=tokenize, **kw)

    def __call__(self, texts, max_length: int | None = None, **_):
        if isinstance(texts, str):
            texts = [texts]
        return _left_pad([self.encode(t) for t in texts], self.pad_token_id, max_length)


# ----------------------------------------------------------------------------- loading

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def resolve_device_dtype(cfg) -> tuple[str, str]:
    """auto device = cuda if available; auto dtype = bfloat16 on cuda, float32 on cpu."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("config key device asks for cuda, but no CUDA device is available.")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def load_model(name_or_path: str = "tiny", dtype="float32", device="cpu", seed: int = 0):
    """(model, tokenizer): "tiny" builds the embedded model, "qwen3-4b-shape[/SCALE]" a random model with
    Qwen3-4B's shapes; anything else is a HF name or local path.

    HF models load from a local directory or the HF cache (``make download-model`` warms it); set
    HF_HUB_OFFLINE=1 to forbid network access. The model is returned in eval mode on ``device``.
    """
    dt = resolve_dtype(dtype)
    if name_or_path == "qwen3-4b-shape" or name_or_path.startswith("qwen3-4b-shape/"):
        # Qwen3-4B's architecture and shapes, random weights, ByteTokenizer: the GPU check and `bench step`
        # measure the real job's costs without a download; "qwen3-4b-shape/8" is the same scaled down by 8.
        scale = int(name_or_path.split("/", 1)[1]) if "/" in name_or_path else 1
        model, tok = build_qwen3_4b_shape(scale, seed, dt, device)
        return model.to(device=device, dtype=dt).eval(), tok
    if name_or_path == "tiny":
        model, tok = build_tiny_model(seed=seed), ByteTokenizer()
    elif name_or_path.startswith("tiny:"):
        # A warm-started tiny model (`python -m pgrpo.substrate warmstart --out DIR`): the tiny architecture
        # with DIR/warm.json's overrides and DIR/model.safetensors' weights; `seed` is not used (the
        # weights are fixed). The tokenizer is still the ByteTokenizer.
        model, tok = load_warm_tiny(name_or_path[len("tiny:"):]), ByteTokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            tok = HFTokenizer(AutoTokenizer.from_pretrained(name_or_path))
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dt, attn_implementation="sdpa")
        except (OSError, ValueError) as e:
            raise UserError(f"Could not load model {name_or_path!r} (not a local path and not in the HF "
                            f"cache? try `make download-model`): {str(e).splitlines()[0]}") from e
        gc = model.generation_config
        gc.pad_token_id = tok.pad_token_id
        gc.eos_token_id = tok.eos_token_ids
    model = model.to(device=device, dtype=dt).eval()
    return model, tok


def load_warm_tiny(path: str):
    """The tiny Qwen3 saved by ``pgrpo.substrate warmstart`` in directory ``path`` (fp32, eval mode)."""
    import json
    import os

    from safetensors.torch import load_file

    meta_path, weights = os.path.join(path, "warm.json"), os.path.join(path, "model.safetensors")
    if not (os.path.isfile(meta_path) and os.path.isfile(weights)):
        raise UserError(f"model tiny:{path}: no warm start there (expected warm.json and model.safetensors; "
                        f"build it with `python -m pgrpo.substrate warmstart --out {path}`)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    model = build_tiny_model(seed=int(meta.get("seed", 0)), **meta.get("overrides", {}))
    model.load_state_dict(load_file(weights), strict=True)
    return model.eval()
