"""benchmarks/profile_serve_loop.py --account: the step account's arithmetic.

The account splits each engine step into phases measured around nested calls
(attention inside the model's forward); a phase's figure is its own time, the
phases called inside it taken out, so the phases and the step's remainder add up
to the step. These tests check that bookkeeping on plain functions and on
made-up steps, without starting an engine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def profile():
    path = ROOT / "benchmarks" / "profile_serve_loop.py"
    spec = importlib.util.spec_from_file_location("profile_serve_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nested_phases_count_their_own_time_once(profile) -> None:
    class Model:  # a class of this test's own: wrapping replaces its method
        def forward(self, n: int) -> int:
            return sum(self.attention(20_000) for _ in range(n))

        def attention(self, n: int) -> int:
            return sum(i * i for i in range(n))

    clock = profile.PhaseClock()
    model = Model()
    clock.wrap(Model, "attention", "attention")
    clock.wrap(model, "forward", "forward")  # an instance's callable, as the model's
    clock.step = {}
    outer = [0.0, 0.0]  # what a caller around the forward is told of it
    clock._stack.append(outer)
    assert model.forward(5) == 5 * sum(i * i for i in range(20_000))
    assert clock._stack.pop() is outer
    phases = clock.step
    assert set(phases) == {"forward", "attention"}
    # the forward's own time excludes the attention calls inside it: together they
    # are exactly what the caller saw of the forward, in wall and in CPU time
    for i in (0, 1):
        assert phases["forward"][i] + phases["attention"][i] == pytest.approx(
            outer[i], rel=1e-9, abs=1e-12)
    assert all(v >= 0 for pair in phases.values() for v in pair)


def test_a_rounds_phases_and_remainder_add_up_to_its_steps(profile) -> None:
    steps = [
        {"start": 10.0, "wall": 2.0, "cpu": 3.5, "prompt_tokens": 4096, "decode_rows": 0,
         "phases": {"forward": [1.5, 2.8], "attention": [0.3, 0.5], "schedule": [0.01, 0.01]}},
        {"start": 12.0, "wall": 0.05, "cpu": 0.09, "prompt_tokens": 0, "decode_rows": 32,
         "phases": {"forward": [0.03, 0.06], "attention": [0.01, 0.02],
                    "sampler": [0.002, 0.002], "detokenize": [0.001, 0.001]}},
        {"start": 12.05, "wall": 0.04, "cpu": 0.08, "prompt_tokens": 0, "decode_rows": 31,
         "phases": {"forward": [0.03, 0.06], "outputs": [0.001, 0.001]}},
    ]
    report = profile.summarise_account(steps, wall=2.2, cpu=3.8, produced=64)
    assert report["tok_per_s"] == pytest.approx(64 / 2.2, abs=0.05)
    assert report["between_steps_wall_s"] == pytest.approx(2.2 - 2.09, abs=1e-3)
    assert report["prompt_steps_cpu_ms_per_prompt_token"] == [pytest.approx(3.5 / 4096 * 1e3,
                                                                             abs=1e-3)]
    assert report["steps_with_prompt_tokens"]["steps"] == 1
    assert report["decode_only_steps"]["steps"] == 2
    for group in ("all_steps", "steps_with_prompt_tokens", "decode_only_steps"):
        totals = report[group]
        phases = totals["phases_wall_cpu_s"]
        assert set(phases) == {*profile.ACCOUNT_PHASES, "step_python_rest"}
        assert sum(w for w, _ in phases.values()) == pytest.approx(totals["wall_s"], abs=0.01)
        assert sum(c for _, c in phases.values()) == pytest.approx(totals["cpu_s"], abs=0.01)
    rest = report["all_steps"]["phases_wall_cpu_s"]["step_python_rest"]
    assert rest[0] == pytest.approx(2.09 - (1.56 + 0.31 + 0.01 + 0.002 + 0.001 + 0.001), abs=2e-3)
    assert [row[1:3] for row in report["steps"]] == [[4096, 0], [0, 32], [0, 31]]


def test_the_account_sees_attention_on_the_fast_path(profile, make_hf_model, compiled) -> None:
    """The fast path (docs/fast-path.md) calls attention through the function its
    `fast_fn` returned, not `Attention.forward`: the account must time that too,
    or every decode step's attention is booked as the forward's own time."""
    report = profile.account(make_hf_model("llama"), "float32", rounds=1, seed=0)
    decode = report["rounds"][0]["decode_only_steps"]["phases_wall_cpu_s"]
    assert decode["attention"][1] > 0, decode
