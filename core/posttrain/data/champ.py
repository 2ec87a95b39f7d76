"""CHAMP (Mao et al. 2024): 270 competition-level problems with answers, from ``champ-dataset``
1.0.0 (MIT), fetched as a wheel into the posttrain cache (its file is read as JSON; the package's
code is not imported).

``champ:v0``                  → the 85 problems whose answer is a plain number (checkable by the
                                 ``math`` verifier);
``champ:v0?answers=all``      → all 270; many answers are prose ("No", "98 values"), which the
                                 math verifier cannot match, so their scores read low.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..types import Example

DIST, VERSION = "champ-dataset", "1.0.0"
_NUMBER = re.compile(r"-?\d+(\.\d+)?(/\d+)?")


class ChampError(ValueError):
    pass


def make_champ(answers: str = "numeric") -> list[Example]:
    from ..modelzoo import ModelZooError
    from ..modelzoo.pypi import unpacked_wheel

    if answers not in ("numeric", "all"):
        raise ChampError(f"answers must be numeric or all, got {answers!r}")
    try:
        root = unpacked_wheel(DIST, VERSION)
    except ModelZooError as e:
        raise ChampError(str(e)) from e
    with open(root / "champ_dataset" / "dataset_files" / "v0.json", encoding="utf-8") as f:
        problems = json.load(f)["problems"]
    out = []
    for pid, p in problems.items():
        answer = p["_answer"].strip()
        if answers == "numeric" and not _NUMBER.fullmatch(answer):
            continue
        steps = " ".join(s["_text"] for s in p["solution"]["steps"])
        out.append(Example(prompt=p["_text"].strip(), answer=answer, demonstrations=[steps],
                           uid=f"champ:{pid}", meta={"category": p["category"]}))
    return out


def champ_source(spec: str, params: dict[str, Any]) -> list[Example]:
    version = spec.partition("?")[0][len("champ:"):] or "v0"
    if version != "v0":
        raise ChampError(f"unknown CHAMP version '{version}' (available: v0)")
    unknown = set(params) - {"answers"}
    if unknown:
        raise ChampError(f"unknown parameter(s) {sorted(unknown)}; use ['answers']")
    return make_champ(**params)
