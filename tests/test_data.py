"""Data loading with field mapping, errors that name file/line/field, templates, sampler, synthetic task."""

import json

import pytest

from posttrain.data import DataError, PromptSampler, load_examples, make_arithmetic, render_prompt, write_jsonl
from posttrain.testing import tiny_tokenizer


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_field_mapping_and_teachers(tmp_path):
    src = _jsonl(tmp_path / "train.jsonl", [
        {"q": "1+1=", "a": 2, "r1": "two", "qwen": ["2", "it is 2"], "extra": 7},
        "",
        {"q": "2+2=", "a": "4", "r1": "four", "qwen": "4"},
    ])
    ex = load_examples(src, prompt_key="q", answer_key="a", demo_keys=["r1", "qwen"])
    assert [e.prompt for e in ex] == ["1+1=", "2+2="]
    assert ex[0].answer == "2"  # numbers become strings
    assert ex[0].demonstrations == ["two", "2", "it is 2"]
    assert ex[1].demonstrations == ["four", "4"]
    assert ex[0].uid == "train.jsonl:1" and ex[1].uid == "train.jsonl:3"
    assert ex[0].meta == {"extra": 7}


@pytest.mark.parametrize("row, message", [
    ('{"prompt": "1+1=", "answer": 2', "train.jsonl:2: not valid JSON"),
    ({"prompt": "1+1="}, "train.jsonl:2: field 'answer' is missing"),
    ({"prompt": ["1+1="], "answer": "2"}, "train.jsonl:2: field 'prompt' must be a string, got list"),
    ({"prompt": "  ", "answer": "2"}, "train.jsonl:2: field 'prompt' is empty"),
    ({"prompt": "1+1=", "answer": "2", "demo": [3]}, "train.jsonl:2: field 'demo'[0] must be a non-empty string, got int"),
    ([1, 2], "train.jsonl:2: expected a JSON object, got list"),
])
def test_malformed_row_names_file_line_and_field(tmp_path, row, message):
    src = _jsonl(tmp_path / "train.jsonl", [{"prompt": "0+0=", "answer": "0", "demo": "0"}, row])
    with pytest.raises(DataError) as e:
        load_examples(src, demo_keys="demo")
    assert message in str(e.value)


def test_missing_demo_field_and_missing_file(tmp_path):
    src = _jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(DataError, match="t.jsonl:1: field 'target' \\(a data.demo_keys entry\\) is missing"):
        load_examples(src, demo_keys=["target"])
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown format '.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_examples(str(tmp_path / "x.csv"))


def test_parquet_and_datasets_dir(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"problem": ["1+2=", "3+4="], "solution": ["3", "7"], "target": ["\\boxed{3}", "\\boxed{7}"]}
    pq.write_table(pa.table(rows), tmp_path / "t.parquet")
    ex = load_examples(str(tmp_path / "t.parquet"), prompt_key="problem", answer_key="solution", demo_keys="target")
    assert [(e.prompt, e.answer, e.demonstrations, e.uid) for e in ex] == [
        ("1+2=", "3", ["\\boxed{3}"], "t.parquet:row 0"), ("3+4=", "7", ["\\boxed{7}"], "t.parquet:row 1")]
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    ex2 = load_examples(str(tmp_path / "ds"), prompt_key="problem", answer_key="solution", demo_keys="target")
    assert [e.answer for e in ex2] == ["3", "7"]
    pq.write_table(pa.table({"problem": ["1+2="], "solution": [None]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet:row 0: field 'solution' is missing"):
        load_examples(str(tmp_path / "bad.parquet"), prompt_key="problem", answer_key="solution")


def test_synthetic_task():
    a = make_arithmetic(300, seed=3)
    assert [e.prompt for e in a] == [e.prompt for e in make_arithmetic(300, seed=3)]  # deterministic
    for e in a:
        x, op, y = e.meta["a"], e.meta["op"], e.meta["b"]
        assert e.prompt == f"{x}{op}{y}="
        assert int(e.answer) == (x + y if op == "+" else x - y)
        terse, steps = e.demonstrations
        assert terse != steps
        assert terse.endswith(f"\\boxed{{{e.answer}}}") and steps.endswith(f"\\boxed{{{e.answer}}}")
    ev = make_arithmetic(100, seed=3, split="eval")
    assert not {e.prompt for e in a} & {e.prompt for e in ev}  # held-out problems never in train
    assert {len(str(e.meta["a"])) for e in a} == {1, 2}  # a difficulty mix


def test_synthetic_spec_and_jsonl_round_trip(tmp_path):
    ex = load_examples("synthetic:arithmetic?n=5&seed=1&ops=+&max_digits=1")
    assert len(ex) == 5 and all("+" in e.prompt and int(e.answer) <= 18 for e in ex)
    with pytest.raises(DataError, match="unknown parameter"):
        load_examples("synthetic:arithmetic?n=5&digits=3")
    path = write_jsonl(ex, tmp_path / "a.jsonl")
    back = load_examples(str(path), demo_keys="demos")
    assert [(e.prompt, e.answer, e.demonstrations) for e in back] == [(e.prompt, e.answer, e.demonstrations) for e in ex]


def test_sampler_resume_is_exact():
    ex = make_arithmetic(10, seed=0)
    s = PromptSampler(ex, batch_size=4, seed=7)
    [s.next_batch() for _ in range(3)]  # crosses an epoch boundary (12 > 10)
    state = s.state_dict()
    after = [[e.uid for e in s.next_batch()] for _ in range(3)]
    r = PromptSampler(ex, batch_size=4, seed=7)
    r.load_state_dict(state)
    assert [[e.uid for e in r.next_batch()] for _ in range(3)] == after
    assert state["epoch"] == 1
    first_epoch = [e.uid for e in PromptSampler(ex, batch_size=10, seed=7).next_batch()]
    assert sorted(first_epoch) == sorted(e.uid for e in ex)  # every prompt once per epoch


def test_render_prompt_template_and_chat(tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert render_prompt(tok, "1+1=") == "Q: 1+1=\nA: "
    assert render_prompt(tok, "1+1=", system_prompt="Be brief.") == "Be brief.\nQ: 1+1=\nA: "
    tpl = "Question:\n{prompt}\nAnswer: put it in \\boxed{}."
    assert render_prompt(tok, "1+1=", template=tpl) == "Question:\n1+1=\nAnswer: put it in \\boxed{}."
    with pytest.raises(ValueError, match="must contain"):
        render_prompt(tok, "x", template="no placeholder")
    tok.chat_template = None
    with pytest.raises(ValueError, match="set data.template"):
        render_prompt(tok, "x")


def test_demonstration_values_per_token_fields(tmp_path):
    """A row's per-token field (e.g. a teacher's log-probs) for one demonstration: one list, or one per
    demonstration; its length must be the tokenized demonstration's (a cut demonstration keeps the first)."""
    from posttrain.data import demonstration_values

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a", "d": ["x", "y"], "lp": [[-1, -2], [-3, -4, -5]]}) + "\n")
    (ex,) = load_examples(str(path), demo_keys="d")
    assert demonstration_values(ex, "lp", 1, 3) == [-3.0, -4.0, -5.0]
    assert demonstration_values(ex, "lp", 1, 2, truncated=True) == [-3.0, -4.0]  # cut at data.max_demo_tokens
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'lp'\[1\] has 3 values, the demonstration is 2 tokens"):
        demonstration_values(ex, "lp", 1, 2)
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'lp' has 2 lists, demonstration 2 needs its own"):
        demonstration_values(ex, "lp", 2, 2)
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'nope' is missing \(fields: lp\)"):
        demonstration_values(ex, "nope", 0, 2)
