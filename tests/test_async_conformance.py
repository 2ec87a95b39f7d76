"""Every installed algorithm, core and plugins, passes the conformance run with asynchronous
rollouts (k = 1, pipelined) and its exact-resume check (``posttrain.testing.check_async_run``)."""

import zlib

import pytest

from posttrain import StepPlan, hookimpl
from posttrain.plugins import ALGORITHMS, installed
from posttrain.testing import PluginContractError, check_async_run, make_tiny_model
from posttrain.verify import VerifyResult

NAMES = sorted(installed(ALGORITHMS))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_every_algorithm_is_checked():
    assert {"grpo", "rloo", "reinforce_pp", "cispo", "sft", "dapo", "dypo", "gift", "hpt", "luffy", "srft"} <= set(NAMES)


class HalfHard:
    """A verifier that solves about half of the responses of odd-answer prompts (a CRC coin) and
    none of the others, so DAPO's dynamic sampling has informative groups to keep and refills
    the rest: its extra sampling rounds run in async mode too."""

    @hookimpl
    def register_verifiers(self, register):
        class Verifier:
            def verify(self, items):
                return [VerifyResult(0.0 if int(gold) % 2 == 0 else float(zlib.crc32(text.encode()) % 2 == 0))
                        for text, gold in items]

            def close(self):
                pass

        register("half-hard", lambda config: Verifier())


@pytest.mark.parametrize("name", NAMES)
def test_algorithm_passes_async_k1_and_its_resume(name, model_dir, tmp_path):
    # A random model solves nothing: DAPO would drop every group; the half-hard verifier gives it some.
    extra = {"plugins": [HalfHard()], "overrides": {"verifier.name": "half-hard"}} if name == "dapo" else {}
    report = check_async_run(name, tmp_path, model_dir=model_dir, **extra)
    assert report["changed"]
    rows = report["metrics"]
    if "async/staleness_max" in rows[-1]:  # offline algorithms (sft, gift) sample nothing
        assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]


def test_the_async_resume_check_catches_a_state_that_is_not_saved(model_dir, tmp_path):
    # A producer-side hook whose state is lost on resume: a curriculum that plans 2, 3, 4 prompts
    # for steps 0, 1, 2 from a counter no state_dict covers. Stopped after step 1, the resumed
    # run plans step 2 from a fresh counter: 2 prompts instead of 4.
    class Forgetful:
        def __init__(self):
            self.calls = 0

        @hookimpl
        def on_train_start(self):
            self.calls = 0  # what a resumed run starts from, since nothing saves it

        @hookimpl
        def plan_step(self):
            self.calls += 1
            return StepPlan(prompts=min(4, 1 + self.calls))

    with pytest.raises(PluginContractError, match=r"^state_dict: step 3: .* after resuming, .* without stopping"):
        check_async_run("grpo", tmp_path, model_dir=model_dir, plugins=[Forgetful()])
