"""SRFT (Fu et al., "SRFT: A Single-Stage Method with Supervised and Reinforcement Fine-Tuning
for Reasoning", arXiv 2506.19767) as a posttrain algorithm plugin: the hooks live in
``posttrain_srft.plugin``; select it with ``algorithm: {name: srft}``."""
