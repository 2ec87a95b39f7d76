"""Every installed algorithm, core and plugins, passes the conformance run with asynchronous
rollouts (k = 1, pipelined) and its exact-resume check (``posttrain.testing.check_async_run``)."""

import pytest

from posttrain.plugins import ALGORITHMS, installed
from posttrain.testing import PluginContractError, check_async_run, make_tiny_model

NAMES = sorted(installed(ALGORITHMS))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_every_algorithm_is_checked():
    assert {"grpo", "rloo", "reinforce_pp", "cispo", "sft", "dapo", "dypo", "gift", "hpt", "luffy", "srft"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_algorithm_passes_async_k1_and_its_resume(name, model_dir, tmp_path):
    report = check_async_run(name, tmp_path, model_dir=model_dir)
    assert report["changed"]
    rows = report["metrics"]
    if "async/staleness_max" in rows[-1]:  # offline algorithms (sft, gift) sample nothing
        assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]


def test_the_async_resume_check_catches_a_state_that_is_not_saved(model_dir, tmp_path):
    # A producer-side hook whose state is lost on resume: plan_step alternates the prompts per
    # step from a counter that no state_dict covers, so the resumed run plans step 3 differently.
    from posttrain import StepPlan, hookimpl

    class Forgetful:
        def __init__(self):
            self.calls = 0

        @hookimpl
        def on_train_start(self):
            self.calls = 0  # what a resumed run starts from, since no state_dict saves it

        @hookimpl
        def plan_step(self):
            self.calls += 1
            return StepPlan(prompts=4 if self.calls % 2 else 2)

    with pytest.raises(PluginContractError, match=r"after resuming"):
        check_async_run("grpo", tmp_path, model_dir=model_dir, plugins=[Forgetful()])
