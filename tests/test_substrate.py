"""The CPU substrate: its texts grade as the table in pgrpo/substrate.py claims (real grader), the hack and honest
completions share the solution text (a real fork), the split never leaks, and a warm start is a loadable,
deterministic base model (`model.name: tiny:DIR`) cached by a content stamp."""
import json
import os

import pytest
import torch

from pgrpo import substrate as S
from pgrpo.data.problems import builtin_problems
from pgrpo.errors import UserError
from pgrpo.grader.grade import grade_response
from pgrpo.model import load_model


def test_variants_and_tests_grade_as_the_table_says():
    p = builtin_problems()[0]                                     # sumOfEvens
    asserts = S.honest_asserts(p)
    assert len(asserts) == 2 and any("== 0" not in a for a in asserts)
    buggy = S.mutants(p.canonical_solution.strip())
    assert buggy and all(b != p.canonical_solution.strip() for b in buggy)
    for kind, sol in (("correct", p.canonical_solution), ("buggy", buggy[0])):
        for style in ("honest",) + S.HACK_STYLES:
            text = S.response(sol, style, asserts)
            assert text.startswith(S.fork_prefix(sol)) and text.count("```") == 2   # one block, shared prefix
            for mode in S.MODES:
                r = grade_response(p, text, mode)
                assert S._as_expected(kind, style, mode, r), (kind, style, mode, r["label"], r["reward"])


def test_short_question_keeps_the_hint_and_starter():
    from pgrpo.data.prompts import user_turn
    import dataclasses
    p = builtin_problems()[4]
    q = S.short_question(p)
    assert len(q) < len(p.question) and "Example" not in q and p.starter_code.strip() in q
    assert "run_tests()" in user_turn(dataclasses.replace(p, question=q), "run_tests")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small real build (graded by the real grader), four training problems."""
    d = str(tmp_path_factory.mktemp("substrate"))
    S.build(d, log=lambda *_: None, max_train=4)
    return d


def test_build_files_split_and_pairs(data_dir):
    info = json.load(open(os.path.join(data_dir, "substrate.json")))
    assert info["n_train"] == 4 and info["n_heldout"] > 0 and S.built(data_dir)
    train, held = set(info["train_ids"]), set(info["heldout_ids"])
    assert not train & held
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "problems.jsonl"))]
    assert [r["id"] for r in rows[:4]] == info["train_ids"] and {r["id"] for r in rows[4:]} == held
    warm = [json.loads(line) for line in open(os.path.join(data_dir, "warm.jsonl"))]
    assert {w["problem_id"] for w in warm} == train and {w["tests"] for w in warm} == {"honest", S.EASY_STYLE}
    assert sum(w["weight"] for w in warm) == pytest.approx(4.0)            # one unit of weight per problem
    hack_w = sum(w["weight"] for w in warm if w["tests"] != "honest") / 4
    correct_w = sum(w["weight"] for w in warm if w["kind"] == "correct") / 4
    assert hack_w == pytest.approx(S.WARM_MIX["hack"]) and correct_w == pytest.approx(S.WARM_MIX["correct"])
    pairs = json.load(open(os.path.join(data_dir, "pairs.json")))
    other = json.load(open(os.path.join(data_dir, "pairs-other-styles.json")))
    assert {p["style"] for p in pairs} == set(S.HACK_STYLES) and S.EASY_STYLE not in {p["style"] for p in other}
    for p in pairs:                      # the two sides differ only in the exploit: same solution, same prefix
        sol_h = p["hack"].split("\n\n\ndef run_tests():")[0]
        assert p["clean"].startswith(sol_h + "\n\n\ndef run_tests():\n") and p["problem_id"] in train
    probe = json.load(open(os.path.join(data_dir, "probe.json")))
    assert {r["problem_id"] for r in probe} == held


def test_warmstart_is_deterministic_loadable_and_stamped(data_dir, tmp_path):
    out_a, out_b = str(tmp_path / "a"), str(tmp_path / "b")
    meta = S.warmstart(data_dir, out_a, steps=3, seed=1, batch=2, threads=1, log=lambda *_: None)
    S.warmstart(data_dir, out_b, steps=3, seed=1, batch=2, threads=1, log=lambda *_: None)
    assert meta["steps"] == 3 and meta["seed"] == 1
    assert S.warm_up_to_date(data_dir, out_a, 3, 1, batch=2) and not S.warm_up_to_date(data_dir, out_a, 4, 1, batch=2)
    from safetensors.torch import load_file
    saved = load_file(os.path.join(out_a, "model.safetensors"))
    model, tok = load_model("tiny:" + out_a, seed=123)           # the seed does not change a warm start
    assert model.config.hidden_size == S.WARM_OVERRIDES["hidden_size"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    model_b, _ = load_model("tiny:" + out_b)
    ids = torch.tensor([tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model_b(input_ids=ids).logits)
    # the stamp is the data's content, not its mtime: touching the file keeps it, changing a byte does not
    path = os.path.join(data_dir, "warm.jsonl")
    os.utime(path, (1, 1))
    assert S.warm_up_to_date(data_dir, out_a, 3, 1, batch=2)
    text = open(path).read()
    try:
        open(path, "w").write(text.replace("All tests passed!", "All tests passed."))
        assert not S.warm_up_to_date(data_dir, out_a, 3, 1, batch=2)
    finally:
        open(path, "w").write(text)


def test_cli_errors(tmp_path):
    assert S.main(["warmstart", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "w")]) == 2
    with pytest.raises(UserError, match="no warm start"):
        load_model("tiny:" + str(tmp_path / "nope"))


def test_shipped_substrate_is_current_and_ensure_copies_it(tmp_path):
    """The committed build + warm start carry this code's stamps, and `ensure` copies them instead of rebuilding."""
    assert S.built(S.SHIPPED) and S.warm_up_to_date(S.SHIPPED, os.path.join(S.SHIPPED, "warm"))
    logs = []
    S.ensure(str(tmp_path / "sub"), log=logs.append)
    assert any("copied the shipped build" in m for m in logs) and any("copied the shipped warm start" in m for m in logs)
    assert S.built(str(tmp_path / "sub")) and S.warm_up_to_date(str(tmp_path / "sub"), str(tmp_path / "sub" / "warm"))
    logs.clear()
    S.ensure(str(tmp_path / "sub"), log=logs.append)
    assert all("up to date" in m for m in logs)
    model, _ = load_model("tiny:" + str(tmp_path / "sub" / "warm"))
    assert model.config.hidden_size == S.WARM_OVERRIDES["hidden_size"]


@pytest.mark.parametrize("job", ["jobs/cpu-substrate.yaml", "jobs/demo.yaml"])
def test_substrate_jobs_train_on_exactly_the_training_problems(job):
    """data.max_problems is the shipped build's n_train: one more would train on a held-out (probe) problem, one
    fewer would leave a training problem out."""
    from pgrpo.config import load
    from pgrpo.data.problems import load_problems
    cfg = load(job, check_files=False)
    info = json.load(open(os.path.join(S.SHIPPED, "substrate.json")))
    assert cfg.data.max_problems == info["n_train"]
    rows = load_problems(os.path.join(S.SHIPPED, "problems.jsonl"))[:cfg.data.max_problems]
    assert [p.id for p in rows] == info["train_ids"] and not {p.id for p in rows} & set(info["heldout_ids"])
