"""The deepspeed backend on CPU: 2 processes under torchrun (gloo), ZeRO-2 and ZeRO-3, against the
single-process torch backend on the same data.

HPT on a random tiny model routes every prompt to SFT on its demonstration (no rollout is ever
correct), so the rows a step trains on depend only on the prompts drawn, not on what each rank
sampled: the 1-process and 2-process losses must agree to float tolerance, step 2 included (it
runs on the weights step 1 produced), and so must the saved weights.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

pytest.importorskip("deepspeed")

from posttrain.logging import read_metrics  # noqa: E402
from posttrain.run import train  # noqa: E402
from posttrain.testing import make_tiny_model, tiny_config  # noqa: E402

STEPS = 2
# Per step: 4 prompts, one SFT row each of ~30-45 tokens; micro-batches of at most 64 tokens hold one
# or two rows, so gradient accumulation is exercised, and at step 2 one rank has 2 micro-batches
# and the other 1 (it runs a zero-loss pass to keep ZeRO's collectives in step).
# logprob_chunk 4: a row's log-probs take several LM-head chunks, a number that differs between
# ranks (ZeRO-3 must still gather the head the same number of times on each).
OVERRIDES = {"rollout.n": 2, "rollout.max_new_tokens": 8, "verifier.name": "exact",
             "trainer.micro_batch_tokens": 64, "trainer.lr": 1e-2, "trainer.logprob_chunk": 4}
COMPARED = ("loss/total", "loss/sft", "loss/entropy", "train/grad_norm", "train/rows", "route/sft")
# Greedy held-out evaluation before and after training, 5 prompts: 2 processes split them 3 + 2
# (the second rank pads with a copy, so both make the same generate calls, as ZeRO-3 requires).
EVAL = {"data.eval": "synthetic:arithmetic?n=5&seed=7", "eval.max_new_tokens": 12}
EVAL_KEYS = ("eval/accuracy", "eval/pass@1", "eval/response_length")


def _steps(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["step"] > 0]  # step 0 holds the evaluation before training


def _assert_same_steps(ref: list[dict], got: list[dict], keys=("loss/total", "train/grad_norm", "train/rows")) -> None:
    """Per-step metrics of two runs agree to float tolerance (summation order differs by rank)."""
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    final, = train(tiny_config(model_dir, run, algorithm="hpt", steps=STEPS, overrides={**OVERRIDES, **EVAL}), base=None)
    return read_metrics(run / "metrics.jsonl"), final


@pytest.fixture(scope="module")
def zero3_json(tmp_path_factory):
    """ZeRO-3 that partitions every parameter. DeepSpeed's default keeps parameters under 1e5
    elements whole on every rank, which is all of the tiny model's: without this, ZeRO-3 on it
    would never gather a parameter, and the gathers are what must line up across ranks."""
    path = tmp_path_factory.mktemp("ds") / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg: dict, tmp_path, *overrides: str, timeout: float = 150) -> subprocess.CompletedProcess:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "posttrain.cli", "train", str(path), *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"torchrun {' '.join(overrides)}: {time.perf_counter() - t:.1f} s")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero_matches_single_process(stage, model_dir, single, zero3_json, tmp_path):
    ref_rows, ref_final = single
    cfg = tiny_config(model_dir, tmp_path / "run", algorithm="hpt", steps=STEPS, overrides={**OVERRIDES, **EVAL})
    partitioned = [f"trainer.deepspeed_config={zero3_json}"] if stage == 3 else []
    _torchrun(cfg, tmp_path, "trainer.backend=deepspeed", f"trainer.zero_stage={stage}", *partitioned)

    all_rows = read_metrics(tmp_path / "run" / "metrics.jsonl")  # written by rank 0 only: one row per step
    assert [r["step"] for r in all_rows] == list(range(0, STEPS + 1))
    # Each rank evaluated its share; the gathered numbers are the single process's.
    for ref, got in ((ref_rows[0], all_rows[0]), (ref_rows[-1], all_rows[-1])):
        assert {k: got[k] for k in EVAL_KEYS} == pytest.approx({k: ref[k] for k in EVAL_KEYS}), got["step"]
    assert all_rows[0]["eval/response_length"] > 1
    rows = _steps(all_rows)
    assert all(r["route/sft"] == 1.0 and "loss/pg" not in r for r in _steps(ref_rows))  # the premise: SFT rows only
    _assert_same_steps(_steps(ref_rows), rows, COMPARED)
    print(f"ZeRO-{stage} losses", [(r["loss/total"], g["loss/total"]) for r, g in zip(_steps(ref_rows), rows)])

    # The checkpoint is consolidated HF weights (ZeRO-3: gathered from the partitions) and equals
    # the single-process result.
    final = tmp_path / "run" / "checkpoints" / f"step-{STEPS:06d}"
    got = AutoModelForCausalLM.from_pretrained(final).state_dict()
    ref = AutoModelForCausalLM.from_pretrained(ref_final).state_dict()
    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert got.keys() == ref.keys()
    worst = {k: float((got[k] - ref[k]).abs().max()) for k in ref}
    # Adam divides by sqrt(v): float noise in near-zero gradient entries moves a weight by ~1e-5 (the
    # step itself moves weights by lr = 1e-2), so 1e-4 is 1% of one update.
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:4]
    assert any(not torch.equal(got[k], start[k]) for k in ref)  # it trained
    state = torch.load(final / "trainer_state.pt", weights_only=False)
    assert state["step"] == STEPS and state["backend"]["scheduler"]["last_epoch"] == STEPS


@pytest.mark.parametrize("algorithm", ["gift", "dypo"])
def test_two_process_zero3_with_a_partitioned_reference_model(algorithm, model_dir, zero3_json, tmp_path):
    """The frozen reference model under ZeRO-3 inference: GIFT reads its full-vocabulary
    distribution chunk by chunk (also when backward recomputes a chunk), DYPO its token log-probs.
    Both see only demonstration rows here (GIFT has no rollouts; DYPO routes every all-wrong
    group to SFT), so the 2-process losses must equal the single process's."""
    over = {**OVERRIDES, **({"algorithm.demos": "first"} if algorithm == "gift" else {})}
    single_run = tmp_path / "single"
    train(tiny_config(model_dir, single_run, algorithm=algorithm, steps=STEPS, overrides=over), base=None)
    cfg = tiny_config(model_dir, tmp_path / "run", algorithm=algorithm, steps=STEPS, overrides=over)
    _torchrun(cfg, tmp_path, "trainer.backend=deepspeed", "trainer.zero_stage=3", f"trainer.deepspeed_config={zero3_json}")
    ref, got = (read_metrics(p / "metrics.jsonl") for p in (single_run, tmp_path / "run"))
    assert [r["step"] for r in ref] == list(range(1, STEPS + 1))
    _assert_same_steps(ref, got)
    assert ref[0]["loss/total"] > 1.0  # a real loss, not an all-zero batch


def test_two_process_rl_loss_keeps_its_normaliser(model_dir, tmp_path):
    """LUFFY's PG terms are Σ/L_max (token-sum-norm). On the random model every rollout is wrong
    and the demonstration right, so the demonstration's advantage is n/(n+1) and its term at
    step 1 depends only on the (identical) starting weights: it must equal the single process's.
    (L_max was summed over ranks once, which halved every such loss under 2 processes.)"""
    train(tiny_config(model_dir, tmp_path / "single", algorithm="luffy", steps=1, overrides=OVERRIDES), base=None)
    cfg = tiny_config(model_dir, tmp_path / "run", algorithm="luffy", steps=1, overrides=OVERRIDES)
    _torchrun(cfg, tmp_path, "trainer.backend=deepspeed", "trainer.zero_stage=2")
    ref, got = (read_metrics(p / "metrics.jsonl")[0] for p in (tmp_path / "single", tmp_path / "run"))
    assert ref["loss/pg_off"] < -0.1
    assert got["loss/pg_off"] == pytest.approx(ref["loss/pg_off"], rel=1e-5)


def test_two_process_zero3_in_bf16(model_dir, tmp_path):
    """DeepSpeed's bf16 mode (what GPU runs use; it also runs on CPU): bf16 weights and
    activations, fp32 master weights. GIFT's losses stay within bf16 noise of the fp32 single
    process, and the consolidated checkpoint loads."""
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                              "bf16": {"enabled": True}}))
    over = {**OVERRIDES, "algorithm.demos": "first"}
    train(tiny_config(model_dir, tmp_path / "single", algorithm="gift", steps=STEPS, overrides=over), base=None)
    cfg = tiny_config(model_dir, tmp_path / "run", algorithm="gift", steps=STEPS, overrides=over)
    _torchrun(cfg, tmp_path, "trainer.backend=deepspeed", "trainer.zero_stage=3", f"trainer.deepspeed_config={ds}")
    ref, got = (read_metrics(p / "metrics.jsonl") for p in (tmp_path / "single", tmp_path / "run"))
    for a, b in zip(ref, got):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-2), (a["step"], a["loss/total"], b["loss/total"])
        assert b["loss/total"] != a["loss/total"]  # bf16 did run: not bit-equal to fp32
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / f"step-{STEPS:06d}")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_two_process_zero3_when_a_rank_has_no_rows(model_dir, zero3_json, tmp_path):
    """Half the prompts have no demonstration, so GIFT drops them; at some steps both kept prompts
    fall to rank 0 and rank 1 has nothing to train on. It must still make the forwards and
    backwards the other rank makes (policy, reference, LM head), or ZeRO-3's gathers hang."""
    from posttrain.data import PromptSampler, load_examples

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "demos": [f"{a}+{b}={a + b} \\boxed{{{a + b}}}"] if i % 2 == 0 else []}
            for i, (a, b) in enumerate([(1, 2), (5, 1), (4, 4), (7, 2)])]
    data = tmp_path / "half.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = 4
    over = {**OVERRIDES, "data.train": str(data), "algorithm.demos": "first"}
    # The premise, from the run's own sampler: some step gives rank 1 (prompts 1 and 3 of the
    # step's 4) only prompts without a demonstration.
    sampler = PromptSampler(load_examples(str(data), demo_keys=["demos"]), 4, seed=0)
    kept_by_rank1 = [sum(bool(ex.demonstrations) for ex in sampler.next_batch()[1::2]) for _ in range(steps)]
    assert 0 in kept_by_rank1, kept_by_rank1

    single_run = tmp_path / "single"
    train(tiny_config(model_dir, single_run, algorithm="gift", steps=steps, overrides=over), base=None)
    cfg = tiny_config(model_dir, tmp_path / "run", algorithm="gift", steps=steps, overrides=over)
    _torchrun(cfg, tmp_path, "trainer.backend=deepspeed", "trainer.zero_stage=3", f"trainer.deepspeed_config={zero3_json}",
              timeout=120)
    ref, got = (read_metrics(p / "metrics.jsonl") for p in (single_run, tmp_path / "run"))
    assert [r["step"] for r in ref] == list(range(1, steps + 1))
    _assert_same_steps(ref, got)


def test_two_process_zero3_with_optimizer_and_parameter_offload(model_dir, single, tmp_path):
    """Optimizer state and parameters offloaded to CPU memory (DeepSpeed's CPU Adam, JIT-built
    on the machine's first use, about 45 s): same losses and weights as the single process."""
    ref_rows, ref_final = single
    ds = tmp_path / "offload.json"
    ds.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0,
        "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}))
    cfg = tiny_config(model_dir, tmp_path / "run", algorithm="hpt", steps=STEPS, overrides=OVERRIDES)
    _torchrun(cfg, tmp_path, "trainer.backend=deepspeed", "trainer.zero_stage=3", f"trainer.deepspeed_config={ds}",
              timeout=400)
    _assert_same_steps(_steps(ref_rows), read_metrics(tmp_path / "run" / "metrics.jsonl"), COMPARED)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / f"step-{STEPS:06d}").state_dict()
    ref = AutoModelForCausalLM.from_pretrained(ref_final).state_dict()
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-4


def test_two_process_zero3_resume_continues_adam(model_dir, single, zero3_json, tmp_path):
    """Stop after step 1, start again asking for 2: each rank reloads its optimizer partition
    (Adam's moments) from zero_shards/, so step 2 is the uninterrupted run's step 2. The weights
    after step 2 tell: with fresh moments (zero_shards/ deleted) they differ by 0.017, not < 1e-4."""
    ref_rows, ref_final = single
    args = ("trainer.backend=deepspeed", "trainer.zero_stage=3", f"trainer.deepspeed_config={zero3_json}", "save_every=1")
    for steps in (1, STEPS):
        cfg = tiny_config(model_dir, tmp_path / "run", algorithm="hpt", steps=steps, overrides=OVERRIDES)
        _torchrun(cfg, tmp_path, *args)
    assert (tmp_path / "run" / "zero_shards" / "step-000001").is_dir()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss/total"] == pytest.approx(_steps(ref_rows)[1]["loss/total"], rel=1e-6)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / f"step-{STEPS:06d}").state_dict()
    ref = AutoModelForCausalLM.from_pretrained(ref_final).state_dict()
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-4


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory):
    """The tiny model, rewired so that some prompts end in 1–3 tokens and others run to the cap:
    the final norm keeps one hidden unit and only EOS reads it. Ranks then finish generating at
    different times."""
    path = make_tiny_model(tmp_path_factory.mktemp("eos") / "m")
    model = AutoModelForCausalLM.from_pretrained(path)
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos, 0] = 5.0
    model.save_pretrained(path)
    return path


def test_two_process_zero3_rollouts_of_different_lengths(eos_model_dir, zero3_json, tmp_path):
    """Under ZeRO-3 every generation step gathers parameters, so a rank whose responses have all
    ended keeps stepping until the others finish (transformers' synced_gpus, on while the
    backend holds its HfDeepSpeedConfig). Without that this run hangs at step 1."""
    over = {**OVERRIDES, "rollout.n": 4, "rollout.max_new_tokens": 24}
    cfg = tiny_config(eos_model_dir, tmp_path / "run", algorithm="grpo", steps=STEPS, overrides=over)
    _torchrun(cfg, tmp_path, "trainer.backend=deepspeed", "trainer.zero_stage=3", f"trainer.deepspeed_config={zero3_json}",
              timeout=90)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(1 <= r["rollout/response_length"] < 24 for r in rows), [r["rollout/response_length"] for r in rows]


def test_two_process_zero3_sharded_evaluation_equals_single_process(eos_model_dir, zero3_json, tmp_path):
    """Greedy held-out evaluation split over 2 ranks (7 prompts: 4, and 3 plus a pad) gives the
    single process's numbers. With bare prompts (no chat template) the rewired model's greedy
    responses end at different lengths, so the mean length checks that each prompt was
    answered once and the pad was dropped."""
    over = {**OVERRIDES, "data.eval": "synthetic:arithmetic?n=7&seed=3", "eval.max_new_tokens": 24,
            "data.template": "{prompt}", "algorithm.demos": "first"}
    train(tiny_config(eos_model_dir, tmp_path / "single", algorithm="sft", steps=1, overrides=over), base=None)
    cfg = tiny_config(eos_model_dir, tmp_path / "run", algorithm="sft", steps=1, overrides=over)
    _torchrun(cfg, tmp_path, "trainer.backend=deepspeed", "trainer.zero_stage=3", f"trainer.deepspeed_config={zero3_json}",
              timeout=90)
    ref, got = (read_metrics(p / "metrics.jsonl")[0] for p in (tmp_path / "single", tmp_path / "run"))
    assert ref["step"] == got["step"] == 0
    assert 1 < ref["eval/response_length"] < 24  # lengths differ between prompts (13.3 here)
    assert {k: got[k] for k in EVAL_KEYS} == pytest.approx({k: ref[k] for k in EVAL_KEYS})


def test_two_process_resume_restores_each_ranks_sampling(eos_model_dir, tmp_path):
    """Each rank samples rollouts with its own RNG stream (seed + rank). A resumed run restores
    every rank's stream, so it samples what the uninterrupted run sampled; with rank 0's stream
    on both ranks (what the checkpoint's rng.pt holds) step 2's rollouts differ (2.75 tokens on
    average instead of 2.8125, with this model)."""
    over = {**OVERRIDES, "rollout.n": 4, "rollout.max_new_tokens": 24, "save_every": 1}
    args = ("trainer.backend=deepspeed", "trainer.zero_stage=2")
    _torchrun(tiny_config(eos_model_dir, tmp_path / "full", algorithm="grpo", steps=STEPS, overrides=over), tmp_path, *args)
    for steps in (1, STEPS):
        _torchrun(tiny_config(eos_model_dir, tmp_path / "res", algorithm="grpo", steps=steps, overrides=over), tmp_path, *args)
    full, res = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "res"))
    assert [r["step"] for r in res] == [1, 2]
    lengths = [r["rollout/response_length"] for r in full]
    assert lengths[0] != lengths[1]  # sampling varies from step to step: the comparison means something
    assert [r["rollout/response_length"] for r in res] == lengths


def test_uneven_split_is_a_config_error(model_dir, tmp_path):
    cfg = tiny_config(model_dir, tmp_path / "run", algorithm="hpt", steps=1, overrides=OVERRIDES)
    cfg["trainer"]["prompts_per_step"] = 3
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}  # what a launcher would set
    res = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(path), "trainer.backend=deepspeed"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "trainer.prompts_per_step (3) must be a multiple of the 2 processes" in res.stderr


def test_one_process_zero1_matches_and_skip_rule(model_dir, single, tmp_path):
    """No launcher: the backend makes a group of one. Same losses as torch; then the skip rule."""
    ref_rows, _ = single
    over = {**OVERRIDES, "trainer.backend": "deepspeed", "trainer.zero_stage": 1, "save_every": 1}
    full, = train(tiny_config(model_dir, tmp_path / "z1", algorithm="hpt", steps=STEPS, overrides=over), base=None)
    full_rows = read_metrics(tmp_path / "z1" / "metrics.jsonl")
    _assert_same_steps(_steps(ref_rows), full_rows, COMPARED)

    # Resume: run 1 step, then ask for 2. The optimizer shards restore Adam's moments, so step 2
    # is the uninterrupted run's (fresh moments would make Adam's step 2 a first step: other weights).
    assert (tmp_path / "z1" / "zero_shards" / "step-000001").is_dir()
    train(tiny_config(model_dir, tmp_path / "res", algorithm="hpt", steps=1, overrides=over), base=None)
    resumed, = train(tiny_config(model_dir, tmp_path / "res", algorithm="hpt", steps=STEPS, overrides=over), base=None)
    last = read_metrics(tmp_path / "res" / "metrics.jsonl")[-1]
    assert last["step"] == 2 and last["loss/total"] == pytest.approx(full_rows[-1]["loss/total"], rel=1e-6)
    a, b = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (full, resumed))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6

    # Every step's pre-clip norm is above 1e-9: both are skipped (counted), the weights never
    # move, and the LR schedule still advances (cosine from 1e-2 to 0 over 2 steps).
    over.update({"trainer.skip_grad_norm_above": 1e-9, "trainer.schedule": "cosine"})
    final, = train(tiny_config(model_dir, tmp_path / "skip", algorithm="hpt", steps=STEPS, overrides=over), base=None)
    rows = read_metrics(tmp_path / "skip" / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in rows] == [1.0, 1.0]
    got, start = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (final, model_dir))
    assert all(torch.equal(got[k], start[k]) for k in start)
    assert [r["train/lr"] for r in rows] == pytest.approx([5e-3, 0.0], abs=1e-12)


def test_launcher_local_rank_argument_is_stripped(monkeypatch):
    from posttrain.distributed import strip_launcher_args

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(["--local_rank=3", "train", "c.yaml", "trainer.lr=1"]) == ["train", "c.yaml", "trainer.lr=1"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert strip_launcher_args(["train", "--local_rank", "5", "c.yaml"]) == ["train", "c.yaml"]
    assert os.environ["LOCAL_RANK"] == "5"


def test_ds_config_from_fields_and_from_a_user_json(tmp_path):
    from posttrain.config import ConfigError, TrainerConfig
    from posttrain.train.deepspeed_backend import build_ds_config

    t = TrainerConfig(zero_stage=3, offload_optimizer=True, offload_params=True, grad_clip=0.5)
    c = build_ds_config(t, on_gpu=True)
    assert c["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                      "offload_param": {"device": "cpu", "pin_memory": True}}
    assert c["bf16"] == {"enabled": True} and c["gradient_clipping"] == 0.5
    assert c["managed_gradient_accumulation"] is False and c["gradient_accumulation_steps"] == 1
    assert build_ds_config(TrainerConfig(), on_gpu=False)["bf16"] == {"enabled": False}  # CPU: fp32

    user = tmp_path / "ds.json"  # the user's sections win, batch bookkeeping stays ours
    user.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 8,
                                "bf16": {"enabled": False}}))
    c = build_ds_config(TrainerConfig(deepspeed_config=str(user)), on_gpu=True)
    assert c["zero_optimization"] == {"stage": 1} and c["bf16"] == {"enabled": False}
    assert c["gradient_accumulation_steps"] == 1
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match=r"ds.json: remove optimizer; posttrain builds AdamW"):
        build_ds_config(TrainerConfig(deepspeed_config=str(user)), on_gpu=True)
    user.write_text("{not json")
    with pytest.raises(ConfigError, match=r"ds.json: not valid JSON"):
        build_ds_config(TrainerConfig(deepspeed_config=str(user)), on_gpu=True)
    with pytest.raises(ConfigError, match=r"nope.json: no such file"):
        build_ds_config(TrainerConfig(deepspeed_config=str(tmp_path / "nope.json")), on_gpu=True)
