"""HPT (Hybrid Post-Training, arXiv 2509.04419) for posttrain.

Per prompt, the count of correct on-policy rollouts gates the loss: SFT on the prompt's
demonstration when at most ``gate_max_correct`` of the n rollouts are correct, Dr.GRPO on the
rollouts otherwise. The hooks live in ``posttrain_hpt.plugin``.
"""
