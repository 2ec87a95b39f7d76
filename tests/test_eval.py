"""Evaluation: the estimators against hand-computed numbers, benchmark loading (field mapping,
option shuffling, errors), and `posttrain eval` end to end (tiny model, and a scripted engine
whose answers make every metric a known non-zero number)."""

import json
import math
import re
from pathlib import Path

import pytest

from posttrain import hookimpl
from posttrain.cli import main
from posttrain.data import DataError
from posttrain.eval import avg_at_k, load_problems, load_spec, maj_at_k, pass_at_k, problem_metrics, run_eval, score
from posttrain.eval.benchmarks import BENCHMARK_DIR, LETTERS
from posttrain.eval.command import model_labels, resolve_model
from posttrain.eval.report import markdown_table
from posttrain.rollout import SamplingParams
from posttrain.testing import make_tiny_model
from posttrain.types import Trajectory

SAMPLES = BENCHMARK_DIR / "samples"


# --- estimators --------------------------------------------------------------------------------


def test_pass_at_k_hand_values():
    # n=5, c=2: 1 − C(3,k)/C(5,k) = 1 − 3/5·…: k=1 → 2/5, k=2 → 1 − 3/10, k=3 → 1 − 1/10, then 1.
    assert [pass_at_k(5, 2, k) for k in range(1, 6)] == pytest.approx([0.4, 0.7, 0.9, 1.0, 1.0], abs=1e-12)
    assert [pass_at_k(5, 0, k) for k in range(1, 6)] == [0.0] * 5
    assert [pass_at_k(5, 5, k) for k in range(1, 6)] == [1.0] * 5


def test_pass_at_k_matches_exact_binomials_where_they_overflow_floats():
    for n, c, k in [(200, 17, 50), (1024, 1, 1), (1024, 3, 512), (64, 60, 3)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python ints: exact, then one division
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert pass_at_k(1024, 1, 1) == pytest.approx(1 / 1024)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_avg_and_maj_at_k_on_hand_made_samples():
    correct = [1, 0, 1, 1, 0, 0]
    # blocks of k: k=2 → [1,0],[1,1],[0,0] → (.5+1+0)/3; k=4 → only the first block [1,0,1,1]
    assert [avg_at_k(correct, k) for k in (1, 2, 3, 4)] == pytest.approx([0.5, 0.5, 0.5, 0.75])

    answers = ["5", "3", "3", "5", "7", None]  # gold is 5
    correct = [a == "5" for a in answers]
    assert maj_at_k(correct, answers, 1) == pytest.approx(2 / 6)
    # k=2: ["5","3"] tie → first seen "5" ✓; ["3","5"] → "3" ✗; ["7",None] → "7" ✗ (None does not vote)
    assert maj_at_k(correct, answers, 2) == pytest.approx(1 / 3)
    # k=3: ["5","3","3"] → "3" ✗; ["5","7",None] → tie → "5" ✓
    assert maj_at_k(correct, answers, 3) == pytest.approx(0.5)
    # k=6: 5 and 3 have two votes each, 5 came first
    assert maj_at_k(correct, answers, 6) == 1.0
    assert maj_at_k([False, False], [None, None], 2) == 0.0  # nobody answered


def test_pass_at_1_equals_avg_at_1_and_per_problem_keys():
    correct, answers = [1, 1, 0, 1, 0, 0, 0, 1], ["a", "a", "b", "a", "c", "b", "b", "a"]
    m = problem_metrics(correct, answers, [1, 2, 4, 8])
    assert m["pass@1"] == pytest.approx(m["avg@1"]) and m["avg@1"] == 0.5
    assert m["pass@8"] == 1.0 and m["avg@8"] == pytest.approx(0.5)
    assert m["maj@8"] == 1.0  # "a" has 4 votes
    assert m["pass@2"] == pytest.approx(1 - math.comb(4, 2) / math.comb(8, 2))


# --- benchmarks --------------------------------------------------------------------------------


def _source_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _option_texts(prompt: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-J])\. (.*)$", prompt, re.MULTILINE))


def test_option_shuffling_keeps_the_right_answer_and_is_deterministic():
    spec, path = load_spec("sample_choice")
    problems = load_problems(spec, path)
    rows = _source_rows(SAMPLES / "choice.jsonl")
    assert len(problems) == len(rows) == 8
    moved = 0
    for p, row in zip(problems, rows):
        right_text = row["options"][LETTERS.index(row["answer"])]
        opts = _option_texts(p.text)
        assert sorted(opts.values()) == sorted(row["options"])  # same options, possibly reordered
        assert opts[p.gold] == right_text  # the remapped letter still names the right answer
        moved += p.gold != row["answer"]
    assert moved >= 4  # the shuffle really moves answers (8 questions, 4 options each)
    again = load_problems(spec, path)
    assert [(p.text, p.gold) for p in again] == [(p.text, p.gold) for p in problems]
    other = load_problems(load_spec("sample_choice", {"seed": 1})[0], path)
    assert [p.text for p in other] != [p.text for p in problems]
    plain = load_problems(load_spec("sample_choice", {"shuffle_options": False})[0], path)
    assert [p.gold for p in plain] == [r["answer"] for r in rows]


def test_choice_answers_as_index_text_and_arc_labels(tmp_path):
    rows = [
        {"q": "one?", "opts": {"label": ["1", "2", "3"], "text": ["x", "y", "z"]}, "ans": "2"},  # ARC's digit labels
        {"q": "two?", "opts": ["x", "y", "z"], "ans": 2},  # 0-based index
        {"q": "three?", "opts": ["x", "y", "z"], "ans": "y"},  # the option's text
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = tmp_path / "mc.yaml"
    yaml.write_text(f"file: {data}\nkind: choice\nproblem_key: q\noptions_key: opts\nanswer_key: ans\nshuffle_options: false\n")
    spec, path = load_spec(str(yaml))
    assert [p.gold for p in load_problems(spec, path)] == ["B", "C", "B"]


def test_math_field_mapping_with_nested_keys_and_list_gold(tmp_path):
    data = tmp_path / "m.jsonl"
    data.write_text(json.dumps({"p": "1+1=", "rm": {"gt": ["2"]}}) + "\n")
    yaml = tmp_path / "m.yaml"
    yaml.write_text(f"file: m.jsonl\nproblem_key: p\nanswer_key: rm.gt\nprompt: 'Solve: {{problem}}'\n")  # beside the YAML
    spec, path = load_spec(str(yaml))
    [p] = load_problems(spec, path)
    assert (p.text, p.gold, p.uid) == ("Solve: 1+1=", "2", "m.jsonl:1")


def test_bad_input_errors_name_file_line_and_field(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"problem": "1+1=", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2="}) + "\n")
    yaml = tmp_path / "bad.yaml"
    yaml.write_text(f"file: {data}\n")
    spec, path = load_spec(str(yaml))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'answer' is missing \(fields: problem\)"):
        load_problems(spec, path)

    data.write_text(json.dumps({"question": "q", "options": ["a", "b"], "answer": "Z"}) + "\n")
    yaml.write_text(f"file: {data}\nkind: choice\nproblem_key: question\noptions_key: options\n")
    spec, path = load_spec(str(yaml))
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'answer' = 'Z' is not a letter"):
        load_problems(spec, path)

    yaml.write_text(f"file: {data}\nkind: chioce\nn: 2\nk: [1, 4]\nproblme_key: x\n")
    assert main(["eval", "--model", str(tmp_path), "--benchmarks", str(yaml)]) == 2
    err = capsys.readouterr().err
    assert "problme_key: unknown key. Did you mean 'problem_key'?" in err
    yaml.write_text(f"file: {data}\nkind: chioce\nn: 2\nk: [1, 4]\n")
    assert main(["eval", "--model", str(tmp_path), "--benchmarks", str(yaml)]) == 2
    err = capsys.readouterr().err
    assert "kind: 'chioce' is not math | choice" in err and "k: every k must be an integer in [1, n=2], got [1, 4]" in err

    assert main(["eval", "--model", str(tmp_path), "--benchmarks", "math5000"]) == 2
    assert "unknown benchmark 'math5000'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--benchmarks", "sample_math", "temprature=0"]) == 2
    assert "temprature: unknown option. Did you mean 'temperature'?" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--benchmarks", "sample_math", "rollout.n=8", "sample_math.nn=2"]) == 2
    err = capsys.readouterr().err
    assert "rollout.n: sampling is set per benchmark; use n=... (every benchmark) or NAME.n=..." in err
    assert "sample_math.nn: not a benchmark field. Did you mean 'n'?" in err
    assert main(["eval", "--model", str(tmp_path / "nope"), "--benchmarks", "sample_math"]) == 2
    assert "neither a model directory" in capsys.readouterr().err


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _check_consistent(out: Path, model: str, bench: str, ks: list[int]) -> dict:
    res = json.loads((out / "results.json").read_text())["results"][model][bench]
    records = [json.loads(l) for l in (out / "generations" / model / f"{bench}.jsonl").read_text().splitlines()]
    assert res == pytest.approx(score(records, ks))  # the report is exactly what the generations say
    assert res["pass@1"] == pytest.approx(res["avg@1"])
    return res


def test_posttrain_eval_end_to_end_on_the_tiny_model(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tiny), "--benchmarks", "sample_math", "sample_choice", "n=2", "max_new_tokens=6",
            "max_problems=3", "verifier.workers=1", "progress=false", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["generated"] == {"tiny": {"sample_math": 3, "sample_choice": 3}}
    assert payload["benchmarks"]["sample_math"]["k"] == [1, 2]  # n=2 dropped k=4
    for bench in ("sample_math", "sample_choice"):
        res = _check_consistent(out, "tiny", bench, [1, 2])
        assert res["problems"] == 3 and res["samples"] == 6
        assert 0 <= res["pass@1"] <= res["pass@2"] <= 1
    md = (out / "results.md").read_text()
    assert "| Model | sample_math (avg@2) | sample_choice (avg@2) | Avg. |" in md
    assert re.search(r"^\| tiny \| \d+\.\d \| \d+\.\d \| \d+\.\d \|$", md, re.MULTILINE)
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tiny |" in capsys.readouterr().out  # the table is printed too

    before = (out / "generations" / "tiny" / "sample_math.jsonl").read_text()
    assert main(argv) == 0  # a re-run reuses every finished generation
    again = json.loads((out / "results.json").read_text())
    assert again["generated"] == {"tiny": {"sample_math": 0, "sample_choice": 0}}
    assert again["results"] == payload["results"]
    assert (out / "generations" / "tiny" / "sample_math.jsonl").read_text() == before


class Scripted:
    """A rollout engine answering from a script keyed by the problem, so every metric has a
    known value. Choice questions are answered by the right option's *text*, read off the
    shuffled prompt, which checks that the remapped gold letter is the one the prompt shows."""

    MATH = {"3+4=": ["\\boxed{7}"] * 4,
            "12+7=": ["\\boxed{19}", "\\boxed{18}", "so 18", "no idea"],
            "25-13=": ["\\boxed{3}"] * 4}
    calls = 0
    hook = None  # called with every decoded prompt

    def __init__(self, model, tokenizer, config):
        self.tokenizer = tokenizer
        self.right = {r["question"]: r["options"][LETTERS.index(r["answer"])] for r in _source_rows(SAMPLES / "choice.jsonl")}

    def generate(self, prompts, params: SamplingParams, *, progress=False):
        Scripted.calls += 1
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if Scripted.hook:
                Scripted.hook(text)
            key = next((k for k in self.MATH if f"{k}\n" in text), None)
            if key is not None:
                texts = self.MATH[key][:params.n]
            else:
                right = next(v for q, v in self.right.items() if q in text)
                # (the tiny char tokenizer reads "\n\n" as one unknown token, so match within lines)
                letter = next(l for l in LETTERS if re.search(rf"{l}\. {re.escape(right)}(\n|Answer)", text))
                texts = [f"The answer is \\boxed{{{letter}}}"] * params.n
            out.append([Trajectory(response_ids=[5] * len(t), text=t, finished=True) for t in texts])
        return out


class ScriptedPlugin:
    @hookimpl
    def register_rollout_engines(self, register):
        register("scripted", Scripted)


def test_eval_numbers_with_a_scripted_engine_and_resume(tiny, tmp_path):
    out = tmp_path / "out"
    args = dict(overrides=["rollout.engine=scripted", "max_problems=3", "verifier.workers=1", "progress=false"],
                plugins=[ScriptedPlugin()])
    payload = run_eval([str(tiny)], ["sample_math", "sample_choice"], out, **args)
    m = payload["results"]["tiny"]["sample_math"]
    # c per problem: 4, 1, 0 of n=4; answers 19 ✓, 18 ✗ ×2 ("so 18" is 18 too), none
    assert m["pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert m["pass@2"] == pytest.approx((1 + (1 - math.comb(3, 2) / math.comb(4, 2)) + 0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["avg@1"] == m["avg@2"] == m["avg@4"] == pytest.approx(m["pass@1"])
    assert m["maj@2"] == pytest.approx((1 + 0.5 + 0) / 3)  # [19, 18] tie → 19 ✓; [18, none] → 18 ✗
    assert m["maj@4"] == pytest.approx(1 / 3)  # 18 outvotes 19
    c = payload["results"]["tiny"]["sample_choice"]
    assert c["pass@1"] == c["avg@4"] == c["maj@4"] == 1.0
    _check_consistent(out, "tiny", "sample_math", [1, 2, 4])

    calls = Scripted.calls
    again = run_eval([str(tiny)], ["sample_math", "sample_choice"], out, **args)
    assert Scripted.calls == calls and again["results"] == payload["results"]  # nothing generated
    # A crash mid-write leaves a torn last line: that problem alone is generated again.
    gen = out / "generations" / "tiny" / "sample_choice.jsonl"
    text = gen.read_text()
    gen.write_text(text[: len(text) - 40])
    torn = run_eval([str(tiny)], ["sample_choice"], out, **args)
    assert torn["generated"]["tiny"]["sample_choice"] == 1 and Scripted.calls == calls + 1
    assert torn["results"]["tiny"]["sample_choice"] == payload["results"]["tiny"]["sample_choice"]
    assert len(gen.read_text().splitlines()) == 3
    fresh = run_eval([str(tiny)], ["sample_choice"], out, resume="never", **args)
    assert fresh["generated"]["tiny"]["sample_choice"] == 3 and Scripted.calls == calls + 2


def test_benchmarks_are_evaluated_during_training_and_logged(tiny, tmp_path):
    from posttrain.logging import read_metrics
    from posttrain.run import train
    from posttrain.testing import tiny_config

    over = {"algorithm.name": "sft", "data.eval": "synthetic:arithmetic?n=2&split=eval", "eval.max_prompts": 2,
            "data.template": "Problem: {prompt}\nAnswer:",
            "eval.max_new_tokens": 4, "eval.benchmarks": ["sample_choice"], "verifier.name": "choice"}
    train(tiny_config(tiny, tmp_path / "run", algorithm="sft", steps=1, overrides=over), base=None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for row in (rows[0], rows[-1]):  # before training (step 0) and after the last step
        assert row["eval/sample_choice/pass@1"] == pytest.approx(row["eval/sample_choice/avg@1"])
        assert {f"eval/sample_choice/{m}@{k}" for m in ("pass", "avg", "maj") for k in (1, 2, 4)} <= set(row)
        assert row["eval/sample_choice/response_length"] <= 4  # eval.max_new_tokens caps benchmarks too
    assert [r["step"] for r in rows] == [0, 1]
    # A run directory given to `posttrain eval --model` means its newest checkpoint.
    assert resolve_model(str(tmp_path / "run")).name == "step-000001"
    assert model_labels([str(tmp_path / "run" / "checkpoints" / "step-000001"), "a/tiny", "b/tiny"]) == \
        ["run/step-000001", "a/tiny", "b/tiny"]
    # ... and is asked with the run's data.template (Scripted sees the rendered prompt).
    seen = []
    Scripted.hook = seen.append
    try:
        run_eval([str(tmp_path / "run")], ["sample_choice"], tmp_path / "ev", plugins=[ScriptedPlugin()],
                 overrides=["rollout.engine=scripted", "max_problems=1", "n=1", "progress=false"])
    finally:
        Scripted.hook = None
    assert seen and seen[0].startswith("Problem: Which planet is closest to the Sun?")


def test_benchmarks_alone_trigger_evaluation_without_a_held_out_split(tiny, tmp_path):
    from posttrain.logging import read_metrics
    from posttrain.run import train
    from posttrain.testing import tiny_config

    over = {"algorithm.name": "sft", "data.eval": None, "eval.max_new_tokens": 4, "eval.max_prompts": 2,
            "eval.benchmarks": ["sample_choice"], "verifier.name": "choice"}
    train(tiny_config(tiny, tmp_path / "run", algorithm="sft", steps=1, overrides=over), base=None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]  # scored before training and after the last step
    for row in rows:
        assert row["eval/sample_choice/pass@1"] == pytest.approx(row["eval/sample_choice/avg@1"])
        assert "eval/accuracy" not in row  # no data.eval: no held-out accuracy is invented


def test_markdown_table_rows_are_models_columns_benchmarks():
    results = {"base": {"aime24": {"avg@32": 0.1}, "math500": {"avg@1": 0.5}}, "hpt": {"aime24": {"avg@32": 0.33333}}}
    md = markdown_table(results, {"aime24": "avg@32", "math500": "avg@1"})
    assert md.splitlines() == [
        "| Model | aime24 (avg@32) | math500 (avg@1) | Avg. |",
        "|---|---:|---:|---:|",
        "| base | 10.0 | 50.0 | 30.0 |",
        "| hpt | 33.3 | – | – |",
    ]
