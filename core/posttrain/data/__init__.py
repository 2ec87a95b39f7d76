"""Prompts, answers and demonstrations: loading, templating, sampling, and a synthetic task."""

from .loading import DataError, demonstration_values, load_examples
from .sampler import PromptSampler
from .synthetic import make_arithmetic, write_jsonl
from .templates import render_prompt

__all__ = ["DataError", "demonstration_values", "load_examples", "PromptSampler", "make_arithmetic", "write_jsonl", "render_prompt"]
