"""posttrain experiment: grid expansion, validation, resumability, the results table, plots, and
a real 1-step run through the CLI."""

import json
import math
import statistics
from pathlib import Path

import pytest
import yaml

from posttrain import experiment as ex
from posttrain import run as run_lib
from posttrain.cli import main
from posttrain.config import ConfigError
from posttrain.plugins import installed_algorithms

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": {"path": "tiny:hidden=16,layers=1,heads=2,seed=0"},
    "data": {"train": "synthetic:arithmetic?n=8&seed=0&split=train&max_digits=1",
             "eval": "synthetic:arithmetic?n=4&seed=1&split=eval&max_digits=1", "demo_keys": ["demos"]},
    "rollout": {"n": 2, "max_new_tokens": 6, "batch_size": 16},
    "verifier": {"name": "exact"},
    "trainer": {"prompts_per_step": 2, "lr": 1.0e-3},
    "eval": {"n": 1, "temperature": 0.0, "max_prompts": 2},
    "logging": {"progress": False},
}


def write_spec(tmp_path: Path, **over) -> Path:
    spec = {"name": "t", "out": str(tmp_path / "out"), "config": TINY, "steps": 6, "seeds": [0, 1],
            "algorithms": {"grpo": {"algorithm": {"name": "grpo"}},
                           "sft_then_grpo": {"stages": [{"algorithm": {"name": "sft"}, "trainer": {"steps": 2}},
                                                        {"algorithm": {"name": "grpo"}, "trainer": {"steps": 4}}]}},
            **over}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --- expansion ---------------------------------------------------------------------------------


def test_grid_expansion_names_dirs_and_layers(tmp_path):
    spec = ex.load_spec(write_spec(tmp_path, grid={"trainer.lr": [0.001, 0.01], "rollout.temperature": [1.0]},
                                   budget={"rollout.n": 4}))
    jobs = ex.expand(spec)
    assert len(jobs) == 2 * 2 * 2  # algorithms × grid points × seeds
    assert [j.name for j in jobs[:4]] == ["grpo__lr=0.001__temperature=1.0/seed0", "grpo__lr=0.001__temperature=1.0/seed1",
                                          "grpo__lr=0.01__temperature=1.0/seed0", "grpo__lr=0.01__temperature=1.0/seed1"]
    j = jobs[2]
    assert j.run_dir == tmp_path / "out" / "runs" / "grpo__lr=0.01__temperature=1.0" / "seed0"
    assert (j.config["trainer"]["lr"], j.config["trainer"]["seed"], j.config["trainer"]["steps"]) == (0.01, 0, 6)
    assert j.config["rollout"]["n"] == 4 and j.config["run_dir"] == str(j.run_dir)
    staged = jobs[-1]
    assert staged.name == "sft_then_grpo__lr=0.01__temperature=1.0/seed1"
    assert staged.stage_steps == [2, 4] and staged.stage_names == ["sft", "grpo"]
    # budget, grid point and seed reach every stage (a stage's own value would otherwise win)
    for st in staged.config["stages"]:
        assert (st["trainer"]["lr"], st["trainer"]["seed"], st["rollout"]["n"]) == (0.01, 1, 4)
    assert [st["trainer"]["steps"] for st in staged.config["stages"]] == [2, 4]
    assert staged.stage_dirs() == [staged.run_dir / "stage0-sft", staged.run_dir / "stage1-grpo"]
    # names are a function of the spec alone: expanding again gives the same list
    assert [j.name for j in ex.expand(spec)] == [j.name for j in jobs]


def test_smoke_and_only(tmp_path):
    spec = ex.load_spec(write_spec(tmp_path, smoke={"rollout.n": 2, "final_eval.n": 2}, final_eval={"n": 8, "k": [1, 8]}),
                        smoke=True)
    assert spec.out == tmp_path / "out-smoke" and spec.final_eval == {"n": 2, "k": [1]}  # k > n dropped
    jobs = ex.expand(spec, smoke=True, only=["sft_then_grpo"])
    assert [j.name for j in jobs] == ["sft_then_grpo/seed0"]
    assert jobs[0].stage_steps == [1, 1] and jobs[0].config["trainer"]["steps"] == 2
    with pytest.raises(ConfigError, match="--only nope: not an entry of algorithms"):
        ex.expand(spec, only=["nope"])


def test_spec_errors_name_the_field(tmp_path):
    bad = write_spec(tmp_path, steps=5, seeds=[0, 0], stepz=1, budget={"trainer.steps": 3},
                     summaries={"x": {"metric": "train/grad_norm", "reduce": "median"}})
    with pytest.raises(ConfigError) as e:
        ex.load_spec(bad)
    msg = str(e.value)
    assert "stepz: unknown key. Did you mean 'steps'?" in msg
    assert "algorithms.sft_then_grpo.stages: trainer.steps 2 + 4 = 6, but the budget is steps: 5" in msg
    assert "algorithms.grpo" not in msg  # single-stage entries take `steps`
    assert "seeds: a list of distinct integers" in msg
    assert "budget.trainer.steps: set by the spec itself" in msg
    assert "summaries.x.reduce: 'median' is not one of" in msg


def test_unknown_algorithm_lists_installed(tmp_path):
    spec = ex.load_spec(write_spec(tmp_path, algorithms={"grpo": {"algorithm": {"name": "grpo"}},
                                                         "x": {"algorithm": {"name": "grp0"}}}))
    with pytest.raises(ConfigError) as e:
        ex.check_algorithms(spec, ex.expand(spec))
    msg = str(e.value)
    assert "algorithms.x: algorithm 'grp0' is not installed (installed: " in msg and "Did you mean 'grpo'?" in msg
    assert ", ".join(installed_algorithms()) in msg
    kept = ex.check_algorithms(spec, ex.expand(spec), skip_missing=True)
    assert {j.entry for j in kept} == {"grpo"}


def test_validate_reports_bad_run_config(tmp_path):
    spec = ex.load_spec(write_spec(tmp_path, algorithms={"grpo": {"algorithm": {"name": "grpo", "clip_lo": 0.2}}}))
    with pytest.raises(ConfigError, match=r"algorithms.grpo: algorithm.clip_lo: unknown key. Did you mean 'clip_low'\?"):
        ex.validate(spec, ex.expand(spec))


# --- running and resuming ----------------------------------------------------------------------


def _fake_train(calls):
    """Stands in for posttrain.run.train: writes what a run leaves (metrics, a checkpoint dir)."""
    def train(cfg, overrides=(), **kw):
        calls.append(cfg["run_dir"])
        stages = cfg.get("stages") or [cfg]
        finals = []
        for i, st in enumerate(stages):
            d = Path(cfg["run_dir"]) if len(stages) == 1 else Path(cfg["run_dir"]) / f"stage{i}-{st['algorithm']['name']}"
            d.mkdir(parents=True, exist_ok=True)
            n = st["trainer"]["steps"]
            rows = [{"step": 0, "eval/accuracy": 0.1}] + [{"step": s, "train/grad_norm": float(s)} for s in range(1, n + 1)]
            rows[-1]["eval/accuracy"] = 0.5
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            finals.append(d / "checkpoints" / f"step-{n:06d}")
            finals[-1].mkdir(parents=True)
        return finals
    return train


def test_second_invocation_runs_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(run_lib, "train", _fake_train(calls))
    path = write_spec(tmp_path)
    r1 = ex.run_experiment(path)
    assert r1["ran"] == 4 and r1["failed"] == [] and len(calls) == 4
    assert all((tmp_path / "out" / "runs" / v / s / "done.json").exists() for v in ("grpo", "sft_then_grpo") for s in ("seed0", "seed1"))
    r2 = ex.run_experiment(path)
    assert r2["ran"] == 0 and len(calls) == 4  # every run skipped
    (tmp_path / "out" / "results.md").unlink()
    assert main(["experiment", str(path), "--report-only", "--only", "grpo"]) == 0
    assert len(calls) == 4 and "| grpo | 2/2 |" in (tmp_path / "out" / "results.md").read_text()
    # a third seed is only the new runs
    path.write_text(path.read_text().replace("- 1\n", "- 1\n- 2\n"))
    r3 = ex.run_experiment(path)
    assert r3["ran"] == 2 and sorted(calls[4:]) == sorted(str(tmp_path / "out" / "runs" / v / "seed2") for v in ("grpo", "sft_then_grpo"))
    # a changed config for a finished run is refused, naming the run and the key
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 0.002"))
    with pytest.raises(ConfigError, match=r"grpo/seed0: finished in .* with a different config \(changed: .*trainer.lr"):
        ex.run_experiment(path)


def test_failed_run_is_reported_and_retried(tmp_path, monkeypatch):
    calls = []
    good = _fake_train(calls)
    failed = []

    def flaky(cfg, overrides=(), **kw):
        if cfg["run_dir"].endswith("runs/grpo/seed1") and not failed:
            failed.append(cfg["run_dir"])
            raise RuntimeError("boom")
        return good(cfg)
    monkeypatch.setattr(run_lib, "train", flaky)
    path = write_spec(tmp_path)
    r = ex.run_experiment(path)
    assert r["failed"] == ["grpo/seed1"] and len(calls) == 3
    assert "RuntimeError: boom" in (tmp_path / "out" / "runs" / "grpo" / "seed1" / "log.txt").read_text()
    assert not (tmp_path / "out" / "runs" / "grpo" / "seed1" / "done.json").exists()
    assert main(["experiment", str(path)]) == 0  # only the failed run runs again, and now succeeds
    assert calls[3:] == [str(tmp_path / "out" / "runs" / "grpo" / "seed1")]


# --- results -----------------------------------------------------------------------------------


def _write_run(run_dir: Path, rows: list[dict], cfg: dict, pass_at_k: dict | None = None):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "done.json").write_text(json.dumps({"config": cfg, "finals": [], "seconds": 1.0}))
    if pass_at_k is not None:
        (run_dir / "final_eval").mkdir()
        (run_dir / "final_eval" / "results.json").write_text(json.dumps({"results": {"m": {"heldout": pass_at_k}}}))


def _synthetic_runs(tmp_path):
    spec = ex.load_spec(write_spec(tmp_path, seeds=[0, 1, 2], target_accuracy=0.4, algorithms={"grpo": {"algorithm": {"name": "grpo"}}},
                                   summaries={"gn_var": {"metric": "train/grad_norm", "reduce": "var"},
                                              "gn_late": {"metric": "train/grad_norm", "reduce": "mean", "from": 5, "to": 6}}))
    jobs = ex.expand(spec)
    evals = {0: [0.1, 0.2, 0.4, 0.5], 1: [0.0, 0.3, 0.3, 0.35], 2: [0.2, 0.45, 0.6, 0.7]}  # at steps 0, 2, 4, 6
    grad = {0: [1, 2, 3, 4, 5, 6], 1: [2, 2, 2, 2, 2, 2], 2: [1, 3, 1, 3, 1, 3]}
    passk = {0: {"pass@1": 0.5, "pass@4": 0.75}, 1: {"pass@1": 0.25, "pass@4": 0.5}, 2: {"pass@1": 0.75, "pass@4": 1.0}}
    for j in jobs:
        rows = [{"step": s, "train/grad_norm": float(grad[j.seed][s - 1])} for s in range(1, 7)]
        rows = [{"step": 0}] + rows
        for k, s in enumerate((0, 2, 4, 6)):
            rows[s]["eval/accuracy"] = evals[j.seed][k]
        _write_run(j.run_dir, rows, j.config, passk[j.seed])
    return spec, jobs


def test_table_mean_std_over_seeds_against_hand_computed(tmp_path):
    spec, jobs = _synthetic_runs(tmp_path)
    (row,) = ex.summarize(spec, jobs)["rows"]
    fa = row["final_accuracy"]
    assert fa["values"] == [0.5, 0.35, 0.7]
    assert fa["mean"] == pytest.approx(0.5166666667)
    # sample std: sqrt(((0.5-.5167)^2 + (0.35-.5167)^2 + (0.7-.5167)^2) / 2) = sqrt(0.030833) = 0.175594
    assert fa["std"] == pytest.approx(0.1755942, abs=1e-6)
    assert row["initial_accuracy"]["mean"] == pytest.approx(0.1)
    assert row["pass@4"]["mean"] == pytest.approx(0.75) and row["pass@4"]["std"] == pytest.approx(0.25)
    assert row["pass@1"]["mean"] == pytest.approx(0.5) and row["pass@1"]["std"] == pytest.approx(0.25)
    # grad-norm variance per seed: var(1..6) = 3.5, var(2,...) = 0, var(1,3,1,3,1,3) = 1.2
    assert row["gn_var"]["values"] == pytest.approx([3.5, 0.0, 1.2])
    assert row["gn_var"]["mean"] == pytest.approx(4.7 / 3)
    assert row["gn_late"]["values"] == pytest.approx([5.5, 2.0, 2.0])
    md = ex.markdown(ex.summarize(spec, jobs))
    assert "| grpo | 3/3 | 10.0 ± 10.0 | 51.7 ± 17.6 | 50.0 ± 25.0 | 75.0 ± 25.0 | 3 ± 1 (2/3) |" in md


def test_steps_to_target(tmp_path):
    assert ex.steps_to_target({0: 0.1, 10: 0.3, 20: 0.25, 30: 0.5}, 0.3) == 10
    assert ex.steps_to_target({0: 0.1, 10: 0.2}, 0.3) is None
    assert ex.steps_to_target({0: 0.3}, 0.3) == 0
    spec, jobs = _synthetic_runs(tmp_path)
    (row,) = ex.summarize(spec, jobs)["rows"]
    st = row["steps_to_target"]  # target 0.4: seed 0 at step 4, seed 1 never, seed 2 at step 2
    assert st["values"] == [4, None, 2] and st["reached"] == 2
    assert st["mean"] == 3 and st["std"] == pytest.approx(math.sqrt(2))


def test_staged_runs_concatenate_steps(tmp_path):
    spec = ex.load_spec(write_spec(tmp_path, seeds=[0]))
    (job,) = [j for j in ex.expand(spec) if j.entry == "sft_then_grpo"]
    for d, acc in zip(job.stage_dirs(), ([0.0, 0.2], [0.2, 0.6])):
        d.mkdir(parents=True)
        n = 2 if d.name.startswith("stage0") else 4
        (d / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": acc[0]}) + "\n"
                                         + json.dumps({"step": n, "eval/accuracy": acc[1], "route/sft": 1.0 if n == 2 else 0.0}) + "\n")
    s = ex.run_series(job)
    assert s["eval/accuracy"] == {0: 0.0, 2: 0.2, 6: 0.6}
    assert s["route/sft"] == {2: 1.0, 6: 0.0}


def test_plots_written(tmp_path):
    spec, jobs = _synthetic_runs(tmp_path)
    for j in jobs:  # add the other curves the panels read
        rows = [json.loads(l) for l in (j.run_dir / "metrics.jsonl").read_text().splitlines()]
        for r in rows[1:]:
            r.update({"reward/accuracy": 0.1 * j.seed, "train/entropy": 1.0, "rollout/response_length": 9.0,
                      "train/offline_data_ratio": 0.5, "route/sft": 0.5, "route/rl": 0.5, "route/drop": 0.0})
        (j.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = ex.write_results(spec, jobs)
    names = sorted(p.name for k, p in files.items() if k.startswith("plot"))
    assert names == sorted(["reward.png", "heldout_accuracy.png", "entropy.png", "response_length.png",
                            "offline_ratio.png", "routes.png", "grad_norm.png"])
    for k, p in files.items():
        assert p.stat().st_size > (10_000 if k.startswith("plot") else 200), p
        if k.startswith("plot"):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(files["json"].read_text())
    assert payload["rows"][0]["final_accuracy"]["mean"] == pytest.approx(statistics.fmean([0.5, 0.35, 0.7]))


def test_rolling_and_mean_curve():
    from posttrain.plotting import mean_curve, rolling_mean

    assert rolling_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert mean_curve([{1: 1.0, 2: 3.0}, {1: 3.0}]) == ([1, 2], [2.0, 3.0], [1.0, 3.0], [3.0, 3.0])


# --- the real thing, through the CLI -----------------------------------------------------------


def test_real_one_step_run_through_cli(tmp_path, capsys):
    """2 algorithms × 1 seed, 1 real training step each, then a second invocation that trains nothing."""
    path = write_spec(tmp_path, steps=1, seeds=[0], target_accuracy=0.5,
                      algorithms={"sft": {"algorithm": {"name": "sft"}}, "grpo": {"algorithm": {"name": "grpo"}}})
    assert main(["experiment", str(path)]) == 0
    out = tmp_path / "out"
    for algo in ("sft", "grpo"):
        run = out / "runs" / algo / "seed0"
        done = json.loads((run / "done.json").read_text())
        assert done["finals"] == [str(run / "checkpoints" / "step-000001")]
        assert (run / "checkpoints" / "step-000001" / "config.json").exists()
        rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1] and "eval/accuracy" in rows[1]
    payload = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["runs"]) for r in payload["rows"]] == [("sft", 1), ("grpo", 1)]
    assert payload["rows"][1]["steps_to_target"]["reached"] in (0, 1)
    assert (out / "plots" / "heldout_accuracy.png").stat().st_size > 10_000
    assert (out / "plots" / "reward.png").exists()  # GRPO has rollouts; SFT adds no line there
    capsys.readouterr()
    assert main(["experiment", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "[skip] sft/seed0: finished" in printed and "[skip] grpo/seed0: finished" in printed
    assert "[1/" not in printed  # nothing trained


def test_final_eval_hands_posttrain_eval_the_held_out_split(tmp_path, monkeypatch):
    """The held-out split becomes a benchmark file; run_eval gets the sampling settings; pass@k
    is read back from its results.json."""
    from posttrain import eval as ev
    from posttrain.eval.options import parse_overrides

    calls = []
    monkeypatch.setattr(run_lib, "train", _fake_train([]))

    def fake_run_eval(models, benchmarks, out_dir, overrides=(), **kw):
        calls.append((models, benchmarks, out_dir, list(overrides)))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "results.json").write_text(json.dumps({"results": {"m": {"heldout": {"pass@1": 0.25, "pass@4": 0.5, "avg@4": 0.25}}}}))
    monkeypatch.setattr(ev, "run_eval", fake_run_eval)
    spec = ex.load_spec(write_spec(tmp_path, seeds=[3], final_eval={"n": 4, "k": [1, 4], "temperature": 0.7, "max_problems": 3},
                                   algorithms={"grpo": {"algorithm": {"name": "grpo"}}}))
    (job,) = ex.expand(spec)
    held = ex.prepare_final_eval(spec, [job])
    assert ex.run_job(job, None, held[job.name])["ok"]
    ((models, benchmarks, out_dir, overrides),) = calls
    assert models == [str(job.run_dir / "checkpoints" / "step-000006")] and out_dir == job.run_dir / "final_eval"
    bench, yaml_path = ev.load_spec(benchmarks[0])
    assert (bench.name, bench.kind, bench.verifier) == ("heldout", "math", "exact")
    opts, per = parse_overrides(overrides, ["heldout"])
    assert (opts.n, opts.k, opts.temperature, opts.max_problems, opts.seed, opts.max_new_tokens) == (4, [1, 4], 0.7, 3, 3, 6)
    problems = ev.load_problems(ev.load_spec(benchmarks[0], opts.shared_overrides())[0], yaml_path)
    assert len(problems) == 3 and problems[0].text.endswith("=")  # the synthetic eval split's prompts
    assert ex.final_pass_at_k(job) == {"pass@1": 0.25, "pass@4": 0.5}


@pytest.mark.slow
def test_paper_claims_smoke(tmp_path):
    """What CI runs: the study's spec, 1 step per stage, 1 seed, every installed algorithm
    (an entry whose plugin is missing is skipped with a message)."""
    assert main(["experiment", str(ROOT / "experiments" / "paper_claims.yaml"), "--smoke", "--skip-missing",
                 "--out", str(tmp_path), "--workers", "2"]) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    have = set(installed_algorithms())
    expected = [e for e in ("sft", "grpo", "sft_then_grpo", "luffy", "srft", "hpt", "dypo", "gift_then_grpo")
                if set(e.split("_then_")) <= have]
    assert [r["variant"] for r in payload["rows"]] == expected
    assert all(r["runs"] == 1 and r["eval/pass@4"]["n"] == 1 for r in payload["rows"])  # held-out pass@k of every run
    assert json.loads((tmp_path / "base" / "done.json").read_text())["finals"][-1].endswith("step-000001")


def test_cli_reports_spec_errors(tmp_path, capsys):
    assert main(["experiment", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


def test_paper_claims_spec_resolves():
    """The study's spec: 8 algorithm entries × 3 seeds at one budget; every run config valid."""
    spec = ex.load_spec(ROOT / "experiments" / "paper_claims.yaml")
    assert list(spec.algorithms) == ["sft", "grpo", "sft_then_grpo", "luffy", "srft", "hpt", "dypo", "gift_then_grpo"]
    assert len(spec.seeds) >= 3
    jobs = ex.check_algorithms(spec, ex.expand(spec), skip_missing=True)
    ex.validate(spec, [ex.base_job(spec)] + jobs)
    assert all(sum(j.stage_steps) == spec.steps for j in jobs)
    assert {j.config["trainer"]["prompts_per_step"] for j in jobs} == {16}
    smoke = ex.load_spec(ROOT / "experiments" / "paper_claims.yaml", smoke=True)
    assert all(sum(j.stage_steps) == len(j.stage_steps) for j in ex.expand(smoke, smoke=True))
