"""DAPO (Yu et al. 2025, arXiv 2503.14476) for posttrain.

GRPO with decoupled clip bounds (clip-higher), dynamic sampling (only groups whose rollouts
disagree train; the step draws more prompts until it has a full batch), the token-level loss,
and overlong reward shaping. The hooks live in ``posttrain_dapo.plugin``.
"""
