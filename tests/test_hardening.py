"""Hardening (issue 19): nothing but tensors is unpickled from a checkpoint, a user's mistake is
one line (exit 2) checked before the model loads, and no failure is silent."""

import os
import pickle
import types

import pytest
import torch
import yaml

from posttrain import checkpoint as ckpt
from posttrain import hookimpl
from posttrain.cli import main
from posttrain.run import train
from posttrain.testing import make_tiny_model, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _cli(capsys, cfg: dict, tmp_path, *overrides: str) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["train", str(path), *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # progress bars share stderr; the error is the first line starting "error:" and what follows it
    lines = err.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), len(lines))
    return code, lines[start:]


# --- 1. a checkpoint cannot run code -------------------------------------------------------------


class _Planted:
    """Unpickling this creates a marker file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_planted_pickle_in_rng_pt_is_refused_and_never_runs(model_dir, tmp_path, capsys):
    cfg = tiny_config(model_dir, tmp_path / "run", steps=1, overrides={"rollout.n": 2})
    train(cfg, base=None)
    rng = tmp_path / "run" / "checkpoints" / "step-000001" / ckpt.RNG_STATE
    marker = tmp_path / "pwned"
    torch.save({"python": _Planted(marker)}, rng)  # what torch.save writes: the old torch.load ran it
    cfg["trainer"]["steps"] = 2
    try:
        code, err = _cli(capsys, cfg, tmp_path)  # resume: auto finds step 1
    finally:
        assert not marker.exists(), "loading the checkpoint ran the planted code"
    assert code == 2
    assert err == [
        f"error: {rng}: refused to load: it holds GLOBAL os.makedirs besides tensors and plain values, "
        "and unpickling it could run code; delete this checkpoint directory or set resume=never"]


def test_a_torch_saved_object_is_refused_too(tmp_path):
    torch.save({"x": _Planted(tmp_path / "pwned")}, tmp_path / "state.pt")
    with pytest.raises(ckpt.CheckpointError, match="GLOBAL os.makedirs"):
        ckpt.safe_load(tmp_path / "state.pt")
    assert not (tmp_path / "pwned").exists()


def test_rng_file_is_plain_and_older_numpy_array_files_still_load(tmp_path):
    import numpy as np

    np.random.seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "new.pt")
    torch.save({**ckpt.rng_state(), "numpy": np.random.get_state()}, tmp_path / "old.pt")  # before the fix
    want = np.random.rand(3)
    for name in ("new.pt", "old.pt"):
        state = ckpt.safe_load(tmp_path / name)
        ckpt.set_rng_state(state)
        assert np.array_equal(np.random.rand(3), want)
    assert isinstance(ckpt.safe_load(tmp_path / "new.pt")["numpy"][1], list)


def test_a_planted_pickle_of_any_protocol_is_refused(tmp_path):
    (tmp_path / "rng.pt").write_bytes(pickle.dumps({"python": _Planted(tmp_path / "pwned")}))  # protocol 4+
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        ckpt.safe_load(tmp_path / "rng.pt")
    assert not (tmp_path / "pwned").exists()


# --- 6. every numeric field is range-checked before the model loads -------------------------------


def test_bad_values_are_one_line_each_exit_2(model_dir, tmp_path, capsys, monkeypatch):
    import transformers

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the config was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    cfg = tiny_config(model_dir, tmp_path / "run", steps=1)
    code, err = _cli(capsys, cfg, tmp_path, "trainer.lr=-1", "rollout.max_new_tokens=0", "verifier.timeout_s=0",
                     "verifier.workers=0", "verifier.name=maht", "rollout.temperature=0", "trainer.max_skipped_steps=0",
                     "eval.n=0", "trainer.betas=[0.9,1.5]", "verifier.on_timeout=drop", "data.overlong_prompt=cut")
    assert code == 2
    assert err[1:] == [
        "  - rollout.max_new_tokens: must be >= 1, got 0.",
        "  - verifier.timeout_s: must be > 0, got 0.0.",
        "  - verifier.workers: must be >= 1, got 0.",
        "  - trainer.lr: must be > 0, got -1.0.",
        "  - trainer.max_skipped_steps: must be >= 1, got 0.",
        "  - eval.n: must be >= 1, got 0.",
        "  - rollout.temperature: must be > 0 for training, got 0.0; greedy decoding is for evaluation (eval.temperature=0).",
        "  - trainer.betas: must be two numbers in [0, 1), got [0.9, 1.5].",
        "  - data.overlong_prompt: 'cut' is not error | truncate_left | skip.",
        "  - verifier.on_timeout: 'drop' is not drop_member | drop_group | zero.",
        "  - verifier.name: 'maht' is not registered; use one of choice | exact | math. Did you mean 'math'?",
    ]
    assert err[0].startswith("error: 11 problem(s) in ")


@pytest.mark.parametrize("override, line", [
    ("trainer.lr=-1e-6", "trainer.lr: must be > 0, got -1e-06."),
    ("trainer.lr=0", "trainer.lr: must be > 0, got 0.0."),
    ("trainer.max_sampling_rounds=0", "trainer.max_sampling_rounds: must be >= 1, got 0."),
    ("verifier.step_budget_s=0", "verifier.step_budget_s: must be > 0 (or null), got 0.0."),
    ("trainer.grad_clip=0", "trainer.grad_clip: must be > 0 (or null), got 0.0."),
    ("trainer.min_lr_ratio=2", "trainer.min_lr_ratio: must be in [0, 1], got 2.0."),
    ("rollout.engine=vlm", "rollout.engine: 'vlm' is not registered; use one of hf | vllm. Did you mean 'vllm'?"),
    ("trainer.backend=ds", "trainer.backend: 'ds' is not registered; use one of deepspeed | torch."),
    ("model.dtype=fp16", "model.dtype: 'fp16' is not float32 | bfloat16 | float16."),
])
def test_one_bad_value_is_one_line(model_dir, tmp_path, override, line):
    from posttrain.config import ConfigError
    from posttrain.run import load_config, resolve_stages

    with pytest.raises(ConfigError) as e:
        resolve_stages(load_config(tiny_config(model_dir, tmp_path / "run"), [override], base=None))
    assert e.value.problems == [line]


# --- 7. plugin errors name the plugin, the hook and the config key --------------------------------


class _Typo:
    @hookimpl
    def compute_advantag(self, batch, config):
        return None


def test_a_misspelt_hook_is_named_with_the_closest_real_one(model_dir, tmp_path):
    from posttrain.config import ConfigError
    from posttrain.plugins import PluginError, overridden_hooks
    from posttrain.run import load_config, resolve_stages

    # `posttrain plugins` lists each plugin's hooks through overridden_hooks: a typo is its error
    module = types.ModuleType("my_plugin")
    module.compute_advantag = hookimpl(lambda batch, config: None)
    with pytest.raises(PluginError, match=r"^my_plugin: unknown hook 'compute_advantag' \(no such hook in posttrain.hookspecs\)\. "
                                          r"Did you mean 'compute_advantage'\?$"):
        overridden_hooks(module)
    with pytest.raises(ConfigError) as e:
        resolve_stages(load_config(tiny_config(model_dir, tmp_path / "run"), base=None), plugins=[_Typo()])
    assert e.value.problems == ["plugins: inline:0:_Typo: unknown hook 'compute_advantag' (no such hook in "
                                "posttrain.hookspecs). Did you mean 'compute_advantage'?"]


def test_a_missing_extension_is_reported_under_extensions(model_dir, tmp_path):
    from posttrain.config import ConfigError
    from posttrain.run import load_config, resolve_stages

    with pytest.raises(ConfigError) as e:
        resolve_stages(load_config(tiny_config(model_dir, tmp_path / "run", overrides={"extensions": ["nope"]}), base=None))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("extensions: Unknown extension 'nope'.")


class _Exploding:
    @hookimpl
    def compute_advantage(self, batch, config):
        raise ValueError("boom at the advantage")


def test_a_hook_that_raises_names_its_plugin_and_hook_traceback_below(model_dir, tmp_path, capsys, monkeypatch):
    from posttrain import plugins

    real = plugins.load_plugin_module
    monkeypatch.setattr(plugins, "load_plugin_module",
                        lambda name, group=plugins.ALGORITHMS: _Exploding() if name == "exploding" else real(name, group))
    cfg = tiny_config(model_dir, tmp_path / "run", steps=1, overrides={"extensions": ["exploding"], "rollout.n": 2})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    first = next(i for i, line in enumerate(err) if line.startswith("error:"))
    assert err[first] == 'error: hook compute_advantage of extension plugin "exploding" raised ValueError: boom at the advantage'
    assert err[first + 2] == "Traceback (most recent call last):"
    assert err[-2:] == ["ValueError: boom at the advantage", '(in hook compute_advantage of extension plugin "exploding")']


def test_a_raising_hook_keeps_its_exception_type(model_dir, tmp_path, monkeypatch):
    from posttrain import plugins

    real = plugins.load_plugin_module
    monkeypatch.setattr(plugins, "load_plugin_module",
                        lambda name, group=plugins.ALGORITHMS: _Exploding() if name == "exploding" else real(name, group))
    cfg = tiny_config(model_dir, tmp_path / "run", steps=1, overrides={"extensions": ["exploding"], "rollout.n": 2})
    with pytest.raises(ValueError, match="^boom at the advantage") as e:  # callers (and torch) still catch by type
        train(cfg, base=None)
    assert e.value.posttrain_hook == 'hook compute_advantage of extension plugin "exploding" raised ValueError: boom at the advantage'


# --- 9. non-finite losses are skipped, counted, and stop the run -----------------------------------


def test_non_finite_weights_are_refused_before_training(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    model.save_pretrained(bad)
    (bad / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    for f in model_dir.glob("*token*"):
        (bad / f.name).write_bytes(f.read_bytes())
    code, err = _cli(capsys, tiny_config(bad, tmp_path / "run", steps=1, overrides={"algorithm.name": "sft"}), tmp_path)
    assert code == 2
    assert err == [f"error: 1 problem(s) in config:", f"  - model.path: {bad} has non-finite (NaN/inf) weights in 1 tensor(s), "
                   "first 'model.norm.weight'; use an intact checkpoint"]
    assert not (tmp_path / "run" / "checkpoints").exists()


class _NaNAdvantage:
    """Every row's advantage is NaN, so every step's loss and gradient are."""

    @hookimpl(tryfirst=True)
    def compute_advantage(self, batch, config):
        return torch.full_like(batch.rewards, float("nan"))


def test_a_run_whose_every_step_is_skipped_fails(model_dir, tmp_path):
    from posttrain.guards import NonFiniteError
    from posttrain.logging import read_metrics

    cfg = tiny_config(model_dir, tmp_path / "run", steps=2, overrides={"rollout.n": 2})
    with pytest.raises(NonFiniteError, match=r"^all 2 optimizer step\(s\) of this run had a non-finite loss or gradient "
                                             r"and were skipped: nothing was trained$"):
        train(cfg, plugins=[_NaNAdvantage()], base=None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["train/nonfinite_skipped"], r["train/skipped_steps"]) for r in rows] == [(1.0, 1.0), (1.0, 1.0)]
    assert not (tmp_path / "run" / "checkpoints").exists()  # no "final checkpoint" of an untrained model


def test_consecutive_skipped_steps_stop_the_run(model_dir, tmp_path):
    from posttrain.guards import NonFiniteError
    from posttrain.logging import read_metrics

    cfg = tiny_config(model_dir, tmp_path / "run", steps=5, overrides={"rollout.n": 2, "trainer.max_skipped_steps": 2})
    with pytest.raises(NonFiniteError, match=r"^2 consecutive optimizer steps had a non-finite loss or gradient \(last loss nan"):
        train(cfg, plugins=[_NaNAdvantage()], base=None)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]  # stopped during step 2


def test_guard_counts_only_non_finite_skips():
    from posttrain.guards import NonFiniteError, NonFiniteGuard
    from posttrain.metrics import Metrics

    g = NonFiniteGuard(2, torch.nn.Linear(2, 2), "m")
    m = Metrics()
    g.after_update(float("nan"), True, 0.5, m)
    g.after_update(120.0, True, 0.5, m)  # skipped above skip_grad_norm_above: finite, resets the count
    g.after_update(1.0, True, float("inf"), m)
    g.after_update(1.0, False, 0.3, m)
    assert m.summary()["train/nonfinite_skipped"] == 2.0 and g.consecutive == 0
    g.finish()  # some steps trained
    with pytest.raises(NonFiniteError, match="^2 consecutive"):
        g.after_update(float("nan"), True, 0.1, m), g.after_update(float("nan"), True, 0.1, m)


# --- 10. a verifier timeout is not a wrong answer ---------------------------------------------------


def _timed_out_groups():
    from posttrain.testing import tiny_group

    a = tiny_group([1.0, 0.0, 0.0], uid="a")
    a.members[2].verify_status = "timeout"
    b = tiny_group([1.0, 0.0], uid="b")
    c = tiny_group([0.0, 0.0], uid="c")
    for t in c.members:
        t.verify_status = "timeout"
    return [a, b, c]


@pytest.mark.parametrize("policy, kept, rewards_a, dropped", [
    ("zero", ["a", "b", "c"], [1.0, 0.0, 0.0], (0, 0)),
    ("drop_member", ["a", "b"], [1.0, 0.0], (3, 1)),  # c lost every sampled answer: the group goes
    ("drop_group", ["b"], None, (0, 2)),
])
def test_timeout_policy(policy, kept, rewards_a, dropped):
    from posttrain import functional as F
    from posttrain.guards import apply_timeout_policy
    from posttrain.metrics import Metrics

    m = Metrics()
    groups = apply_timeout_policy(_timed_out_groups(), policy, m)
    assert [g.example.uid for g in groups] == kept
    if rewards_a is not None:
        assert groups[0].rewards.tolist() == rewards_a
        adv = F.group_advantages(groups[0].rewards, torch.zeros(len(rewards_a), dtype=torch.long))
        # drop_member: the correct answer's advantage against one wrong answer, (1 − 0.5)/std([1, 0]) = 0.7071;
        # zero: the timeout counts as wrong, (1 − 1/3)/std([1, 0, 0]) = 1.1547
        assert adv[0].item() == pytest.approx(0.70710 if len(rewards_a) == 2 else 1.15470, abs=1e-4)
    if policy != "zero":
        s = m.summary()
        assert (s["verify/dropped_members"], s["verify/dropped_groups"]) == dropped


def test_step_budget_times_out_what_is_left():
    import math
    import operator
    import time
    from functools import partial

    from posttrain.verify import WorkerPool

    with WorkerPool(operator.methodcaller("__call__"), workers=2, timeout_s=120.0) as pool:
        pool.map([partial(math.sqrt, 1)] * 2)  # both workers up
        out = pool.map([partial(math.sqrt, 1), partial(math.sqrt, 4), partial(time.sleep, 120), partial(time.sleep, 120),
                        partial(math.sqrt, 9)], budget_s=2.0)
        # the two hangs hold both workers until the budget ends (not timeout_s = 120 s); sqrt(9) never starts
        assert [o.status for o in out] == ["ok", "ok", "timeout", "timeout", "timeout"]
        assert [o.value for o in out[:2]] == [1.0, 2.0]
        assert [o.status for o in pool.map([partial(math.sqrt, 16)])] == ["ok"]  # replaced workers serve the next step


def test_every_answer_timing_out_trains_nothing_by_default(model_dir, tmp_path):
    from posttrain.logging import read_metrics

    over = {"verifier.timeout_s": 0.001, "verifier.workers": 1, "rollout.n": 2}
    train(tiny_config(model_dir, tmp_path / "run", steps=1, overrides=over), base=None)
    r = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert r["verify/timeouts"] == 8 and r["verify/dropped_members"] == 8 and r["verify/dropped_groups"] == 4
    assert r["train/empty_batch"] == 1.0


# --- 2. reused generations are trusted only when unchanged ----------------------------------------


def _record(fp="f1", reward=0.0):
    return {"uid": "u", "fingerprint": fp, "prompt": "1+1=", "gold": "2",
            "samples": [{"text": "3", "reward": reward, "status": "ok", "answer": "3", "length": 2, "finished": True}]}


def test_generation_store_rejects_edited_and_malformed_records(tmp_path):
    import json

    from posttrain.eval.generations import GenerationStore, checksum

    path = tmp_path / "g.jsonl"
    with GenerationStore(path) as s:
        s.add(_record("f1"))
        s.add(_record("f2"))
        s.add(_record("f3"))
    with GenerationStore(path) as s:
        assert s.rejected == 0 and s.get("f1")["samples"][0]["reward"] == 0.0
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    recs[0]["samples"][0]["reward"] = 1.0  # edited: checksum no longer matches
    recs[1]["samples"][0]["reward"] = "1.0"  # a string reward, checksum recomputed to match
    recs[1]["checksum"] = checksum(recs[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with GenerationStore(path) as s:
        assert s.rejected == 2 and s.get("f1") is None and s.get("f2") is None and s.get("f3") is not None
    assert [json.loads(line)["fingerprint"] for line in path.read_text().splitlines()] == ["f3"]


def test_eval_regenerates_edited_rewards(model_dir, tmp_path):
    import json

    from posttrain.eval import run_eval

    out = tmp_path / "out"
    args = dict(overrides=["n=1", "max_new_tokens=4", "max_problems=2", "verifier.workers=1", "progress=false"])
    first = run_eval([str(model_dir)], ["sample_math"], out, **args)
    gen = out / "generations" / "m" / "sample_math.jsonl"
    recs = [json.loads(line) for line in gen.read_text().splitlines()]
    assert first["results"]["m"]["sample_math"]["avg@1"] == 0.0  # a random tiny model solves nothing
    for r in recs:
        for smp in r["samples"]:
            smp["reward"] = 1.0
    recs[1]["samples"][0]["reward"] = "yes"
    gen.write_text("".join(json.dumps(r) + "\n" for r in recs))
    again = run_eval([str(model_dir)], ["sample_math"], out, **args)
    assert again["generated"]["m"]["sample_math"] == 2  # neither edited record was reused
    assert again["results"] == first["results"]


# --- 3. the tiny: base model is written atomically ---------------------------------------------------


def test_a_torn_tiny_base_model_is_rebuilt(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from posttrain import tiny
    from posttrain.run import materialize_model

    torn = tmp_path / "base-model"
    torn.mkdir()
    (torn / "config.json").write_text("{}")  # killed after the first file: used to be taken as built
    path = materialize_model("tiny:hidden=32,layers=1", tmp_path)
    assert path == str(torn) and ckpt.is_complete(torn)
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 32

    def killed(tmp, **kw):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a kill during the write

    monkeypatch.setattr(tiny, "make_tiny_model", killed)
    with pytest.raises(KeyboardInterrupt):
        materialize_model("tiny:hidden=32,layers=1", tmp_path / "fresh")
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == []  # nothing half-written stays in view
    monkeypatch.undo()
    assert materialize_model("tiny:hidden=32,layers=1", tmp_path) == path  # complete: reused as is


# --- 4. a JSONL line that is not UTF-8 -----------------------------------------------------------------


def test_a_non_utf8_jsonl_line_is_named(tmp_path):
    from posttrain.data import DataError, load_examples

    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n' + '{"prompt": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_examples(str(path))
    assert str(e.value) == "train.jsonl:2: not UTF-8 (byte 0xe9 at column 16); convert the file to UTF-8"


# --- 8. a prompt longer than the model's context ----------------------------------------------------


def _long_prompt_data(tmp_path):
    import json

    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+" * 240 + "1=", "answer": "241"}]  # 483 characters
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("policy", ["error", "truncate_left", "skip"])
def test_overlong_prompt_policy(model_dir, tmp_path, policy):
    from posttrain.data import DataError
    from posttrain.logging import read_metrics

    # the tiny model has 512 positions; 483 prompt characters templated are 489 tokens, and 40 new tokens make 529
    over = {"data.train": _long_prompt_data(tmp_path), "rollout.n": 2, "rollout.max_new_tokens": 40,
            "trainer.prompts_per_step": 2, "data.overlong_prompt": policy, "data.demo_keys": []}
    cfg = tiny_config(model_dir, tmp_path / "run", steps=1, overrides=over)
    if policy == "error":
        with pytest.raises(DataError) as e:
            train(cfg, base=None)
        assert str(e.value) == ("train.jsonl:2: field 'prompt' is 489 tokens after templating; with rollout.max_new_tokens=40 "
                                "the model's 512 positions leave 472. Shorten it, lower rollout.max_new_tokens, or set "
                                "data.overlong_prompt=truncate_left | skip")
        return
    train(cfg, base=None)
    r = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert r["data/overlong_prompts"] == 1
    assert r["train/rows"] == (4 if policy == "truncate_left" else 2)  # skip: only the short prompt's 2 rollouts


def test_prompt_fit_truncates_to_the_room_left():
    from types import SimpleNamespace as NS

    from posttrain.guards import PromptFit
    from posttrain.metrics import Metrics

    cfg = NS(data=NS(overlong_prompt="truncate_left", max_prompt_tokens=1000), rollout=NS(max_new_tokens=3))
    fit = PromptFit(cfg, NS(max_position_embeddings=8))
    assert fit(list(range(5)), "a") == [0, 1, 2, 3, 4]  # 5 + 3 = 8 fits
    assert fit(list(range(7)), "b") == [2, 3, 4, 5, 6]  # the last 5
    assert PromptFit(cfg, NS(max_position_embeddings=8), rollouts=False)(list(range(7)), "c") == list(range(7))
    m = Metrics()
    groups = [NS(example=NS(uid=u)) for u in "abc"]
    assert fit.drop_skipped(groups, m) == groups and m.summary()["data/overlong_prompts"] == 1


def test_no_room_for_a_prompt_is_a_config_error():
    from types import SimpleNamespace as NS

    from posttrain.config import ConfigError
    from posttrain.guards import PromptFit

    cfg = NS(data=NS(overlong_prompt="error", max_prompt_tokens=1024), rollout=NS(max_new_tokens=8192))
    with pytest.raises(ConfigError) as e:  # e.g. stock Qwen2.5-Math-7B (4096 positions) with the papers' 8192
        PromptFit(cfg, NS(max_position_embeddings=4096))
    assert e.value.problems == ["rollout.max_new_tokens: 8192 leaves no room for a prompt in the model's 4096 positions "
                                "(max_position_embeddings); lower it or use a model with a longer context"]
