"""The embedded tiny Qwen3 and the tokenizers the trainer uses (byte-level and wrapped HF)."""
import pytest
import torch

from pgrpo.errors import UserError
from pgrpo.model import ByteTokenizer, HFTokenizer, build_tiny_model, load_model

MSGS = [{"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Solve: ünïcödé ✓ 🐍\nline two"}]


def test_tiny_model_deterministic_for_seed():
    a, b, c = build_tiny_model(seed=0), build_tiny_model(seed=0), build_tiny_model(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    # building does not consume or depend on the caller's global RNG
    torch.manual_seed(123)
    x = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(seed=0)
    assert torch.equal(torch.rand(3), x)
    assert type(a).__name__ == "Qwen3ForCausalLM" and a.dtype == torch.float32
    assert a.config.vocab_size == ByteTokenizer().vocab_size and not a.config.tie_word_embeddings
    assert build_tiny_model(num_hidden_layers=3).config.num_hidden_layers == 3


def test_generation_kv_cache_matches_no_cache():
    model, tok = load_model("tiny", seed=0)
    batch = tok([tok.apply_chat_template(MSGS), "short"])  # left-padded, ragged lengths
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        on = model.generate(**batch, use_cache=True, **kw)
        off = model.generate(**batch, use_cache=False, **kw)
    assert on.shape[1] > batch["input_ids"].shape[1]
    assert torch.equal(on, off)
    # sampling is reproducible under a fixed seed
    torch.manual_seed(0)
    s1 = model.generate(**batch, do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=16)
    torch.manual_seed(0)
    s2 = model.generate(**batch, do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=16)
    assert torch.equal(s1, s2)


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    for text in ["", "hello", "ünïcödé ✓ 🐍 漢字\n\t\x00", "a" * 1000]:
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    ids = tok.encode("x<|im_end|>y")
    assert ids == [ord("x"), tok.eos_token_id, ord("y")]
    assert tok.decode(ids) == "xy" and tok.decode(ids, skip_special_tokens=False) == "x<|im_end|>y"
    assert tok.decode([0xF0, 0x9F, ord("a")]) == "\ufffda"  # invalid utf-8 is replaced, never raises
    assert tok.decode(torch.tensor([104, 105, tok.pad_token_id])) == "hi"
    assert len({tok.pad_token_id, tok.eos_token_id, tok.endoftext_id, tok.im_start_id}) == 4
    assert tok.vocab_size == 260 and max(tok.eos_token_ids + [tok.pad_token_id]) < tok.vocab_size


def test_chat_template_shape():
    tok = ByteTokenizer()
    text = tok.apply_chat_template(MSGS, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou write Python.<|im_end|>\n"
                    "<|im_start|>user\nSolve: ünïcödé ✓ 🐍\nline two<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not tok.apply_chat_template(MSGS, add_generation_prompt=False).endswith("assistant\n")
    ids = tok.apply_chat_template(MSGS, tokenize=True)
    assert ids[0] == tok.im_start_id and ids.count(tok.eos_token_id) == 2


def test_batch_encode_left_pads():
    tok = ByteTokenizer()
    b = tok(["abc", "a", ""])
    assert b["input_ids"].tolist() == [[97, 98, 99], [tok.pad_token_id] * 2 + [97], [tok.pad_token_id] * 3]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert b.to("cpu")["input_ids"].dtype == torch.long
    assert tok(["abcdef"], max_length=2)["input_ids"].tolist() == [[101, 102]]


def test_load_model_dtype_and_errors(tmp_path):
    model, tok = load_model("tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert isinstance(tok, ByteTokenizer)
    with pytest.raises(UserError, match="dtype"):
        load_model("tiny", dtype="float8")
    with pytest.raises(UserError, match="Could not load"):
        load_model(str(tmp_path / "no-such-model"))


def _save_local_hf_model(path):
    """A local HF model dir (the tiny model + a byte-level HF tokenizer with a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>",
                                 additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    hf.save_pretrained(path)
    m = build_tiny_model(vocab_size=len(hf), pad_token_id=None, eos_token_id=hf.eos_token_id)
    m.save_pretrained(path)
    return m


def test_load_local_hf_model_with_wrapped_tokenizer(tmp_path):
    ref = _save_local_hf_model(tmp_path)
    model, tok = load_model(str(tmp_path), dtype="float32")
    assert isinstance(tok, HFTokenizer)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    text = tok.apply_chat_template(MSGS)
    assert text == ByteTokenizer().apply_chat_template(MSGS)
    ids = tok.encode(text)
    assert tok.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.eos_token_id == tok.tok.convert_tokens_to_ids("<|im_end|>")
    assert set(tok.eos_token_ids) == {tok.eos_token_id, tok.tok.convert_tokens_to_ids("<|endoftext|>")}
    assert tok.pad_token_id == tok.eos_token_id  # no pad token: falls back to eos
    b = tok([text, "hi"])
    assert b["attention_mask"][1].tolist()[-2:] == [1, 1] and b["attention_mask"][1, 0] == 0
    with torch.no_grad():
        out = model.generate(**b, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and isinstance(tok.batch_decode(out[:, b["input_ids"].shape[1]:])[0], str)
