"""Prometheus face of the trainer: contract names, bounded labels, its own registry, a real HTTP scrape."""
import urllib.request

import pytest

from helpers import free_port
from prometheus_client.parser import text_string_to_metric_families

from pgrpo.metrics import GAUGES, PHASES, Metrics, progress_line, timing_line


ROW = {"step": 3, "reward_mean": 1.25, "hack_rate": 0.5, "pass_rate": 0.25, "tokens_generated": 321,
       "skipped_groups": 2, "groups": 3, "loss": -0.01, "grad_norm": 0.3, "proj_removed_frac": 0.2,
       "proj_fired_frac": 0.75, "grad_vhack_cos": 0.4, "update_along_vhack": 0.0, "delta_hack_norm": 0.0,
       "vhack_overlap": 0.875,   # a refresh step
       "timing": {"gen": 1.5, "fwd_bwd": 0.7, "reward": 0.2, "project": 0.01, "optim": 0.02, "total": 2.5}}


def test_scrape_exposes_contract_names_and_values():
    port = free_port()
    m = Metrics("runA", "projected", 7, port=port, addr="127.0.0.1")
    try:
        m.observe_step(ROW)
        m.grader_request("ok")
        m.grader_request("retry")
        m.checkpoint_saved(1234.0)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.close()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            assert set(smp.labels) <= {"run", "arm", "seed", "phase", "outcome", "le"}, smp  # never the step
            assert smp.labels.get("run") == "runA" and smp.labels["arm"] == "projected" and smp.labels["seed"] == "7"
            extra = tuple(sorted((k, v) for k, v in smp.labels.items() if k not in ("run", "arm", "seed")))
            samples[(smp.name, extra)] = smp.value
    for p in PHASES:
        assert samples[("pgrpo_step_phase_seconds_count", (("phase", p),))] == 1.0
    assert samples[("pgrpo_step_phase_seconds_sum", (("phase", "gen"),))] == 1.5
    assert samples[("pgrpo_steps_total", ())] == 1.0
    assert samples[("pgrpo_tokens_generated_total", ())] == 321.0
    assert samples[("pgrpo_skipped_groups_total", ())] == 2.0
    assert samples[("pgrpo_hack_ratio", ())] == 0.5 and samples[("pgrpo_pass_ratio", ())] == 0.25
    assert samples[("pgrpo_projection_removed_ratio", ())] == 0.2
    assert samples[("pgrpo_vhack_overlap", ())] == 0.875
    assert samples[("pgrpo_grader_requests_total", (("outcome", "retry"),))] == 1.0
    assert samples[("pgrpo_grader_requests_total", (("outcome", "timeout"),))] == 0.0
    assert samples[("pgrpo_last_checkpoint_timestamp_seconds", ())] == 1234.0
    for name in GAUGES.values():
        assert f"# TYPE {name} gauge" in text
    # buckets spanning seconds to minutes
    assert ("pgrpo_step_phase_seconds_bucket", (("le", "0.1"), ("phase", "gen"))) in samples
    assert ("pgrpo_step_phase_seconds_bucket", (("le", "600.0"), ("phase", "gen"))) in samples
    with pytest.raises(OSError):  # closed: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_registries_are_independent_and_port_0_serves_nothing():
    a, b = Metrics("a", "vanilla", 0), Metrics("b", "vanilla", 0)  # same names twice: no duplicate error
    a.observe_step(ROW)
    assert a.server is None and b.server is None
    assert a.registry.get_sample_value("pgrpo_steps_total", {"run": "a", "arm": "vanilla", "seed": "0"}) == 1.0
    assert b.registry.get_sample_value("pgrpo_steps_total", {"run": "b", "arm": "vanilla", "seed": "0"}) == 0.0


def test_lines_for_people():
    assert timing_line(ROW) == "TIMING step=3 gen=1.50s fwd_bwd=0.70s reward=0.20s project=0.01s optim=0.02s total=2.50s"
    line = progress_line(ROW, 10)
    assert line.startswith("step 3/10") and "hack 0.50" in line and "skip 2/3" in line and "removed 0.20" in line
