"""GIFT plugin: the Gibbs target in closed form, the soft-target gradient, the SFT limit,
chunked == unchunked, hand-computed metrics (padding excluded), the loss through the plugin
manager, the core's conformance check, the configs, and a 2-stage GIFT → GRPO run.

Numbers used below (β = 20, e^20 = 485165195.41):

    base p = [1e-6, 0.5, 0.3, 0.2 − 1e-6], gold y* = 0
    D = p·e^β + 1 − p = 485.165195 + 0.999999 = 486.165194
    q = [485.165195, 0.5, 0.3, 0.199999] / D = [0.997943088, 0.001028457, 0.000617074, 0.000411381]
    non-gold mass (1 − p)/D = 0.0020569   (the issue's 0.0021)
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from posttrain import functional as F
from posttrain.batching import build_train_batch, micro_batch_rows, totals_of, trim_padding
from posttrain.config import validate_algorithm
from posttrain.loss import micro_batch_loss
from posttrain.metrics import Metrics
from posttrain.plugins import make_plugin_manager
from posttrain.types import Example, ModelOutputs, Needs, PromptGroup, Route, Trajectory

from posttrain_gift import plugin as gift
from posttrain_gift.plugin import GIFTConfig, gift_target, token_diagnostics

ROOT = Path(__file__).resolve().parents[3]
E20 = math.exp(20.0)
BASE4 = torch.tensor([1e-6, 0.5, 0.3, 0.2 - 1e-6], dtype=torch.float64)
Q4 = torch.tensor([0.9979430880460005, 0.0010284570054567672, 0.0006170742032740604, 0.000411380745268696])


def _cfg(**kw) -> GIFTConfig:
    return GIFTConfig(**kw)


def _hook(logits, ref, labels, cfg, metrics=None):
    return gift.token_distribution_loss(logits=logits, reference_logprobs=ref, labels=labels, config=cfg, metrics=metrics)


# --- config and routing --------------------------------------------------------------------------


def test_config_defaults_and_validation():
    c = GIFTConfig()
    assert (c.name, c.beta, c.smooth, c.demos, c.sft_coef, c.entropy_coef, c.kl_coef) == ("gift", 20.0, 0.0, "all", 1.0, 0.0, 0.0)
    assert all(f.metadata.get("help") for f in dataclasses.fields(GIFTConfig))
    obj, problems = validate_algorithm({"name": "gift", "beta": 10.0, "smooth": 0.1, "demos": "first"}, GIFTConfig)
    assert problems == [] and (obj.beta, obj.smooth, obj.demos) == (10.0, 0.1, "first")
    obj, problems = validate_algorithm({"name": "gift", "beta": float("inf")}, GIFTConfig)
    assert problems == [] and math.isinf(obj.beta)
    for bad, words in [({"beta": -1.0}, "beta"), ({"smooth": 1.5}, "smooth"), ({"demos": "best"}, "demos"),
                       ({"entropy_coef": 0.001}, "entropy_coef"), ({"kl_coef": 0.1}, "kl_coef"),
                       ({"overlap_k": 0}, "overlap_k"), ({"betta": 3.0}, "Did you mean 'beta'")]:
        _, problems = validate_algorithm({"name": "gift", **bad}, GIFTConfig)
        assert problems and words in " ".join(problems), (bad, problems)


def _offline_group(k_demos: int, uid: str = "t:1") -> PromptGroup:
    demos = [Trajectory(response_ids=[4 + i, 1], off_policy=True, teacher=i) for i in range(k_demos)]
    ex = Example(prompt="1+1=", answer="2", demonstrations=["d"] * k_demos, uid=uid)
    return PromptGroup(example=ex, prompt_ids=[5, 6], members=[], demonstrations=demos)


def test_requirements_and_route_through_plugin_manager():
    pm = make_plugin_manager("gift")
    cfg = pm.hook.algorithm_config()()
    assert pm.hook.requirements(config=cfg) == Needs(rollouts=False, reference_vocab=True)
    m = Metrics()
    route = pm.hook.route_group(group=_offline_group(2), config=cfg, step=0, metrics=m)
    assert route == Route(rl=0.0, sft=1.0, demos=(0, 1), members=())  # demos: all
    first = dataclasses.replace(cfg, demos="first")
    assert pm.hook.route_group(group=_offline_group(2), config=first, step=0, metrics=m).demos == (0,)
    rand = dataclasses.replace(cfg, demos="random")
    picks = [pm.hook.route_group(group=_offline_group(3), config=rand, step=s, metrics=m).demos for s in range(12)]
    assert all(len(p) == 1 and 0 <= p[0] < 3 for p in picks) and len(set(picks)) > 1
    assert picks == [pm.hook.route_group(group=_offline_group(3), config=rand, step=s, metrics=m).demos for s in range(12)]
    assert pm.hook.route_group(group=_offline_group(0), config=cfg, step=0, metrics=m).drop
    # two demonstrations → two SFT rows, no RL rows
    batch = build_train_batch([_offline_group(2)], [route], pad_id=0)
    assert batch.sft_weight.tolist() == [1.0, 1.0] and batch.rl_weight.tolist() == [0.0, 0.0]


# --- the target ----------------------------------------------------------------------------------


def test_closed_form_target_beta_20():
    ref = BASE4.log().float()
    q = gift_target(ref, torch.tensor(0), beta=20.0)
    # q(y*) = p·e^β/(p·e^β + 1 − p) = 485.165195/486.165194
    p = 1e-6
    assert float(q[0]) == pytest.approx(p * E20 / (p * E20 + 1 - p), rel=1e-5)
    assert float(q[1:].sum()) == pytest.approx(0.0020569, abs=2e-7)  # the issue's non-gold mass 0.0021
    torch.testing.assert_close(q, Q4, rtol=1e-4, atol=1e-8)
    # the non-gold tokens keep the base's relative shape 0.5 : 0.3 : 0.2
    assert float(q[1] / q[2]) == pytest.approx(0.5 / 0.3, rel=1e-5)
    assert float(q[2] / q[3]) == pytest.approx(0.3 / 0.2, rel=1e-4)
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-6)


def test_target_smoothing_and_zero_base_mass():
    # base [0.5, 0.5, 0, 0], λ = 0.2, V = 4: p̃ = 0.8·p + 0.05 = [0.45, 0.45, 0.05, 0.05];
    # β = ln 3 on token 0: [1.35, 0.45, 0.05, 0.05] / 1.9 = [0.710526, 0.236842, 0.026316, 0.026316]
    ref = torch.tensor([0.5, 0.5, 0.0, 0.0]).log()  # −inf for the zero-mass tokens
    q = gift_target(ref, torch.tensor(0), beta=math.log(3.0), smooth=0.2)
    torch.testing.assert_close(q, torch.tensor([0.710526, 0.236842, 0.026316, 0.026316]), atol=1e-6, rtol=0)
    # λ = 0: [1.5, 0.5, 1e-10, 1e-10] / 2 — the 1e-10 guard keeps the log finite, no nan
    q0 = gift_target(ref, torch.tensor(0), beta=math.log(3.0))
    torch.testing.assert_close(q0[:2], torch.tensor([0.75, 0.25]), atol=1e-7, rtol=0)
    assert torch.isfinite(q0).all() and 0.0 < float(q0[2]) < 1e-9


def test_loss_and_gradient_wrt_student_logits():
    # z = log [1, 2, 3, 4] → softmax(z) = [0.1, 0.2, 0.3, 0.4]
    z = torch.tensor([1.0, 2.0, 3.0, 4.0]).log().view(1, 1, 4).requires_grad_(True)
    ref = BASE4.log().float().view(1, 1, 4)
    loss = _hook(z, ref, torch.tensor([[0]]), _cfg(beta=20.0))
    assert loss.shape == (1, 1)
    # ℓ = −Σ q·log softmax(z) = 0.997943·2.302585 + 0.001028·1.609438 + 0.000617·1.203973 + 0.000411·0.916291
    #   = 2.297849 + 0.001655 + 0.000743 + 0.000377 = 2.300624
    expected = -sum(float(qk) * math.log(pk) for qk, pk in zip(Q4, [0.1, 0.2, 0.3, 0.4]))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(2.300624, abs=1e-5)
    loss.sum().backward()
    # ∂ℓ/∂z = softmax(z) − q = [0.1 − 0.997943, 0.2 − 0.001028, 0.3 − 0.000617, 0.4 − 0.000411]
    torch.testing.assert_close(z.grad.view(4), torch.tensor([-0.8979431, 0.1989715, 0.2993829, 0.3995886]), atol=1e-5, rtol=0)


def test_large_beta_matches_sft_nll():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    ref = torch.log_softmax(torch.randn(2, 5, 7, generator=g), -1)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    nll = -F.logprobs_from_logits(logits, labels)
    (g_nll,) = torch.autograd.grad(nll.sum(), logits)
    for beta in (float("inf"), 60.0):  # β = ∞ exactly SFT; β = 60: 1 − q(y*) < 1e-20 for p(y*) > 1e-6
        loss = _hook(logits, ref, labels, _cfg(beta=beta))
        torch.testing.assert_close(loss, nll, atol=1e-5, rtol=0)
        (g_gift,) = torch.autograd.grad(loss.sum(), logits)
        torch.testing.assert_close(g_gift, g_nll, atol=1e-5, rtol=0)
    # and a finite β is not SFT: β = 2 keeps visible mass off the gold token
    q = gift_target(ref, labels, beta=2.0)
    assert float(q.gather(-1, labels[..., None]).max()) < 0.99


def test_sft_limit_through_the_engine_path_matches_the_sft_plugin(tmp_path):
    """β = ∞ through the engine's own micro-batch code equals the built-in SFT plugin's loss and gradients."""
    from transformers import AutoModelForCausalLM

    from posttrain.testing import make_tiny_model, tiny_groups

    path = make_tiny_model(tmp_path / "m", hidden=32, layers=1, heads=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    results = {}
    for name, algo in (("gift", {"beta": float("inf"), "demos": "all"}), ("sft", {"demos": "all"})):
        pm = make_plugin_manager(name)
        cfg = pm.hook.algorithm_config()(**algo)
        needs = pm.hook.requirements(config=cfg)
        groups = list(tiny_groups().values())
        for gr in groups:
            gr.members = []
        routes = [pm.hook.route_group(group=gr, config=cfg, step=0, metrics=Metrics()) for gr in groups]
        batch = build_train_batch(groups, routes, pad_id=0)
        batch.advantages = pm.hook.compute_advantage(batch=batch, config=cfg, step=0, metrics=Metrics())
        batch = batch.with_(totals=totals_of(batch, max_len=16))
        model.zero_grad(set_to_none=True)
        terms, _ = micro_batch_loss(pm.hook, cfg, 0, model, batch, Metrics(), needs=needs, reference=ref, chunk=4)
        loss = sum(t.value for t in terms)
        loss.backward()
        results[name] = ([t.name for t in terms], float(loss.detach()), [p.grad.clone() for p in model.parameters()])
    assert results["gift"][0] == ["gift"] and results["sft"][0] == ["sft"]  # no default SFT term under GIFT
    assert results["gift"][1] == pytest.approx(results["sft"][1], rel=1e-6)
    assert results["gift"][1] == pytest.approx(math.log(100), rel=0.05)  # a random 100-token model: NLL ≈ ln V
    for a, b in zip(results["gift"][2], results["sft"][2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --- chunking ------------------------------------------------------------------------------------


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(1)
    N, L, H, V = 2, 7, 8, 11
    hidden = torch.randn(N, L, H, generator=g, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
    ref = torch.log_softmax(torch.randn(N, L, V, generator=g), -1)
    labels = torch.randint(0, V, (N, L), generator=g)
    w = torch.rand(N, L, generator=g)  # arbitrary per-token weights so every position's gradient is checked
    cfg = _cfg(beta=3.0, smooth=0.05)

    def grads(loss):
        hidden.grad, head.weight.grad = None, None
        (loss * w).sum().backward()
        return hidden.grad.clone(), head.weight.grad.clone()

    full = _hook(head(hidden), ref, labels, cfg)  # [N, L] from the whole [N, L, V] logits
    full_stats = token_diagnostics(head(hidden), ref, gift_target(ref, labels, 3.0, 0.05), labels, cfg.overlap_k)
    g_full = grads(full)
    for c in (1, 3, L):
        m = Metrics()
        _, _, dist = F.chunked_token_stats(
            hidden, head, labels, chunk_size=c,
            extra=lambda logits, sl: _hook(logits, ref[:, sl], labels[:, sl], cfg, m))
        torch.testing.assert_close(dist, full.detach(), atol=1e-6, rtol=1e-6)
        # the forward left one diagnostics chunk per chunk, in order: together the unchunked stats
        stats = gift._forward_chunks(gift._PENDING[m], N, L)
        torch.testing.assert_close(stats, full_stats, atol=1e-6, rtol=1e-6)
        g_c = grads(dist)
        for a, b in zip(g_c, g_full):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --- build_loss and the metrics -----------------------------------------------------------------

PAD = 2  # vocabulary {0, 1, 2}; demonstration tokens are 0, padding is 2
P_POLICY = torch.tensor([0.5, 0.3, 0.2])
P_BASE = torch.tensor([0.2, 0.5, 0.3])


def _metric_batch():
    """Two prompts, one demonstration each: 3 tokens and 1 token (so row 1 has 2 padded positions)."""
    groups, routes = [], []
    for uid, n in (("a", 3), ("b", 1)):
        ex = Example(prompt="q", answer="0", demonstrations=["d"], uid=uid)
        groups.append(PromptGroup(example=ex, prompt_ids=[1], demonstrations=[Trajectory(response_ids=[0] * n, off_policy=True, teacher=0)]))
        routes.append(Route(rl=0.0, sft=1.0, demos=(0,), members=()))
    batch = build_train_batch(groups, routes, pad_id=PAD)
    batch.advantages = torch.zeros(len(batch))
    return batch.with_(totals=totals_of(batch, max_len=8))


def _metric_logits(batch):
    """Real tokens: π_θ = [0.5, 0.3, 0.2], π_base = [0.2, 0.5, 0.3]. Padding: π_θ = π_base = uniform-ish,
    so any leak of padded positions into the means would change them."""
    m = batch.response_mask[..., None]
    pad = torch.tensor([0.1, 0.1, 0.8])
    logits = torch.where(m, P_POLICY.log(), pad.log()).clone().requires_grad_(True)
    ref = torch.where(m, P_BASE.log(), pad.log())
    return logits, ref


def test_metrics_hand_computed_padding_excluded():
    # β = ln 4, gold token 0: q ∝ [0.2·4, 0.5, 0.3] = [0.8, 0.5, 0.3]/1.6 = [0.5, 0.3125, 0.1875]
    #   KL(π_θ‖π_base) = 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.5) + 0.2 ln(0.2/0.3) = 0.2238047
    #   H(q) = −(0.5 ln 0.5 + 0.3125 ln 0.3125 + 0.1875 ln 0.1875) = 1.0239288
    #   top-2: π_θ {0, 1}, π_base {1, 2} → overlap 1/2;  q(y*) = 0.5;  NLL = −ln 0.5 = 0.6931472
    #   ℓ = −Σ q ln π_θ = −(0.5 ln 0.5 + 0.3125 ln 0.3 + 0.1875 ln 0.2) = 1.0245847 on each of the 4 tokens
    pm = make_plugin_manager("gift")
    cfg = GIFTConfig(beta=math.log(4.0), overlap_k=2)
    batch = _metric_batch()
    assert batch.response_mask.tolist() == [[True, True, True], [True, False, False]]
    logits, ref = _metric_logits(batch)
    labels = batch.response_ids
    m = Metrics()
    chunks = [pm.hook.token_distribution_loss(logits=logits[:, sl], reference_logprobs=ref[:, sl], labels=labels[:, sl],
                                              config=cfg, step=0, metrics=m) for sl in (slice(0, 2), slice(2, 3))]
    dist = torch.cat(chunks, dim=1)
    outputs = ModelOutputs(logprobs=F.logprobs_from_logits(logits, labels), distribution_loss=dist)
    adv = torch.zeros_like(dist)
    terms = pm.hook.build_loss(batch=batch, outputs=outputs, advantages=adv, ratio=torch.ones_like(dist),
                               mask=batch.response_mask, config=cfg, step=0, metrics=m)
    assert [t.name for t in terms] == ["gift"]  # the default SFT NLL term is not added
    assert float(terms[0].value) == pytest.approx(1.0245847, abs=1e-6)  # 4 × 1.0245847 / 4 SFT tokens
    s = m.summary()
    assert s["gift/kl_to_base"] == pytest.approx(0.2238047, abs=1e-6)
    assert s["gift/target_entropy"] == pytest.approx(1.0239288, abs=1e-6)
    assert s["gift/topk_overlap"] == pytest.approx(0.5)
    assert s["gift/target_gold_prob"] == pytest.approx(0.5, abs=1e-6)
    assert s["gift/nll"] == pytest.approx(0.6931472, abs=1e-6)
    # gradient: 1/4 · (softmax − q) at each real token, 0 on padding
    terms[0].value.backward()
    expected = (P_POLICY - torch.tensor([0.5, 0.3125, 0.1875])) / 4
    torch.testing.assert_close(logits.grad[0, 0], expected, atol=1e-6, rtol=0)
    assert float(logits.grad[1, 1:].abs().sum()) == 0.0
    # called directly without metrics (tests, other engines): nothing logged, nothing stashed
    assert _hook(logits[:, :1].detach(), ref[:, :1], labels[:, :1], cfg).shape == (2, 1)


def test_build_loss_weights_and_microbatch_invariance():
    # ℓ per token (hand-made): row 0 [1, 2, 3], row 1 [4, ·, ·]; SFT weights 1 and 0.5; 4 SFT tokens
    # whole: (1 + 2 + 3 + 0.5·4) / 4 = 2.0;  split per row: 6/4 + 2/4 = 2.0;  × sft_coef 0.5 → 1.0
    pm = make_plugin_manager("gift")
    cfg = GIFTConfig(sft_coef=0.5)
    batch = _metric_batch()
    batch = batch.with_(sft_weight=torch.tensor([1.0, 0.5]))
    dist = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]], requires_grad=True)
    out = ModelOutputs(logprobs=torch.zeros(2, 3), distribution_loss=dist)
    call = dict(advantages=torch.zeros(2, 3), ratio=torch.ones(2, 3), config=cfg, step=0, metrics=None)
    whole = pm.hook.build_loss(batch=batch, outputs=out, mask=batch.response_mask, **call)
    assert float(whole[0].value) == pytest.approx(1.0)
    whole[0].value.backward()
    # ∂/∂ℓ = sft_coef · w / 4: row 0 → 0.125, row 1 → 0.0625, padding → 0
    torch.testing.assert_close(dist.grad, torch.tensor([[0.125, 0.125, 0.125], [0.0625, 0.0, 0.0]]))
    split = 0.0
    for r in ([0], [1]):
        mb = batch.select(r)
        o = ModelOutputs(logprobs=torch.zeros(1, 3), distribution_loss=dist.detach()[r])
        split += float(pm.hook.build_loss(batch=mb, outputs=o, mask=mb.response_mask, **call)[0].value)
    assert split == pytest.approx(1.0)


def test_metrics_through_engine_path_survive_backward_recompute(tmp_path):
    """Two micro-batches through the engine's code (chunked, checkpointed, backward in between):
    the logged diagnostics equal the unchunked masked means, although backward re-runs the hook."""
    from transformers import AutoModelForCausalLM

    from posttrain.testing import make_tiny_model, tiny_groups
    from posttrain.train.forward import response_hidden

    path = make_tiny_model(tmp_path / "m", hidden=32, layers=1, heads=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    ref_model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():  # make the policy differ from the base, so KL > 0 and overlap < 1
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pm = make_plugin_manager("gift")
    cfg = GIFTConfig(beta=4.0, overlap_k=5)
    groups = list(tiny_groups().values())
    for gr in groups:
        gr.members = []
    routes = [pm.hook.route_group(group=gr, config=cfg, step=0, metrics=Metrics()) for gr in groups]
    batch = build_train_batch(groups, routes, pad_id=0)
    batch.advantages = torch.zeros(len(batch))
    rows = micro_batch_rows(batch, token_budget=1)  # one row per micro-batch, different lengths
    totals = totals_of(batch, max_len=16, micro_batches=len(rows))
    m = Metrics()
    expected = {k: [] for k in gift.DIAGNOSTICS}
    for r in rows:
        micro = trim_padding(batch.select(r)).with_(totals=totals)
        terms, _ = micro_batch_loss(pm.hook, cfg, 0, model, micro, m, needs=pm.hook.requirements(config=cfg),
                                    reference=ref_model, chunk=4)
        sum(t.value for t in terms).backward()  # recomputes the chunks: the hook runs again
        with torch.no_grad():
            h, head = response_hidden(model, micro)
            rh, rhead = response_hidden(ref_model, micro)
            logits, ref = head(h).float(), torch.log_softmax(rhead(rh).float(), -1)
            q = gift_target(ref, micro.response_ids, cfg.beta)
            st = token_diagnostics(logits, ref, q, micro.response_ids, cfg.overlap_k)
        for i, k in enumerate(gift.DIAGNOSTICS):
            expected[k].append(float(F.masked_mean(st[..., i], micro.response_mask)))
    s = m.summary()
    for k, vals in expected.items():
        assert s[f"gift/{k}"] == pytest.approx(sum(vals) / len(vals), abs=1e-5), k
    assert s["gift/kl_to_base"] > 1e-4 and s["gift/topk_overlap"] < 1.0


def test_check_algorithm_plugin():
    from posttrain.testing import check_algorithm_plugin

    report = check_algorithm_plugin("gift")
    assert report["needs"] == Needs(rollouts=False, reference_vocab=True)
    assert set(report["terms"]) == {"gift"} and set(report["routes"]) == {"sft"}
    assert report["rows"] == 5  # 3 prompts × 1 demonstration + 1 prompt × 2 teachers (demos: all)
    assert math.isfinite(report["loss"]) and report["loss"] > 0


# --- configs -------------------------------------------------------------------------------------


def test_configs_validate_with_paper_settings():
    from posttrain.run import load_config, resolve_stages

    (g,) = resolve_stages(load_config(ROOT / "configs/gift.yaml"), source="gift.yaml")
    assert (g.algo.beta, g.algo.smooth) == (20.0, 0.0)
    t = g.run.trainer
    assert (t.lr, list(t.betas), t.weight_decay, t.prompts_per_step, t.grad_clip, t.schedule, t.warmup_steps) == \
        (1e-5, [0.9, 0.95], 0.01, 128, 1.0, "constant", 0)
    for name, first in (("gift_then_grpo", "gift"), ("sft_then_grpo", "sft")):
        s1, s2 = resolve_stages(load_config(ROOT / f"configs/{name}.yaml"), source=name)
        assert s1.algo.name == first and s2.algo.name == "grpo"
        assert (s1.run.trainer.lr, list(s1.run.trainer.betas), s1.run.trainer.prompts_per_step) == (1e-5, [0.9, 0.95], 128)
        assert (s2.run.rollout.n, s2.run.trainer.lr, s2.algo.clip_low, s2.algo.norm_adv_by_std) == (8, 1e-6, 0.2, False)
        assert s1.run.run_dir == s2.run.run_dir == f"runs/{name}"
        if first == "gift":
            assert s1.algo.beta == 20.0
        demo = resolve_stages(load_config(ROOT / f"configs/demo/{name}.yaml"), source=name)
        assert [d.algo.name for d in demo] == [first, "grpo"] and demo[1].algo.norm_adv_by_std is False
    (d,) = resolve_stages(load_config(ROOT / "configs/demo/gift.yaml"), source="demo/gift.yaml")
    assert d.algo.name == "gift"


# --- end to end (last) ---------------------------------------------------------------------------


def test_two_stage_gift_then_grpo_run(tmp_path):
    """configs/demo/gift_then_grpo.yaml, shrunk: 2 GIFT steps, then 2 GRPO steps from stage 1's weights."""
    from safetensors.torch import load_file

    from posttrain.logging import read_metrics
    from posttrain.run import train

    cfg = OmegaConf.load(ROOT / "configs/demo/gift_then_grpo.yaml")
    cfg.model.path = "tiny:hidden=32,layers=1,heads=2,seed=0"
    cfg.data.train = "synthetic:arithmetic?n=64&seed=0"
    cfg.data.eval = None
    cfg.rollout = {"n": 4, "temperature": 1.0, "max_new_tokens": 12, "batch_size": 64}
    cfg.verifier = {"name": "math", "workers": 1, "timeout_s": 10}
    cfg.logging = {"progress": False, "console_every": 1000}
    cfg.run_dir = str(tmp_path / "run")
    cfg.stages[0].trainer = {"steps": 2, "prompts_per_step": 4, "lr": 1e-2, "betas": [0.9, 0.95]}
    # lr 1e-12 in stage 2 (lr must be > 0): an AdamW step of ~1e-12 is below fp32 resolution at these
    # weights, so its final weights must be exactly the weights it started from
    cfg.stages[1].trainer = {"steps": 2, "prompts_per_step": 2, "lr": 1e-12, "weight_decay": 0.0}
    finals = train(cfg, base=None)

    run = tmp_path / "run"
    assert len(finals) == 2
    assert run / "stage0-gift" in finals[0].parents
    assert run / "stage1-grpo" in finals[1].parents
    stage2_cfg = OmegaConf.load(run / "stage1-grpo" / "config.yaml")
    assert stage2_cfg.model.path == str(finals[0])  # stage 2 was pointed at stage 1's final checkpoint

    base = load_file(run / "base-model" / "model.safetensors")
    w1 = load_file(finals[0] / "model.safetensors")
    w2 = load_file(finals[1] / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(w1[name], base[name])  # GIFT moved the weights
    for k in w1:  # ... and GRPO (lr ~0) started from exactly those, not from the base model
        assert torch.equal(w2[k], w1[k]), k

    gift_rows = read_metrics(run / "stage0-gift" / "metrics.jsonl")
    assert len(gift_rows) == 2
    for r in gift_rows:
        for k in ("loss/gift", "gift/kl_to_base", "gift/target_entropy", "gift/topk_overlap", "gift/target_gold_prob", "gift/nll"):
            assert k in r and math.isfinite(r[k]), (k, r)
        assert r["route/sft"] == 1.0 and "loss/sft" not in r
        # β = 10, random base over 100 tokens: q(y*) ≈ e^10/(e^10 + 99) ≈ 0.996, H(q) small but > 0
        assert 0.9 < r["gift/target_gold_prob"] < 1.0 and 0.0 < r["gift/target_entropy"] < 0.2
        assert r["loss/gift"] >= r["gift/target_entropy"]  # CE = H(q) + KL(q‖π_θ)
    # step 1 runs on the base weights: the policy IS the base model
    assert gift_rows[0]["gift/kl_to_base"] == pytest.approx(0.0, abs=1e-5)
    assert gift_rows[0]["gift/topk_overlap"] == pytest.approx(1.0)
    assert gift_rows[1]["gift/kl_to_base"] > 1e-4  # after one update it has moved

    grpo_rows = read_metrics(run / "stage1-grpo" / "metrics.jsonl")
    assert len(grpo_rows) == 2
    assert all("reward/mean" in r and "loss/pg" in r and r["route/rl"] == 1.0 for r in grpo_rows)
    assert not any(k.startswith("gift/") for r in grpo_rows for k in r)


# --- the exact target (paper Eq. 18) and the official code's options ----------------------------------


def test_default_target_is_eq_18_at_p_1e_9_in_float64():
    """β = 10, p_base(y*) = 1e-9, float64 model: q(y*) = p·e^β/(p·e^β + 1 − p) = 2.20260e-5 exactly.

    Read q back from the gradient of ℓ wrt the logits, softmax(z) − q. The official log(p + 1e-10)
    gives 2.42286e-5 (+10 %), and the float32 computation of the old code lost the float64 precision.
    """
    p = 1e-9
    base = torch.tensor([p, 0.5, 0.3, 0.2 - p], dtype=torch.float64)
    z = torch.zeros(1, 1, 4, dtype=torch.float64, requires_grad=True)  # π_θ uniform
    loss = _hook(z, base.log().view(1, 1, 4), torch.tensor([[0]]), _cfg(beta=10.0))
    assert loss.dtype == torch.float64
    loss.sum().backward()
    q = 0.25 - z.grad.view(4)
    gold = p * math.exp(10.0) / (p * math.exp(10.0) + 1 - p)
    assert float(q[0]) == pytest.approx(gold, rel=1e-10) and gold == pytest.approx(2.20260e-5, rel=1e-5)
    assert float(q[1]) == pytest.approx(0.5 / (p * math.exp(10.0) + 1 - p), rel=1e-10)
    # target_form: official keeps the code's guard (computed in float64 too)
    z.grad = None
    _hook(z, base.log().view(1, 1, 4), torch.tensor([[0]]), _cfg(beta=10.0, target_form="official")).sum().backward()
    q_off = 0.25 - z.grad.view(4)
    assert float(q_off[0]) == pytest.approx(1.1e-9 * math.exp(10.0) / (1.1e-9 * math.exp(10.0) + 1 - p + 3e-10), rel=1e-9)
    assert float(q_off[0]) / gold == pytest.approx(1.1, rel=1e-4)


def test_exact_form_is_the_closed_form_and_official_stays_close_at_p_1e_6():
    """BASE4 (p = 1e-6, β = 20): exact = Eq. 18's closed form to 1e-12; the guard's 1e-10 moves p by 1e-4
    relative, so q(y*) by 2e-7 and the non-gold mass by 1e-4 (relative)."""
    p, e = 1e-6, math.exp(20.0)
    closed = torch.tensor([p * e, 0.5, 0.3, 0.2 - p], dtype=torch.float64) / (p * e + 1 - p)
    exact = gift_target(BASE4.log(), torch.tensor(0), beta=20.0, form="exact")
    official = gift_target(BASE4.log(), torch.tensor(0), beta=20.0, form="official")
    assert exact.dtype == official.dtype == torch.float64
    torch.testing.assert_close(exact, closed, rtol=1e-12, atol=0)
    assert float(official[0] / exact[0] - 1) == pytest.approx(2.1e-7, rel=0.05)
    assert float(official[1:].sum() / exact[1:].sum() - 1) == pytest.approx(-1e-4, rel=0.01)


def test_official_aggregation_sums_micro_batch_means():
    # ℓ per token: row 0 [1, 2, 3] (weight 1), row 1 [4] (weight 0.5); sft_coef 0.5.
    # official, one row per micro-batch: 0.5·(6/3 + 0.5·4/1) = 2.0 (invariant: 0.5·(6 + 2)/4 = 1.0)
    pm = make_plugin_manager("gift")
    batch = _metric_batch().with_(sft_weight=torch.tensor([1.0, 0.5]))
    dist = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]], requires_grad=True)
    for agg, expected, grads in (("official", 2.0, [[0.5 / 3] * 3, [0.25, 0.0, 0.0]]),
                                 ("invariant", 1.0, [[0.125] * 3, [0.0625, 0.0, 0.0]])):
        cfg = GIFTConfig(sft_coef=0.5, aggregation=agg)
        dist.grad = None
        total = 0.0
        for r in ([0], [1]):
            mb = batch.select(r)
            o = ModelOutputs(logprobs=torch.zeros(1, 3), distribution_loss=dist[r])
            (term,) = pm.hook.build_loss(batch=mb, outputs=o, mask=mb.response_mask, advantages=torch.zeros(1, 3),
                                         ratio=torch.ones(1, 3), config=cfg, step=0, metrics=None)
            term.value.backward()
            total += float(term.value.detach())
        assert total == pytest.approx(expected)
        torch.testing.assert_close(dist.grad, torch.tensor(grads))


def test_target_form_and_aggregation_validation():
    for bad, words in [({"target_form": "guarded"}, "target_form 'guarded' is not one of exact | official"),
                       ({"aggregation": "sum"}, "aggregation 'sum' is not one of invariant | official")]:
        _, problems = validate_algorithm({"name": "gift", **bad}, GIFTConfig)
        assert any(words in p for p in problems), problems
    assert (GIFTConfig().target_form, GIFTConfig().aggregation) == ("exact", "invariant")
