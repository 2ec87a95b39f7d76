"""Evaluation: pass@k (unbiased) / avg@k / maj@k on benchmark files, reports and plots.

``posttrain eval --model DIR --benchmarks NAME ...`` runs ``run_eval``; the engine's periodic
evaluation uses ``evaluate_benchmarks_in_training``. ``heldout.evaluate_accuracy`` is the
held-out accuracy on ``data.eval`` that training reports as ``eval/accuracy``.
"""

from .answers import AnswerExtractor, math_answer_key
from .benchmarks import BenchmarkSpec, Problem, load_benchmarks, load_problems, load_spec, shuffle_options
from .command import run_eval
from .metrics import avg_at_k, maj_at_k, pass_at_k, problem_metrics
from .options import EvalOptions
from .runner import Prompting, evaluate_benchmarks_in_training, generate_records, score

__all__ = [
    "AnswerExtractor", "math_answer_key", "BenchmarkSpec", "Problem", "load_benchmarks", "load_problems", "load_spec", "shuffle_options",
    "run_eval", "avg_at_k", "maj_at_k", "pass_at_k", "problem_metrics", "EvalOptions", "Prompting",
    "evaluate_benchmarks_in_training", "generate_records", "score",
]
