"""Supervised fine-tuning on demonstrations, as an offline algorithm (no rollouts).

Loss: token-mean negative log-likelihood of the demonstration tokens over the mini-batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from posttrain import hookimpl
from posttrain.config import GRPOConfig, help_field
from posttrain.types import Needs, Route


@dataclass
class SFTConfig(GRPOConfig):
    name: str = help_field("sft", "Algorithm entry-point name.")
    demos: str = help_field("all", "Which demonstrations of a prompt to train on: all | first | random (one per prompt per step).")
    sft_coef: float = help_field(1.0, "Weight of the NLL.")


@hookimpl
def algorithm_config():
    return SFTConfig


@hookimpl
def requirements(config):
    return Needs(rollouts=False, entropy=config.entropy_coef > 0)


def _stable_index(key: str, n: int) -> int:
    # A hash, not the global RNG, so the choice survives resume and doesn't shift sampling.
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % n


@hookimpl
def route_group(group, config, step):
    k = len(group.demonstrations)
    if k == 0:
        return Route(drop=True)
    if config.demos == "all":
        demos = tuple(range(k))
    elif config.demos == "first":
        demos = (0,)
    elif config.demos == "random":
        demos = (_stable_index(f"{group.example.uid}:{step}", k),)
    else:
        raise ValueError(f"algorithm.demos: '{config.demos}' is not all | first | random")
    return Route(rl=0.0, sft=1.0, demos=demos, members=())
