"""GRPO (Shao et al. 2024): group-normalised outcome reward, PPO-clipped policy gradient.

Everything GRPO does is the default behaviour in ``posttrain.algorithms.defaults``, so this plugin
overrides nothing; it exists so ``algorithm: {name: grpo}`` resolves like any other name.
Dr.GRPO is ``norm_adv_by_std: false`` with ``loss_agg: seq-mean-token-sum-norm``; DAPO's
clip-higher is ``clip_high: 0.28``; GSPO is ``ratio_level: sequence``.
"""
