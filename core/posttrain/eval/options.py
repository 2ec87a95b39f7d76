"""Options of ``posttrain eval``: ``key=value`` overrides over ``EvalOptions``, plus
``<benchmark>.<field>=value`` for one benchmark's YAML fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import ConfigError, RolloutConfig, VerifierConfig, help_field
from .benchmarks import BenchmarkSpec, _did_you_mean

# Benchmark fields a bare key=value sets on every benchmark.
SHARED_BENCHMARK_FIELDS = ("n", "k", "temperature", "top_p", "max_new_tokens", "max_problems")


@dataclass
class EvalOptions:
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # engine, batch_size, engine extras; sampling comes from each benchmark
    verifier: VerifierConfig = field(default_factory=VerifierConfig)  # timeout_s, workers; the name comes from each benchmark
    dtype: str = help_field("float32", "Weights dtype: float32 | bfloat16 | float16.")
    device: str = help_field("auto", "auto | cpu | cuda.")
    template: Optional[str] = help_field(None, "Prompt template with {prompt} (as data.template in training); None: the chat template.")
    system_prompt: Optional[str] = help_field(None, "System message for the chat template (as data.system_prompt in training).")
    seed: int = help_field(0, "Sampling seed (each chunk of problems is seeded from it).")
    chunk_problems: int = help_field(32, "Problems per generate call; their generations are saved when the chunk is verified.")
    progress: bool = help_field(True, "Progress bars.")
    extensions: list = help_field([], "Extension plugins (they may register rollout engines and verifiers).")
    n: Optional[int] = help_field(None, "Samples per problem for every benchmark (k values above it are dropped unless k is set).")
    k: Optional[list] = help_field(None, "k values for every benchmark.")
    temperature: Optional[float] = help_field(None, "Sampling temperature for every benchmark.")
    top_p: Optional[float] = help_field(None, "Nucleus mass for every benchmark.")
    max_new_tokens: Optional[int] = help_field(None, "Response cap for every benchmark.")
    max_problems: Optional[int] = help_field(None, "First this many problems of every benchmark.")

    def shared_overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SHARED_BENCHMARK_FIELDS if getattr(self, k) is not None}


def parse_overrides(overrides: list[str], benchmark_names: list[str]) -> tuple[EvalOptions, dict[str, dict[str, Any]]]:
    """(options, {benchmark name: {field: value}}); every problem reported at once."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError([f"override {o!r} is not key=value" for o in bad], "command line")
    try:
        tree = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError([str(e).splitlines()[0]], "command line") from e
    per_bench = {name: tree.pop(name) for name in list(tree) if name in benchmark_names}
    problems = []
    names = [f.name for f in dataclasses.fields(EvalOptions)]
    bench_fields = [f.name for f in dataclasses.fields(BenchmarkSpec)]
    for key in tree:
        if key not in names:
            problems.append(f"{key}: unknown option.{_did_you_mean(key, names + benchmark_names)}")
    for section, schema in (("rollout", RolloutConfig), ("verifier", VerifierConfig)):
        sub = [f.name for f in dataclasses.fields(schema)]
        for key in tree.get(section) or {}:
            if key not in sub:
                problems.append(f"{section}.{key}: unknown option.{_did_you_mean(key, sub)}")
    for key in set(tree.get("rollout") or {}) & {"n", "temperature", "top_p", "max_new_tokens"}:
        problems.append(f"rollout.{key}: sampling is set per benchmark; use {key}=... (every benchmark) or NAME.{key}=...")
    for name, fields in per_bench.items():
        for key in fields if isinstance(fields, dict) else ["(value)"]:
            if key not in bench_fields:
                problems.append(f"{name}.{key}: not a benchmark field.{_did_you_mean(str(key), bench_fields)}")
    if problems:
        raise ConfigError(problems, "command line")
    try:
        opts: EvalOptions = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalOptions), tree))
    except OmegaConfBaseException as e:
        raise ConfigError([f"{getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}"], "command line") from e
    if opts.chunk_problems < 1:
        raise ConfigError([f"chunk_problems: must be >= 1, got {opts.chunk_problems}"], "command line")
    return opts, per_bench
