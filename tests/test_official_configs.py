"""configs/official/: one config per official training script, every loss-relevant value as the script.

Each file is named after the script it mirrors (``<algorithm>_<script>.yaml``) and says on its first
line which repository, script and commit. The tables below are the scripts' values, read from the
scripts (see each file's comments for the script's own key names).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.run import load_config, resolve_stages

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "configs" / "official"

# file → (repository, script, commit) it mirrors
SOURCES = {
    "luffy_train": ("ElliottYan/LUFFY", "exp_scripts/train.sh", "01f4ae0"),
    "luffy_train_on_policy": ("ElliottYan/LUFFY", "exp_scripts/train_on_policy.sh", "01f4ae0"),
    "luffy_train_rl_sft_loss": ("ElliottYan/LUFFY", "exp_scripts/train_rl_sft_loss.sh", "01f4ae0"),
    "luffy_train_sft_rl": ("ElliottYan/LUFFY", "exp_scripts/train_sft_rl.sh", "01f4ae0"),
    "hpt_train": ("TsinghuaC3I/Unify-Post-Training", "exp_scripts/train.sh", "ae332f5"),
    "hpt_train_llama": ("TsinghuaC3I/Unify-Post-Training", "exp_scripts/train_llama.sh", "ae332f5"),
    "hpt_train_luffy": ("TsinghuaC3I/Unify-Post-Training", "exp_scripts/train_luffy.sh", "ae332f5"),
    "hpt_train_srft": ("TsinghuaC3I/Unify-Post-Training", "exp_scripts/train_srft.sh", "ae332f5"),
    "gift_run_gift_training": ("zzy1127/GIFT", "exp_scripts/run_gift_training.sh", "ba91084"),
}

# The verl-0.2 fork scripts (LUFFY, HPT, SRFT) share: no KL, entropy_coeff 0.001, grpo_use_std=False,
# loss_remove_token_mean=True (Σ/8192), per-micro-batch aggregation, T = 1.0, 128 prompts a step,
# mini-batches of 64, ppo_max_token_len_per_gpu 32768, grad clip 1.0, constant LR.
FORK_ALGO = dict(kl_coef=0.0, entropy_coef=0.001, norm_adv_by_std=False, loss_agg="token-sum-norm",
                 loss_max_len=8192, aggregation="official")
FORK_RUN = dict(temperature=1.0, max_new_tokens=8192, prompts_per_step=128, prompts_per_minibatch=64,
                micro_batch_tokens=32768, grad_clip=1.0, schedule="constant", warmup_steps=0)

# file → (algorithm fields, run fields) the script sets
EXPECTED = {
    "luffy_train": (dict(name="luffy", n_off=1, demo_loss="off_policy_rl", off_policy_shaping="p_div_p",
                         shaping_gamma=0.1, on_policy_shaping="none", clip_low=None, **FORK_ALGO),
                    dict(n=7, lr=1e-6, skip_grad_norm_above=None, eval_n=1, eval_top_p=1.0, **FORK_RUN)),
    "luffy_train_on_policy": (dict(name="luffy", n_off=0, clip_low=0.2, clip_high=None, **FORK_ALGO),
                              dict(n=8, lr=1e-6, skip_grad_norm_above=None, eval_n=1, eval_top_p=1.0, **FORK_RUN)),
    "luffy_train_rl_sft_loss": (dict(name="luffy", n_off=1, demo_loss="sft", sft_coef=1.0, clip_low=None, **FORK_ALGO),
                                dict(n=7, lr=1e-6, skip_grad_norm_above=None, eval_n=1, eval_top_p=1.0, **FORK_RUN)),
    "luffy_train_sft_rl": (dict(name="luffy", n_off=0, clip_low=0.2, clip_high=None, **FORK_ALGO),
                           dict(n=8, lr=1e-6, skip_grad_norm_above=None, eval_n=1, eval_top_p=1.0,
                                model="Elliott/Qwen2.5-Math-7B-SFT", **FORK_RUN)),
    "hpt_train": (dict(name="hpt", gate="switch", gate_max_correct=0, gate_off_max_correct=0, variant="sft_on",
                       sft_coef=1.0, clip_low=None, **FORK_ALGO),
                  dict(n=8, lr=5e-6, skip_grad_norm_above=80, eval_n=8, eval_top_p=0.95, **FORK_RUN)),
    "hpt_train_llama": (dict(name="hpt", gate="switch", gate_max_correct=2, gate_off_max_correct=2, variant="sft_on",
                             sft_coef=1.0, clip_low=None, **FORK_ALGO),
                        dict(n=8, lr=5e-6, skip_grad_norm_above=None, eval_n=8, eval_top_p=0.95,
                             model="meta-llama/Llama-3.1-8B", **FORK_RUN)),
    "hpt_train_luffy": (dict(name="luffy", n_off=1, demo_loss="off_policy_rl", off_policy_shaping="p_div_p",
                             shaping_gamma=0.1, clip_low=None, **FORK_ALGO),
                        dict(n=7, lr=1e-6, skip_grad_norm_above=None, eval_n=8, eval_top_p=0.95, **FORK_RUN)),
    "hpt_train_srft": (dict(name="srft", profile="reference", srft_type="paper", entropy_level="sequence",
                            demo_shaping="p_div_p", shaping_gamma=0.1, clip_low=None, **FORK_ALGO),
                       dict(n=7, lr=1e-6, skip_grad_norm_above=None, eval_n=8, eval_top_p=0.95, **FORK_RUN)),
    "gift_run_gift_training": (dict(name="gift", beta=20.0, smooth=0.0, target_form="official", aggregation="official",
                                    sft_coef=1.0, entropy_coef=0.0, kl_coef=0.0),
                               dict(temperature=1.0, prompts_per_step=128, micro_batch_tokens=16384, lr=1e-5,
                                    betas=[0.9, 0.95], weight_decay=0.01, schedule="constant", warmup_steps=0,
                                    grad_clip=1.0, steps=780, save_every=78)),
}


def run_values(stage) -> dict:
    r = stage.run
    return dict(n=r.rollout.n, temperature=r.rollout.temperature, max_new_tokens=r.rollout.max_new_tokens,
                prompts_per_step=r.trainer.prompts_per_step, prompts_per_minibatch=r.trainer.prompts_per_minibatch,
                micro_batch_tokens=r.trainer.micro_batch_tokens, lr=r.trainer.lr, betas=list(r.trainer.betas),
                weight_decay=r.trainer.weight_decay, schedule=r.trainer.schedule, warmup_steps=r.trainer.warmup_steps,
                grad_clip=r.trainer.grad_clip, skip_grad_norm_above=r.trainer.skip_grad_norm_above,
                eval_n=r.eval.n, eval_top_p=r.eval.top_p, steps=r.trainer.steps, save_every=r.save_every,
                model=r.model.path)


def test_one_config_per_official_script():
    assert sorted(p.stem for p in OFFICIAL.glob("*.yaml")) == sorted(SOURCES) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_header_names_the_script_and_commit(name):
    repo, script, commit = SOURCES[name]
    first = (OFFICIAL / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith(f"# Mirrors {repo} {script} at commit {commit}"), first
    assert name.split("_", 1)[1] == Path(script).stem  # <algorithm>_<script name>


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mirrored_values(name):
    path = OFFICIAL / f"{name}.yaml"
    (stage,) = resolve_stages(load_config(path), source=str(path))
    algo_expected, run_expected = EXPECTED[name]
    algo = {k: getattr(stage.algo, k) for k in algo_expected if k != "name"}
    assert stage.algo.name == algo_expected["name"]
    assert algo == {k: v for k, v in algo_expected.items() if k != "name"}
    got = run_values(stage)
    assert {k: got[k] for k in run_expected} == run_expected
    if name != "gift_run_gift_training":  # 500 rollout steps × 2 mini-batches; eval T 0.6 for all
        assert (got["steps"], stage.run.eval.temperature, stage.run.save_every) == (1000, 0.6, 100)


def test_llama_prompt_is_the_base_model_template():
    (stage,) = resolve_stages(load_config(OFFICIAL / "hpt_train_llama.yaml"))
    from posttrain.data import render_prompt

    text = render_prompt(None, "1+1?", template=stage.run.data.template)
    assert text == ("Question:\n1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.\n"
                    "Answer:\nLet's think step by step.")


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_show_config_validates(name):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "show-config", str(OFFICIAL / f"{name}.yaml")],
                         capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert f"name: {EXPECTED[name][0]['name']}" in out.stdout
