"""GIFT (Gibbs Initialization with Finite Temperature, arXiv 2601.09233) for posttrain.

An offline SFT-stage loss: at every demonstration position the target is the frozen base
model's next-token distribution tilted by e^β on the demonstration token,
q_t ∝ p_base(·|x, y*_<t)·e^{β·1[· = y*_t]}, and the policy minimises the soft-target
cross-entropy −Σ_k q_t(k) log π_θ(k|·). β → ∞ is SFT. Run it as stage 1 of a GIFT → GRPO
pipeline (``configs/gift_then_grpo.yaml``). The hooks live in ``posttrain_gift.plugin``.
"""
