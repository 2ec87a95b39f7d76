"""LUFFY (Learning to Reason under Off-Policy Guidance, arXiv 2504.14945) for posttrain.

Each prompt's group is n on-policy rollouts plus ``n_off`` demonstrations as off-policy
members; the advantage is centred over the mixed group, and demonstration tokens are trained
with π_ref ≡ 1 and the policy shaping f(p) = p/(p + γ). The hooks live in
``posttrain_luffy.plugin``.
"""
