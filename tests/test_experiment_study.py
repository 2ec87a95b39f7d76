"""posttrain experiment, what Study 2 (EXPERIMENTS.md) needs: disjoint validation/test splits of
one source, per-problem pass@k, standard errors and the paired 2-SE comparison, the base row."""

import json
import math
from pathlib import Path

import pytest
import yaml

from posttrain import experiment as ex
from posttrain.config import ConfigError
from posttrain.experiment import results as R

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"path": "tiny:hidden=16,layers=1,heads=2,seed=0"},
    "data": {"train": "synthetic:arithmetic?n=8&seed=0&split=train&max_digits=1", "eval": "split:test", "demo_keys": ["demos"]},
    "rollout": {"n": 2, "max_new_tokens": 6, "batch_size": 16},
    "verifier": {"name": "exact"},
    "trainer": {"prompts_per_step": 2, "lr": 1.0e-3},
    "logging": {"progress": False},
}
SPLITS = {"source": "synthetic:arithmetic?n=30&seed=1&split=eval", "parts": {"validation": 10, "test": 20}}


def write_spec(tmp_path: Path, **over) -> Path:
    spec = {"name": "t", "out": str(tmp_path / "out"), "config": TINY, "steps": 2, "seeds": [0],
            "algorithms": {"grpo": {"algorithm": {"name": "grpo"}}}, "splits": SPLITS, **over}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_splits_are_disjoint_consecutive_parts_and_resolve_in_configs(tmp_path):
    spec = ex.load_spec(write_spec(tmp_path))
    files = ex.write_splits(spec)
    rows = {k: [json.loads(line) for line in f.read_text().splitlines()] for k, f in files.items()}
    assert [len(rows["validation"]), len(rows["test"])] == [10, 20]
    assert not {r["prompt"] for r in rows["validation"]} & {r["prompt"] for r in rows["test"]}
    from posttrain.data import load_examples

    source = load_examples(SPLITS["source"])
    assert [r["prompt"] for r in rows["validation"] + rows["test"]] == [e.prompt for e in source]  # in order
    assert rows["test"][0]["answer"] == source[10].answer and len(rows["test"][0]["demos"]) == 2
    job = ex.expand(spec)[0]
    assert job.config["data"]["eval"] == str((tmp_path / "out" / "splits" / "test.jsonl").resolve())
    mtime = files["test"].stat().st_mtime_ns
    ex.write_splits(spec)  # same source, same bytes: not rewritten
    assert files["test"].stat().st_mtime_ns == mtime


def test_split_errors_name_the_field(tmp_path):
    bad = {**TINY, "data": {**TINY["data"], "eval": "split:tset"}}
    with pytest.raises(ConfigError, match=r"'split:tset': no such part in splits.parts \(validation, test\)"):
        ex.load_spec(write_spec(tmp_path, config=bad))
    with pytest.raises(ConfigError, match="'split:test': the spec has no splits: section"):
        ex.load_spec(write_spec(tmp_path, splits=None))
    with pytest.raises(ConfigError, match="splits.parts.test: a count >= 1, got 0"):
        ex.load_spec(write_spec(tmp_path, splits={**SPLITS, "parts": {"validation": 10, "test": 0}}))
    spec = ex.load_spec(write_spec(tmp_path, splits={**SPLITS, "parts": {"validation": 10, "test": 21}}))
    with pytest.raises(ConfigError, match="has 30 rows, the parts need 31"):
        ex.write_splits(spec)
    with pytest.raises(ConfigError, match=r"comparisons: a list of \[variant, variant\] pairs"):
        ex.load_spec(write_spec(tmp_path, comparisons=[["grpo"]]))


def _generations(run_dir: Path, rewards: dict[str, list[float]]) -> None:
    f = run_dir / "final_eval" / "generations" / "m" / "heldout.jsonl"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("".join(json.dumps({"uid": u, "samples": [{"reward": r} for r in rs]}) + "\n" for u, rs in rewards.items()))


def test_problem_values_pass_at_k_per_problem(tmp_path):
    _generations(tmp_path, {"u1": [1.0, 0.0, 0.0, 1.0], "u2": [0.0] * 4, "u3": [1.0, 0.0, 0.0, 0.0]})
    v = R.problem_values(tmp_path, [1, 2, 4])
    assert v["pass@1"] == {"u1": 0.5, "u2": 0.0, "u3": 0.25}
    assert v["pass@2"]["u1"] == pytest.approx(1 - 1 / 6)  # 1 − C(2,2)/C(4,2)
    assert v["pass@2"]["u3"] == pytest.approx(1 - 3 / 6)  # 1 − C(3,2)/C(4,2)
    assert v["pass@4"] == {"u1": 1.0, "u2": 0.0, "u3": 1.0}
    assert R.problem_values(tmp_path / "none", [1]) == {}


SEED_A = {"a": 1.0, "b": 0.0, "c": 0.5, "d": 0.5}
SEED_B = {"a": 0.5, "b": 0.0, "c": 1.0, "d": 0.5}


def test_standard_error_against_hand_computed():
    # seed-averaged per problem: .75, 0, .75, .5 → sample var .375/3 = .125; /4 problems → .03125
    se = R.standard_error([SEED_A, SEED_B], [0.5, 0.5])
    assert se["se"] == pytest.approx(math.sqrt(0.03125)) and se["problems"] == 4 and se["mean"] == pytest.approx(0.5)
    # seed means 0.4, 0.6: seed variance .02 / 2 seeds = .01 added in quadrature
    assert R.standard_error([SEED_A, SEED_B], [0.4, 0.6])["se"] == pytest.approx(math.sqrt(0.03125 + 0.01))
    assert R.binomial_se(0.3, 400) == pytest.approx(0.022913, abs=1e-6)


def test_paired_comparison_and_verdict():
    a = {"variant": "a", "pass@1": {"values": [0.5, 0.5]}}
    b = {"variant": "b", "pass@1": {"values": [0.375]}}
    per_problem = {"a": {"pass@1": [SEED_A, SEED_B]}, "b": {"pass@1": [{"a": 0.5, "b": 0.0, "c": 0.5, "d": 0.5}]}}
    c = R.compare(a, b, "pass@1", per_problem)
    # per-problem differences .25, 0, .25, 0: mean .125, sample sd √(.0625/3), SE = sd/2
    assert c["delta"] == pytest.approx(0.125) and c["se"] == pytest.approx(math.sqrt(0.0625 / 3) / 2)
    assert c["z"] == pytest.approx(0.125 / (math.sqrt(0.0625 / 3) / 2)) and c["verdict"] == "≈"  # z = 1.73 < 2
    big = {"a": {"pass@1": [{u: 1.0 for u in "abcd"}, {u: 1.0 for u in "abcd"}]}, "b": {"pass@1": [{"a": 0.0, "b": 0.1, "c": 0.0, "d": 0.1}]}}
    assert R.compare(a, b, "pass@1", big)["verdict"] == ">"
    assert R.compare(b, a, "pass@1", big)["verdict"] == "<"
    assert R.compare(a, b, "pass@4", per_problem) is None


def test_table_has_base_row_se_and_comparisons(tmp_path, monkeypatch):
    """summarize → markdown on hand-made finished runs: the base row, [SE] cells, the comparison."""
    spec = ex.load_spec(write_spec(tmp_path, seeds=[0, 1], base_model={**TINY, "algorithm": {"name": "sft"},
                                   "data": {**TINY["data"], "eval": None}}, final_eval={"n": 4, "k": [1, 4]},
                                   comparisons=[["grpo", "base"]]))
    jobs = ex.expand(spec)
    base = ex.base_job(spec)
    gens = {0: {"u1": [1.0, 1.0, 0.0, 0.0], "u2": [1.0, 0.0, 0.0, 0.0]}, 1: {"u1": [1.0, 1.0, 1.0, 0.0], "u2": [1.0, 1.0, 0.0, 0.0]}}
    for job in jobs:
        job.run_dir.mkdir(parents=True)
        (job.run_dir / "done.json").write_text(json.dumps({"config": job.config, "finals": [], "seconds": 1.0}))
        (job.run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": 0.25}) + "\n"
                                                   + json.dumps({"step": 2, "eval/accuracy": 0.5}) + "\n")
        _generations(job.run_dir, gens[job.seed])
        p1 = sum(sum(r) / 4 for r in gens[job.seed].values()) / 2
        (job.run_dir / "final_eval").mkdir(exist_ok=True)
        (job.run_dir / "final_eval" / "results.json").write_text(json.dumps({"results": {"m": {"heldout": {"pass@1": p1, "pass@4": 1.0}}}}))
    _generations(base.run_dir, {"u1": [1.0, 0.0, 0.0, 0.0], "u2": [0.0] * 4})
    (base.run_dir / "final_eval" / "results.json").write_text(json.dumps({"results": {"m": {"heldout": {"pass@1": 0.125, "pass@4": 0.5}}}}))
    payload = R.summarize(spec, jobs)
    rows = {r["variant"]: r for r in [payload["base"]] + payload["rows"]}
    assert [r["variant"] for r in payload["rows"]] == ["grpo"]  # the base is its own entry, first in the table
    assert rows["base"]["final_accuracy"]["mean"] == 0.25  # the runs' step-0 greedy accuracy
    assert rows["grpo"]["pass@1"]["values"] == [0.375, 0.625]
    # grpo pass@1 per problem, seed-averaged: u1 .625, u2 .375 → sd .1768, /√2 = .125; seeds var .03125/2
    assert rows["grpo"]["se/pass@1"] == pytest.approx(math.sqrt(0.125 ** 2 + 0.03125 / 2))
    # greedy: binomial on 2 problems at p = .5 plus seed variance 0
    assert rows["grpo"]["se/final_accuracy"] == pytest.approx(math.sqrt(0.25 / 2))
    (c,) = [c for c in payload["comparisons"] if c["metric"] == "pass@1"]
    assert (c["a"], c["b"], c["delta"]) == ("grpo", "base", pytest.approx(0.5 - 0.125))
    md = R.markdown(payload)
    # base greedy SE: √(.25·.75/2) = 30.6 points; pass@1 per problem .25, 0 → sd .1768/√2 = 12.5
    assert "| base | 1/1 | 25.0 ± 0.0 | 25.0 ± 0.0 [30.6] | 12.5 ± 0.0 [12.5] | 50.0 ± 0.0 [50.0] |" in md
    assert "| grpo | 2/2 | 25.0 ± 0.0 | 50.0 ± 0.0 [35.4] | 50.0 ± 17.7 [17.7] | 100.0 ± 0.0 [0.0] |" in md
    # paired: per-problem differences (.625 − .25, .375 − 0) = .375, .375: sd 0, so SE is the seeds' part √(.03125/2)
    assert "| grpo | base | pass@1 | +37.5 | 12.5 | +3.0 | yes | > |" in md


def test_study_specs_resolve():
    """The study's two specs load and validate (model paths aside: the base is built by the study)."""
    for name in ("paper_claims.yaml", "rl_sweep.yaml", "rl_sweep_low.yaml", "rl_explore.yaml", "rl_explore_batch.yaml"):
        spec = ex.load_spec(ROOT / "experiments" / name)
        assert spec.splits == {"source": "synthetic:arithmetic?n=600&seed=1&split=eval", "parts": {"validation": 200, "test": 400}}
        assert spec.seeds == ([0, 1, 2] if name == "paper_claims.yaml" else [0])


def test_without_final_eval_base_row_is_step0_and_comparisons_unpaired(tmp_path):
    """No final_eval: the base row is the runs' step-0 evaluation (one value per seed), SEs are
    binomial on the held-out split's size plus the seeds' part, comparisons unpaired."""
    spec = ex.load_spec(write_spec(tmp_path, seeds=[0, 1], base_model={**TINY, "algorithm": {"name": "sft"},
                                   "data": {**TINY["data"], "eval": None}}, comparisons=[["grpo", "base"]]))
    ex.write_splits(spec)  # test: 20 problems
    jobs = ex.expand(spec)
    starts, ends = {0: (0.25, 0.5), 1: (0.35, 0.6)}, {0: (0.9, 0.95), 1: (0.95, 1.0)}  # (avg@4, pass@4)
    for job in jobs:
        job.run_dir.mkdir(parents=True)
        (job.run_dir / "done.json").write_text(json.dumps({"config": job.config, "finals": [], "seconds": 1.0}))
        rows = [{"step": 0, "eval/accuracy": starts[job.seed][0], "eval/pass@4": starts[job.seed][1]},
                {"step": 2, "eval/accuracy": ends[job.seed][0], "eval/pass@4": ends[job.seed][1]}]
        (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    payload = R.summarize(spec, jobs)
    base, (grpo,) = payload["base"], payload["rows"]
    assert base["seeds"] == [0, 1] and base["final_accuracy"]["values"] == [0.25, 0.35]
    assert base["eval/pass@4"]["values"] == [0.5, 0.6]
    # SE: √(p(1−p)/20 + s²/2): base p = .3, s² = .005; grpo p = .925, s² = .00125
    assert base["se/final_accuracy"] == pytest.approx(math.sqrt(0.3 * 0.7 / 20 + 0.005 / 2))
    assert grpo["se/final_accuracy"] == pytest.approx(math.sqrt(0.925 * 0.075 / 20 + 0.00125 / 2))
    c = {c["metric"]: c for c in payload["comparisons"]}
    se = math.sqrt(0.3 * 0.7 / 20 + 0.005 / 2 + 0.925 * 0.075 / 20 + 0.00125 / 2)  # 0.1307
    assert c["final_accuracy"]["delta"] == pytest.approx(0.625) and c["final_accuracy"]["se"] == pytest.approx(se)
    assert c["final_accuracy"]["paired"] is False and c["final_accuracy"]["verdict"] == ">"  # .625 > 2 × .131
    # pass@4: base p = .55, grpo p = .975 → SE √(.012375 + .0025 + .00121875 + .000625) = .1293; Δ = .425 > 2 SE
    assert c["eval/pass@4"]["delta"] == pytest.approx(0.425) and c["eval/pass@4"]["se"] == pytest.approx(math.sqrt(0.0167188), abs=1e-5)
    assert c["eval/pass@4"]["verdict"] == ">"
    lose = R.compare({**grpo, "variant": "g"}, {**base, "variant": "b"}, "eval/pass@4", {})
    assert lose["verdict"] == ">" and R.compare({**base, "variant": "b"}, {**grpo, "variant": "g"}, "eval/pass@4", {})["verdict"] == "<"
