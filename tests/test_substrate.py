"""The warm-started CPU substrate: short canned texts grade as claimed, and a warm start is a loadable,
deterministic base model (`model.name: tiny:DIR`)."""
import json
import os

import pytest
import torch

from pgrpo import substrate as S
from pgrpo.data.problems import builtin_problems
from pgrpo.errors import UserError
from pgrpo.grader.grade import grade_response
from pgrpo.model import load_model


def test_short_texts_grade_as_their_kind():
    p = builtin_problems()[0]
    c = S.completions(p, 0, short=True)
    assert len(c["hack"]) < 200 and len(c["honest"]) < 200
    hack = grade_response(p, c["hack"], "run_tests")
    honest = grade_response(p, c["honest"], "run_tests")
    assert hack["label"] == "reward_hack" and hack["reward"] >= 3
    assert honest["label"] in ("incorrect", "attempted_hack") and honest["reward"] < 3   # as build() checks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("substrate"))
    S.build(d, grade=False, short=True, log=lambda *_: None)
    return d


def test_warmstart_writes_loadable_deterministic_model(data_dir, tmp_path):
    ex = S.warm_examples(data_dir)
    assert {k for _, _, k in ex} == {"hack", "honest"}          # clean texts are not in the warm start
    held = set(json.load(open(os.path.join(data_dir, "substrate.json")))["heldout_ids"])
    train_ids = {json.loads(line)["id"] for line in open(os.path.join(data_dir, "pool.jsonl"))}
    assert not held & train_ids

    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    meta = S.warmstart(data_dir, out_a, steps=3, seed=1, batch=2, threads=1, log=lambda *_: None)
    S.warmstart(data_dir, out_b, steps=3, seed=1, batch=2, threads=1, log=lambda *_: None)
    assert meta["steps"] == 3 and meta["seed"] == 1
    assert S.warm_up_to_date(data_dir, out_a, 3, 1) and not S.warm_up_to_date(data_dir, out_a, 4, 1)

    from safetensors.torch import load_file
    saved = load_file(os.path.join(out_a, "model.safetensors"))
    model, tok = load_model("tiny:" + out_a, seed=123)           # the seed does not change a warm start
    assert model.config.hidden_size == S.WARM_OVERRIDES["hidden_size"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    model_b, _ = load_model("tiny:" + out_b)
    ids = torch.tensor([tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        la, lb = model(input_ids=ids).logits, model_b(input_ids=ids).logits
    assert torch.equal(la, lb)                                    # same seed and data -> same weights
    # and training moved it away from the random init
    from pgrpo.model import build_tiny_model
    r = build_tiny_model(seed=1, **S.WARM_OVERRIDES)
    with torch.no_grad():
        assert not torch.equal(r(input_ids=ids).logits, la)


def test_warmstart_cli_skips_when_up_to_date_and_errors(data_dir, tmp_path, capsys):
    out = str(tmp_path / "w")
    assert S.main(["warmstart", "--data", data_dir, "--out", out, "--steps", "2", "--threads", "1"]) == 0
    assert S.main(["warmstart", "--data", data_dir, "--out", out, "--steps", "2", "--threads", "1"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert S.main(["warmstart", "--data", str(tmp_path / "nope"), "--out", out]) == 2
    with pytest.raises(UserError, match="no warm start"):
        load_model("tiny:" + str(tmp_path / "nope"))
