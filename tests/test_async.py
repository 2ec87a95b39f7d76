"""Asynchronous rollouts (rollout.max_staleness): config, masked IS, staleness bound, determinism,
weight-sync verification, exact resume. The runs start a rollout worker process (spawn); every
test run closes it, also on failure (Engine.run's finally), and a leftover would fail
``test_no_worker_process_is_left_behind``."""

import multiprocessing
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain import functional as F
from posttrain.batching import build_train_batch, totals_of
from posttrain.config import ConfigError
from posttrain import hookimpl
from posttrain.logging import read_metrics
from posttrain.loss import micro_batch_loss
from posttrain.metrics import Metrics
from posttrain.plugins import make_plugin_manager
from posttrain.rollout.worker import RolloutWorker, WeightSyncError
from posttrain.train.async_loop import worker_device
from posttrain.run import load_config, resolve, train
from posttrain.testing import make_tiny_model, tiny_config, tiny_group, tiny_tokenizer
from posttrain.types import Route

ASYNC = {"rollout.max_staleness": 1, "rollout.is_cap": 2.0, "algorithm.entropy_coef": 0.01}
SKIP = ("time/", "perf/", "async/wait_s")  # wall-clock numbers differ between runs; nothing else may


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _params(path):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def _same_run(a_dir, b_dir, step):
    full, other = read_metrics(a_dir / "metrics.jsonl"), read_metrics(b_dir / "metrics.jsonl")
    assert [r["step"] for r in full] == [r["step"] for r in other]
    for a, b in zip(full, other):
        for k in a:
            if not k.startswith(SKIP):
                assert a[k] == b[k], (a["step"], k, a[k], b[k])
    name = f"checkpoints/step-{step:06d}"
    pa, pb = _params(a_dir / name), _params(b_dir / name)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    return full


class Recorder:
    """Records, for every group the trainer routes, its prompt and its members' policy versions."""

    def __init__(self):
        self.trained = []  # (step, uid, [policy_version of each sampled member])

    @hookimpl
    def route_group(self, group, step):
        self.trained.append((step, group.example.uid, [m.policy_version for m in group.members if not m.off_policy]))


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("over, message", [
    ({"rollout.max_staleness": 1}, "rollout.max_staleness: 1 trains on rollouts of older policies, which needs importance sampling"),
    ({"rollout.max_staleness": -1}, "rollout.max_staleness: must be >= 0"),
    ({"rollout.async_mode": "fre"}, "rollout.async_mode: 'fre' is not pipelined | free. Did you mean 'free'?"),
    ({"rollout.is_mask": [1.5, 2.0]}, "rollout.is_mask: must be [low, high] with 0 <= low < 1 < high"),
    ({"rollout.sync_every": 0}, "rollout.sync_every: must be >= 1"),
    ({"rollout.max_staleness": 2, "rollout.is_cap": 2.0, "rollout.sync_every": 2},
     "rollout.sync_every: 2 needs rollout.async_mode=free"),
    ({"rollout.max_staleness": 1, "rollout.is_cap": 2.0, "rollout.sync_every": 2, "rollout.async_mode": "free"},
     "sync_every <= max_staleness (1)"),
    ({"rollout.max_staleness": 1, "rollout.is_cap": 2.0, "rollout.engine": "vllm", "trainer.device": "cpu"},
     "rollout.engine: vllm with rollout.max_staleness: 1 runs vLLM in the rollout worker, which needs a GPU, and "
     "rollout.worker_device: auto puts the worker on the CPU here: set rollout.worker_device=cuda:N, or rollout.engine=hf."),
    ({"rollout.max_staleness": 1, "rollout.is_cap": 2.0, "rollout.engine": "vllm", "rollout.worker_device": "cpu"},
     "rollout.worker_device: cpu puts the worker on the CPU here"),
    ({"rollout.max_staleness": 1, "rollout.is_cap": 2.0, "rollout.engine": "sglang"},
     "rollout.max_staleness: 1 runs the rollout engine in a worker process, implemented for rollout.engine hf and vllm "
     "(got 'sglang'); set rollout.max_staleness=0 for it."),
    ({"rollout.max_staleness": 1, "rollout.is_cap": 2.0, "rollout.engine": "vllm", "rollout.tensor_parallel_size": 2},
     "the asynchronous rollout worker runs one vLLM engine on one GPU: set rollout.tensor_parallel_size=1."),
    ({"rollout.worker_threads": "0"}, "rollout.worker_threads: '0' is not auto or a positive integer"),
    ({"rollout.worker_device": "gpu"}, "rollout.worker_device: 'gpu' is not auto | cpu | cuda | cuda:N."),
    ({"rollout.max_staleness": 1, "rollout.is_cap": 2.0, "rollout.worker_device": "cuda:64"},
     "rollout.worker_device: cuda:64 is not available here"),
])
def test_async_config_mistakes_get_one_line(model_dir, tmp_path, over, message):
    with pytest.raises(ConfigError) as e:
        resolve(load_config(tiny_config(model_dir, tmp_path, overrides=over), base=None))
    assert any(message in p for p in e.value.problems), e.value.problems


def test_async_vllm_is_for_the_worker_and_the_trainer_keeps_hf():
    from types import SimpleNamespace as NS

    from posttrain.train.async_loop import trainer_engine

    assert trainer_engine(NS(max_staleness=1, engine="vllm")) == "hf"  # vLLM runs in the worker, once
    assert trainer_engine(NS(max_staleness=0, engine="vllm")) == "vllm"  # synchronous: in the trainer
    assert trainer_engine(NS(max_staleness=2, engine="hf")) == "hf"


def test_the_vllm_worker_sees_only_its_gpu(monkeypatch):
    from posttrain.rollout.worker import _only_gpu

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert _only_gpu("cuda:1") == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"  # the trainer's cuda:1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _only_gpu("cuda:2") == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _only_gpu("cuda") == "cuda:0" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_async_defaults_are_the_synchronous_loop(model_dir, tmp_path):
    run = resolve(load_config(tiny_config(model_dir, tmp_path), base=None)).run
    assert (run.rollout.max_staleness, run.rollout.async_mode, run.rollout.sync_every, run.rollout.is_mask) == (0, "pipelined", 1, None)


# --- masked importance sampling -------------------------------------------------------------------


def test_is_mask_drops_sampled_tokens_outside_the_band(model_dir):
    pm = make_plugin_manager("grpo")
    algo = pm.hook.algorithm_config()(clip_low=None, entropy_coef=0.0)  # pg = −A·ρ on kept tokens
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = tiny_group([1, 0, 0, 1], seed=2)
    batch = build_train_batch([g], [Route(rl=1.0, sft=1.0)], tiny_tokenizer().pad_token_id)
    batch.advantages = F.group_advantages(batch.rewards, batch.group_index, rows=batch.rl_weight > 0)
    batch = batch.with_(totals=totals_of(batch, max_len=16))
    with torch.no_grad():
        from posttrain.train.forward import policy_outputs
        logp = policy_outputs(model, batch, temperature=1.0, chunk=4).logprobs
    # The sampler's log-probs: 0.1 above the trainer's on even positions (w = 0.905, inside the band),
    # 1.0 above on odd ones (w = 0.368, outside).
    offset = torch.where(torch.arange(logp.shape[1]) % 2 == 0, 0.1, 1.0)
    batch.sampling_logprobs = torch.where(batch.off_policy[:, None], batch.sampling_logprobs, logp + offset)
    band = (0.8, 1.25)
    terms, stats = micro_batch_loss(pm.hook, algo, 0, model, batch, Metrics(), needs=pm.hook.requirements(config=algo),
                                    chunk=4, is_mask=band)
    rl = batch.response_mask & (batch.rl_weight > 0)[:, None]
    sampled = batch.response_mask & ~batch.off_policy[:, None]
    w = torch.exp(logp - batch.sampling_logprobs)
    inside = (w >= band[0]) & (w <= band[1])
    kept = rl & (inside | ~sampled)
    # By hand: −A on kept tokens, normalised by every RL token (masked tokens count, contribute 0).
    expected = float((-batch.advantages[:, None].expand_as(logp))[kept].sum() / rl.sum())
    pg = {t.name: float(t.value.detach()) for t in terms}["pg"]
    assert pg == pytest.approx(expected, rel=1e-5, abs=1e-7)
    masked = float((~inside & sampled).sum() / sampled.sum())
    assert masked == pytest.approx(float(sampled[:, 1::2].sum() / sampled.sum()))  # the odd positions
    assert 0.3 < masked < 0.7
    assert stats["train/is_masked"] == pytest.approx(masked, rel=1e-6)
    assert stats["train/logprob_gap"] == pytest.approx(float((logp - batch.sampling_logprobs).abs()[sampled].mean()), rel=1e-5)
    assert stats["train/is_weight_max"] == pytest.approx(float(w[sampled].max()), rel=1e-5)


# --- pipelined k = 1: the bound, determinism ------------------------------------------------------


def test_pipelined_k1_trains_only_rollouts_exactly_k_versions_old_and_reproduces(model_dir, tmp_path):
    rec_a, rec_b = Recorder(), Recorder()
    over = {**ASYNC, "save_every": 0}
    train(tiny_config(model_dir, tmp_path / "a", steps=4, overrides=over), base=None, plugins=[rec_a])
    train(tiny_config(model_dir, tmp_path / "b", steps=4, overrides=over), base=None, plugins=[rec_b])
    rows = _same_run(tmp_path / "a", tmp_path / "b", 4)  # seeded CPU run: bit for bit, whatever the timing
    assert rec_a.trained == rec_b.trained
    # Step 0 trains on rollouts of the initial weights (version 0); every later step t on version t − 1.
    for step, _, versions in rec_a.trained:
        assert versions and all(v == max(0, step - 1) for v in versions), (step, versions)
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    # Same weights on both sides: the worker's log-probs are the trainer's up to float rounding
    # (KV-cached decoding vs one forward pass); one version behind they differ visibly.
    assert rows[0]["train/logprob_gap"] < 1e-5
    assert all(r["train/logprob_gap"] > 1e-3 for r in rows[1:])
    assert all(r["async/generated_len_mean"] == r["rollout/response_length"] for r in rows)
    assert all(r["async/trained_len_mean"] == r["rollout/response_length"] for r in rows)  # nothing dropped


def test_a_trajectory_older_than_k_is_refused(model_dir, tmp_path):
    # A queued step whose rollouts are two versions old reaches a k = 1 trainer: the run stops.
    from posttrain.train import async_loop

    original = async_loop.AsyncRollouts._collect

    def stale(self, item):
        original(self, item)
        for i in item.todo:
            for t in item.groups[i].members:
                t.policy_version -= 2

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(async_loop.AsyncRollouts, "_collect", stale)
        with pytest.raises(RuntimeError, match=r"more than rollout.max_staleness=1 rollout steps old"):
            train(tiny_config(model_dir, tmp_path / "run", steps=3, overrides=ASYNC), base=None)


class OneMoreRound:
    """select_groups that asks for one more prompt in each step's first round (as DAPO's dynamic
    sampling does when too few groups are informative): the trainer samples it with its current weights."""

    @hookimpl
    def select_groups(self, groups, target):
        from posttrain.types import GroupSelection

        return GroupSelection(list(groups), more=1 if len(groups) == target else 0)


def test_members_the_trainer_samples_in_a_further_round_carry_the_current_version(model_dir, tmp_path):
    rec = Recorder()
    train(tiny_config(model_dir, tmp_path / "run", steps=3, overrides={**ASYNC, "save_every": 0}), base=None,
          plugins=[OneMoreRound(), rec])
    by_step = {}
    for step, _, versions in rec.trained:
        by_step.setdefault(step, []).append(versions)
    for step, groups in by_step.items():
        # the worker's groups were sampled one version back; the extra round's, by the trainer now
        assert groups[:-1] and all(v == [max(0, step - 1)] * len(v) for v in groups[:-1]), (step, groups)
        assert groups[-1] and set(groups[-1]) == {step}, (step, groups)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["plan/rounds"] for r in rows] == [2.0, 2.0, 2.0]
    assert all(r["async/trainer_sampled"] == pytest.approx(1 / (len(by_step[0]))) for r in rows)


# --- weight-sync verification ---------------------------------------------------------------------


def test_a_sync_that_changes_nothing_stops_the_run_with_one_line(model_dir, tmp_path):
    pushes = []

    def broken_copy(self, weights):  # the weights never reach the shared buffer (verl's lost LoRA adapter)
        pushes.append(1)
        if len(pushes) == 1:  # the first push (the initial weights) goes through
            with torch.no_grad():
                for k, buf in self.buffer.items():
                    buf.copy_(weights[k])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RolloutWorker, "_copy", broken_copy)
        with pytest.raises(WeightSyncError) as e:
            train(tiny_config(model_dir, tmp_path / "run", steps=4, overrides=ASYNC), base=None)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("rollout weight sync failed after pushing version 1: the sync changed nothing")
    assert len(pushes) >= 2


def test_a_working_sync_under_lora_is_verified_on_the_merged_weights(model_dir, tmp_path):
    over = {**ASYNC, "model.lora": {"rank": 4, "alpha": 8}}
    train(tiny_config(model_dir, tmp_path / "run", steps=3, overrides=over), base=None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["train/logprob_gap"] < 1e-5  # merged W + ΔW served as trained
    assert rows[1]["train/logprob_gap"] > 1e-3
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]


# --- exact resume -----------------------------------------------------------------------------------


def test_pipelined_resume_equals_the_uninterrupted_run(model_dir, tmp_path):
    over = {**ASYNC, "save_every": 2}
    train(tiny_config(model_dir, tmp_path / "full", steps=4, overrides=over), base=None)
    train(tiny_config(model_dir, tmp_path / "resumed", steps=2, overrides=over), base=None)
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert list(state["async"]["pending"]) == ["2"]  # step 2's rollouts, sampled by version 1, in the checkpoint
    assert all(m["policy_version"] == 1 for g in state["async"]["pending"]["2"]["groups"] for m in g["members"])
    train(tiny_config(model_dir, tmp_path / "resumed", steps=4, overrides=over), base=None)
    rows = _same_run(tmp_path / "full", tmp_path / "resumed", 4)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_free_mode_resume_trains_every_prompt_exactly_once(model_dir, tmp_path):
    over = {**ASYNC, "rollout.async_mode": "free", "rollout.max_staleness": 2, "save_every": 2}
    full, first, second = Recorder(), Recorder(), Recorder()
    train(tiny_config(model_dir, tmp_path / "full", steps=6, overrides=over), base=None, plugins=[full])
    train(tiny_config(model_dir, tmp_path / "resumed", steps=3, overrides=over), base=None, plugins=[first])
    train(tiny_config(model_dir, tmp_path / "resumed", steps=6, overrides=over), base=None, plugins=[second])
    uids = [uid for _, uid, _ in full.trained]
    assert len(uids) == 24 == len(set(uids))  # 6 steps × 4 prompts of 64: no prompt twice
    # Stopped after step 3 (its final checkpoint holds steps 3 and 4, sampled ahead), resumed to 6.
    resumed = [uid for _, uid, _ in first.trained + second.trained]
    assert sorted(resumed) == sorted(uids)
    assert second.trained[0][0] == 3
    for step, _, versions in full.trained + second.trained:
        assert all(step - 2 <= v <= step for v in versions), (step, versions)  # within k = 2, never newer


def test_the_worker_device_is_the_trainers_unless_set():
    assert worker_device("auto", torch.device("cpu")) == "cpu"
    assert worker_device("auto", torch.device("cuda", 1)) == "cuda:1"  # a GPU run samples on its own GPU
    assert worker_device("cpu", torch.device("cuda", 0)) == "cpu"
    assert worker_device("cuda:1", torch.device("cuda", 0)) == "cuda:1"
    assert worker_device("cuda", torch.device("cpu")) == "cuda:0"  # LOCAL_RANK's GPU, 0 in one process


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_the_worker_serves_the_pushed_weights_on_its_device(model_dir, device):
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    w = RolloutWorker(model, tiny_tokenizer(), mode="pipelined", threads=1, seed=0, batch_size=8, device=device)
    try:
        w.push(model, 0)
        while w._unacked:  # the load's answer; ProbeCheck raises if the probe log-probs differ
            w._receive(block=True)
        assert w.served_device == {"cpu": "cpu", "cuda": "cuda:0"}[device]
        assert w.check.last_served is not None
        assert sorted(w.rng()) == (["cpu", "cuda"] if device == "cuda" else ["cpu"])  # what a checkpoint keeps
    finally:
        w.close()


def test_the_worker_decodes_compiled_when_rollout_compile_is_on(model_dir):
    # rollout.compile reaches the worker's engine: it reports the compiled step ran, with the
    # greedy tokens of the eager worker.
    from posttrain.rollout import SamplingParams
    from posttrain.types import RolloutRequest

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = tiny_tokenizer()
    prompts = [tok("12+7=", add_special_tokens=False).input_ids, tok("3*4=", add_special_tokens=False).input_ids]
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    served = {}
    for compile in (False, True):
        w = RolloutWorker(model, tok, mode="pipelined", threads=1, seed=0, batch_size=8, compile=compile)
        try:
            w.push(model, 0)
            _, out, _ = w.result(w.submit(prompts, [RolloutRequest(n=2)] * 2, params, min_version=0))
            served[compile] = (w.served_compiled, [[t.response_ids for t in g] for g in out])
        finally:
            w.close()
    assert served[False][0] is False and served[True][0] is True
    assert served[True][1] == served[False][1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_the_worker_rng_state_round_trips_and_reads_old_checkpoints(device):
    from posttrain.rollout.worker import _rng_state, _set_rng_state

    state = _rng_state(device)
    assert sorted(state) == (["cpu", "cuda"] if device != "cpu" else ["cpu"])
    drawn = torch.rand(4, device=device)
    _set_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), drawn)  # the draw that sampled the tokens, again
    _set_rng_state(state["cpu"], device)  # a checkpoint of the earlier format: the CPU tensor alone
    first = torch.rand(4)
    _set_rng_state(state["cpu"], device)
    assert torch.equal(torch.rand(4), first)


def test_no_worker_process_is_left_behind():
    assert [p for p in multiprocessing.active_children() if p.name == "posttrain-rollout-worker"] == []


def test_the_worker_does_not_outlive_a_killed_trainer(model_dir, tmp_path):
    # The trainer is SIGKILLed (no finally runs): its worker notices and exits by itself.
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\n"
        "from transformers import AutoModelForCausalLM\n"
        "from posttrain.rollout.worker import RolloutWorker\n"
        "from posttrain.tiny import tiny_tokenizer\n"
        "if __name__ == '__main__':\n"
        f"    model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})\n"
        "    w = RolloutWorker(model, tiny_tokenizer(), mode='pipelined', threads=1, seed=0, batch_size=8)\n"
        "    w.push(model, 0)\n"
        "    w._receive(block=True)\n"  # the load's answer: the worker is up
        "    print(w.proc.pid, flush=True)\n"
        "    time.sleep(600)\n")
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(trainer.stdout.readline())
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"rollout worker {pid} outlived its killed trainer by 120 s")
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_a_killed_async_run_loses_only_the_steps_since_its_last_checkpoint(model_dir, tmp_path):
    # SIGKILL after step 4 was logged, before its checkpoint: no finally, no signal handler runs.
    # resume: auto continues from step 3's checkpoint (with the rollouts it had sampled ahead),
    # and the run equals the uninterrupted one bit for bit.
    import json
    import subprocess
    import sys

    over = {**ASYNC, "save_every": 1}
    train(tiny_config(model_dir, tmp_path / "full", steps=6, overrides=over), base=None)
    killed = tmp_path / "killed"
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_config(model_dir, killed, steps=6, overrides=over)))
    script = tmp_path / "trainer.py"
    script.write_text(
        "import json, os, signal, sys\n"
        "from posttrain import hookimpl\n"
        "from posttrain.run import train\n"
        "class Kill:\n"
        "    @hookimpl\n"
        "    def on_step_end(self, step):\n"
        "        if step == 4:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "if __name__ == '__main__':\n"
        "    train(json.load(open(sys.argv[1])), base=None, plugins=[Kill()])\n")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "cfg.json")], capture_output=True, text=True, timeout=900)
    assert r.returncode == -9, r.stderr[-2000:]
    assert max(p.name for p in (killed / "checkpoints").iterdir()) == "step-000003"  # the newest one
    assert [row["step"] for row in read_metrics(killed / "metrics.jsonl")] == [1, 2, 3, 4]  # step 4: lost work
    train(tiny_config(model_dir, killed, steps=6, overrides=over), base=None)
    rows = _same_run(tmp_path / "full", killed, 6)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
