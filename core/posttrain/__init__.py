"""posttrain: SFT and RL as one optimisation process, algorithms as plugins.

A plugin imports what it needs from here: ``hookimpl`` to mark hook implementations, the
types that flow through a step, ``GRPOConfig`` to subclass, and ``posttrain.functional``
for the math.
"""

import importlib

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("posttrain")

# Imported on first use: verifier worker processes import this package to find their task
# function and should not pay for torch.
_LAZY = {
    "ConfigError": "config", "GRPOConfig": "config", "help_field": "config", "Metrics": "metrics",
    "Example": "types", "LossTerm": "types", "ModelOutputs": "types", "Needs": "types", "PromptGroup": "types",
    "Route": "types", "Totals": "types", "Trajectory": "types", "TrainBatch": "types",
    "RolloutRequest": "types", "StepPlan": "types", "GroupSelection": "types",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
