"""posttrain.verify: the worker pool's timeout/crash handling, the math verifier, exact and choice.

Pool tests use one generic task function, ``CALL`` (``task()``), with tasks that are picklable
stdlib partials — ``partial(time.sleep, 30)`` hangs, ``partial(os._exit, 3)`` kills its worker,
``partial(int, "x")`` raises — so no test-only hook lives in the library and the children never
have to import this test module.
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import operator
import os
import time
from functools import partial

import pytest

from posttrain.config import VerifierConfig
from posttrain.verify import (
    BUILTIN_VERIFIERS, ChoiceVerifier, ExactVerifier, MathVerifier, Verifier, VerifyResult, WorkerPool, build_verifier,
)
from posttrain.verify.simple import extract_choice, extract_final_answer, last_boxed

CALL = operator.methodcaller("__call__")  # fn(task) = task()
HANG = r"\boxed{9^{9^{9^{9^{9}}}}}"  # math-verify never returns on this without a timeout


def _alive(pids: list[int]) -> list[int]:
    return [p.pid for p in mp.active_children() if p.pid in pids]


# --- WorkerPool --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool(CALL, workers=2, timeout_s=2.0)
    yield p
    p.close()


def test_pool_map_keeps_order(pool):
    out = pool.map([partial(math.sqrt, x * x) for x in range(10)])
    assert [o.status for o in out] == ["ok"] * 10
    assert [o.value for o in out] == [float(x) for x in range(10)]


def test_pool_empty_map_starts_nothing():
    p = WorkerPool(CALL, workers=2, timeout_s=1.0)
    assert p.map([]) == []
    assert p.pids == []
    p.close()


def test_pool_hung_task_is_killed_and_replaced(pool):
    pool.map([partial(math.sqrt, 1)] * 2)  # workers up, so start-up is not part of the timing
    before = dict(pool.stats)
    t = time.monotonic()
    out = pool.map([partial(time.sleep, 60), partial(math.sqrt, 4), partial(math.sqrt, 9), partial(math.sqrt, 16)])
    assert time.monotonic() - t < 10
    assert [o.status for o in out] == ["timeout", "ok", "ok", "ok"]
    assert [o.value for o in out[1:]] == [2.0, 3.0, 4.0]
    assert pool.stats["timeouts"] - before["timeouts"] == 1
    assert pool.stats["restarts"] - before["restarts"] == 1
    # The replacement serves the next batch.
    assert [o.value for o in pool.map([partial(math.sqrt, 25)] * 3)] == [5.0] * 3
    assert len(pool.pids) == 2


def test_pool_crashed_worker_gives_error_and_is_replaced(pool):
    pool.map([partial(math.sqrt, 1)] * 2)
    old = set(pool.pids)
    out = pool.map([partial(math.sqrt, 4), partial(os._exit, 3), partial(math.sqrt, 9)])
    assert [o.status for o in out] == ["ok", "error", "ok"]
    assert "exit code 3" in out[1].error
    assert len(pool.pids) == 2 and set(pool.pids) != old
    assert pool.map([partial(math.sqrt, 49)])[0].value == 7.0


def test_pool_raising_task_keeps_its_worker(pool):
    pool.map([partial(math.sqrt, 1)] * 2)
    pids, restarts = set(pool.pids), pool.stats["restarts"]
    out = pool.map([partial(int, "x"), partial(math.sqrt, 4)])
    assert out[0].status == "error" and "ValueError" in out[0].error
    assert out[1].value == 2.0
    assert set(pool.pids) == pids and pool.stats["restarts"] == restarts


def test_pool_soft_timeout_interrupts_without_restart():
    with WorkerPool(CALL, workers=1, timeout_s=10.0, soft_timeout_s=0.5) as p:
        p.map([partial(math.sqrt, 1)])
        pid = p.pids
        t = time.monotonic()
        out = p.map([partial(time.sleep, 60), partial(math.sqrt, 4)])
        assert time.monotonic() - t < 5
        assert [o.status for o in out] == ["timeout", "ok"]
        assert p.pids == pid and p.stats["restarts"] == 0


def test_pool_failing_initializer_errors_instead_of_hanging():
    with WorkerPool(CALL, workers=1, timeout_s=5.0, initializer=partial(int, "x"), max_start_failures=2) as p:
        out = p.map([partial(math.sqrt, 4)] * 3)
        assert [o.status for o in out] == ["error"] * 3
        assert "initializer failed" in out[0].error


def test_pool_close_and_garbage_collection_stop_workers():
    p = WorkerPool(CALL, workers=2, timeout_s=5.0)
    p.map([partial(math.sqrt, 1)] * 2)
    pids = p.pids
    assert len(_alive(pids)) == 2
    p.close()
    p.close()  # idempotent
    assert _alive(pids) == []
    with pytest.raises(RuntimeError):
        p.map([partial(math.sqrt, 1)])

    p = WorkerPool(CALL, workers=1, timeout_s=5.0)
    p.map([partial(math.sqrt, 1)])
    pids = p.pids
    del p
    gc.collect()
    assert _alive(pids) == []


# --- math --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mathv():
    v = build_verifier("math", VerifierConfig(name="math", timeout_s=2, workers=2))
    yield v
    v.close()


@pytest.mark.parametrize("response,gold,reward", [
    (r"so the answer is \boxed{3/4}", "0.75", 1.0),
    (r"\boxed{\frac{1}{2}}", "1/2", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"We get \boxed{(x+1)^2}.", "x^2+2x+1", 1.0),
    (r"The final answer is $\sqrt{2}$.", r"$\sqrt{2}$", 1.0),
    ("The answer is 42", "42", 1.0),
    (r"first \boxed{3} then corrected: \boxed{5}", "5", 1.0),
    (r"\boxed{7}", "8", 0.0),
    (r"\boxed{-3}", "3", 0.0),
    ("", "1", 0.0),
    ("asdkj ;lkj ## }{ \\frac{", "3", 0.0),
    ("no numbers here at all", "3", 0.0),
])
def test_math_cases(mathv, response, gold, reward):
    assert mathv.verify([(response, gold)]) == [VerifyResult(reward, "ok")]


def test_math_batch_in_order_and_unparsable_gold(mathv):
    items = [(rf"\boxed{{{i}}}", str(i if i % 3 else i + 1)) for i in range(12)] + [(r"\boxed{1}", "")]
    res = mathv.verify(items)
    assert [r.reward for r in res[:12]] == [0.0 if i % 3 == 0 else 1.0 for i in range(12)]
    assert res[12] == VerifyResult(0.0, "error")  # an empty gold can match nothing: a data problem


def test_math_hanging_answer_times_out_and_verifier_recovers(mathv):
    mathv.verify([(r"\boxed{1}", "1")])  # workers up
    before = dict(mathv.stats)
    t = time.monotonic()
    res = mathv.verify([(HANG, "1")])
    assert time.monotonic() - t < 15
    assert res == [VerifyResult(0.0, "timeout")]
    assert mathv.verify([(r"\boxed{2}", "2")]) == [VerifyResult(1.0, "ok")]
    assert mathv.stats["timeouts"] - before["timeouts"] == 1
    assert mathv.stats["answers"] - before["answers"] == 2


def test_math_batch_mixing_hanging_and_normal_answers(mathv):
    items = [(r"\boxed{1}", "1"), (HANG, "1"), (r"\boxed{4}", "5"), (HANG, "2"), (r"\boxed{\frac{3}{4}}", "0.75")]
    t = time.monotonic()
    res = mathv.verify(items)
    assert time.monotonic() - t < 15
    assert res == [VerifyResult(1.0), VerifyResult(0.0, "timeout"), VerifyResult(0.0),
                   VerifyResult(0.0, "timeout"), VerifyResult(1.0)]


def test_math_empty_and_close_leave_no_processes():
    v = MathVerifier(timeout_s=5, workers=1)
    assert v.verify([]) == [] and v._pool.pids == []
    assert v.verify([(r"\boxed{6}", "6")]) == [VerifyResult(1.0)] and v._pool.pids == []  # decided in the parent
    assert v.verify([(r"\boxed{\frac{1}{2}}", "0.5")]) == [VerifyResult(1.0)]
    pids = v._pool.pids
    assert len(_alive(pids)) == 1
    v.close()
    assert _alive(pids) == []



def test_workers_under_the_posttrain_command_start_without_torch(tmp_path):
    """spawn re-runs the parent's main script in each worker: the command's must not import torch."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    ep = entry_points(group="console_scripts")["posttrain"]
    script = tmp_path / "posttrain_command.py"  # what pip writes for the console script, plus a verification
    script.write_text(f"""from {ep.module} import {ep.attr}
if __name__ == "__main__":
    from posttrain.verify.math_verifier import MathVerifier
    with MathVerifier(timeout_s=30, workers=2) as v:
        print(v.verify([(r"\\boxed{{\\frac{{1}}{{2}}}}", "0.5")])[0].reward)
        maps = [open(f"/proc/{{pid}}/maps").read() for pid in v._pool.pids]
        print(len(maps), sum("libtorch" in m for m in maps))
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.0", "2", "0"]  # verified; two workers, neither with torch loaded

# --- exact and choice --------------------------------------------------------------------------


@pytest.mark.parametrize("response,gold,reward", [
    (r"so \boxed{42}", "42", 1.0),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{7} and then a cut-off \boxed{8", "7", 1.0),
    ("Thus the answer is 42.", "42", 1.0),
    ("Reasoning...\nAnswer: Paris\n", "paris", 1.0),
    ("$  New   York $", "new york", 1.0),
    ("  Blue.  ", "blue", 1.0),
    (r"\boxed{41}", "42", 0.0),
    ("the answer is 42 apples", "42", 0.0),
    ("", "42", 0.0),
])
def test_exact(response, gold, reward):
    v = build_verifier("exact", VerifierConfig(name="exact"))
    assert v.verify([(response, gold)]) == [VerifyResult(reward, "ok")]


@pytest.mark.parametrize("response,gold,reward", [
    (r"\boxed{B}", "B", 1.0),
    (r"\boxed{\text{(C)}}", "c", 1.0),
    (r"\boxed{D. 42}", "D", 1.0),
    ("Answer: D", "D", 1.0),
    ("**Answer:** C", "C", 1.0),
    ("so the answer is (b).", "B", 1.0),
    ("The answer is option J", "(J)", 1.0),
    ("Comparing all options, I pick (E)", "E", 1.0),
    ("A", "a", 1.0),
    ("(c)", "C", 1.0),
    ("The answer is a prime number", "A", 0.0),
    (r"\boxed{B}", "C", 0.0),
    ("I do not know", "A", 0.0),
    ("", "A", 0.0),
])
def test_choice(response, gold, reward):
    v = build_verifier("choice", VerifierConfig(name="choice"))
    assert v.verify([(response, gold)]) == [VerifyResult(reward, "ok")]


def test_extraction_helpers():
    assert last_boxed(r"x \boxed{\frac{1}{2}} y") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed("no box") is None
    assert extract_final_answer("The answer is: 12\nDone") == "12"
    assert extract_choice("Answer: B because of X") == "B"


def test_inline_verifiers_stay_fast_on_degenerate_text():
    # Thousands of unclosed boxes and huge runs of spaces: the kind of input that makes naive
    # brace scanning or backtracking regexes quadratic. Inline verifiers have no timeout.
    nasty = "\\boxed{" * 20_000 + "The answer is" + " " * 50_000 + "(" * 10_000 + "answer" + " " * 50_000
    t = time.monotonic()
    for name in ("exact", "choice"):
        assert build_verifier(name, VerifierConfig()).verify([(nasty, "A")]) == [VerifyResult(0.0)]
    assert time.monotonic() - t < 2


def test_registry_and_protocol():
    assert set(BUILTIN_VERIFIERS) == {"math", "exact", "choice"}
    with pytest.raises(ValueError, match="Unknown verifier 'nope'"):
        build_verifier("nope", VerifierConfig())
    for v in (ExactVerifier(), ChoiceVerifier(), MathVerifier(timeout_s=1, workers=1)):
        assert isinstance(v, Verifier)
        assert v.stats == {"answers": 0, "timeouts": 0, "errors": 0}
        v.close()
    with pytest.raises(Exception):
        VerifyResult(1.0).reward = 0.0  # frozen


# --- throughput: runs of tasks, the numeric fast path ------------------------------------------


def test_pool_runs_continue_after_a_hung_task_on_one_worker():
    """One worker gets runs of several tasks. A task hung inside its run costs its own timeout:
    the worker is killed, the hung task alone is a timeout, the rest of its run is re-queued
    and answered by the replacement, in order; tasks answered before it in the run are kept."""
    with WorkerPool(CALL, workers=1, timeout_s=1.5, max_run=4) as p:
        p.map([partial(math.sqrt, 1)])
        tasks = [partial(math.sqrt, x * x) for x in range(12)]
        tasks[5] = partial(time.sleep, 60)
        out = p.map(tasks)
        assert [o.status for o in out] == ["ok"] * 5 + ["timeout"] + ["ok"] * 6
        assert [o.value for o in out[:5] + out[6:]] == [float(x) for x in range(12) if x != 5]
        assert p.stats["restarts"] == 1 and p.stats["timeouts"] == 1


def test_pool_crash_inside_a_run_requeues_the_rest():
    with WorkerPool(CALL, workers=1, timeout_s=5.0, max_run=8) as p:
        p.map([partial(math.sqrt, 1)])
        out = p.map([partial(math.sqrt, 4), partial(os._exit, 3), partial(math.sqrt, 9), partial(math.sqrt, 16)] * 4)
        assert [o.status for o in out] == ["ok", "error", "ok", "ok"] * 4
        assert [o.value for o in out[2:4]] == [3.0, 4.0]


@pytest.mark.parametrize("response,gold", [
    (r"so the answer is \boxed{42}", "42"), (r"\boxed{41}", "42"), (r"\boxed{-3}", "3"), (r"\boxed{ 7 }", " 7"),
    (r"\boxed{0.50}", "0.5"), (r"\boxed{2.0}", "2"), (r"\boxed{007}", "7"), (r"$x = 1$, so \boxed{12}", "12"),
    (r"\boxed{123456789012345}", "123456789012346"),
])
def test_numeric_fast_path_agrees_with_math_verify(response, gold):
    from posttrain.verify.math_verifier import check_math, fast_numeric

    fast = fast_numeric(response, gold)
    assert fast is not None
    assert (fast, "ok") == check_math((response, gold))


@pytest.mark.parametrize("response,gold", [
    (r"first \boxed{3} then corrected: \boxed{5}", "5"),  # several boxes: math-verify takes the last
    (r"\boxed{0.3}", "0.31"),  # decimals that differ: math-verify rounds
    (r"\boxed{1/2}", "0.5"), (r"\boxed{3}", r"\frac{3}{1}"), ("The answer is 42", "42"),
    (r"\boxed{1234567890123456}", "1234567890123457"),  # beyond 15 digits
])
def test_numeric_fast_path_leaves_the_rest_to_math_verify(response, gold):
    from posttrain.verify.math_verifier import fast_numeric

    assert fast_numeric(response, gold) is None


def test_math_numeric_answers_never_reach_the_workers():
    with MathVerifier(timeout_s=5, workers=1) as v:
        items = [(rf"\boxed{{{i}}}", str(i + i % 2)) for i in range(20)] + [(r"\boxed{\frac{3}{4}}", "0.75")]
        res = v.verify(items)
        assert [r.reward for r in res] == [0.0 if i % 2 else 1.0 for i in range(20)] + [1.0]
        assert v._pool.stats["tasks"] == 1  # only the fraction went to math-verify
        assert v.stats["answers"] == 21
