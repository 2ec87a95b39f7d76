"""DYPO (Dynamic Policy Optimization, arXiv 2604.08926) for posttrain.

Each prompt is graded by its k on-policy rollouts: easy (all correct) prompts are dropped,
hard (none correct) prompts are trained with SFT on one demonstration drawn uniformly from
the prompt's teachers, mid prompts with α·GRPO + (1−α)·GAL, a DPO-shaped loss over the
group's success/failure pairs. The hooks live in ``posttrain_dypo.plugin``.
"""
