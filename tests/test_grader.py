"""The shared answer grader: math-verify verdicts, time bounds, worker kills, threads."""

import threading
import time

import pytest

from aapo_app import grader as grader_module
from aapo_app.grader import GradeResult, Grader

TIMEOUT_S = 2.0

# (gold, prediction, expected correct). Verdicts are math-verify 0.9.0's, checked by hand.
CASES = [
    # equal forms
    ("7", "the answer is \\boxed{7}", True),
    ("7", "The final answer is $\\boxed{7}$.", True),
    ("0.5", "\\boxed{\\frac{1}{2}}", True),
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("\\dfrac{3}{4}", "\\boxed{0.75}", True),
    ("27.0", "\\boxed{27}", True),  # AMC23 golds are floats
    ("025", "\\boxed{25}", True),  # AIME24 golds may be zero-padded
    ("1,000", "\\boxed{1000}", True),
    ("\\sqrt{2}", "\\boxed{\\sqrt 2}", True),
    ("x^2+1", "\\boxed{1+x^2}", True),
    ("(1,2)", "\\boxed{(1, 2)}", True),  # math-verify parses "(1,2)" as the open interval
    ("[1,2)", "\\boxed{[1,2)}", True),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", True),
    ("x=3", "\\boxed{3}", True),  # an assignment gold matches its value
    ("10", "\\boxed{10\\%}", True),  # surprising: math-verify accepts the percentage form
    ("7", "\\boxed{7} is wrong, it is \\boxed{7}", True),
    # near misses
    ("7", "\\boxed{8}", False),
    ("7", "\\boxed{-7}", False),
    ("(1,2)", "\\boxed{(2,1)}", False),
    ("[1,2)", "\\boxed{(1,2]}", False),
    ("\\sqrt{2}", "\\boxed{1.414}", False),
    ("\\frac13", "\\boxed{0.333}", False),  # 0.333333 would pass: 6 decimal places
    ("3", "$3$ first, but finally \\boxed{7}", False),  # the boxed answer wins over earlier math
    ("7", "\\boxed{7} \\boxed{8}", False),  # two boxes in one match: the set {7, 8}
    # unboxed: the last expression is taken. math-verify reads "3 + 4 = 7" as its last side, 7,
    # so it is correct; "3 + 4 = 8" is not.
    ("7", "3 + 4 = 7", True),
    ("7", "3 + 4 = 8", False),
    ("7", "I think 7, but maybe 8", False),
]


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=TIMEOUT_S) as g:
        yield g


def test_cases_table(grader):
    golds, predictions, expected = zip(*CASES)
    results = grader.grade_many(golds, predictions)
    got = [(g, p, r.correct) for g, p, r in zip(golds, predictions, results)]
    assert got == CASES
    assert all(r.status == "ok" for r in results)


def test_result_fields(grader):
    assert grader.grade("0.5", "so x = \\boxed{\\frac{1}{2}}") == GradeResult(
        correct=True, status="ok", gold="\\frac{1}{2}", predicted="\\frac{1}{2}"
    )
    assert grader.grade("7", "\\boxed{8}") == GradeResult(False, "ok", "7", "8")


def test_no_answer(grader):
    for prediction in ["no numbers here", "\\boxed{}", ""]:
        result = grader.grade("7", prediction)
        assert (result.correct, result.status, result.predicted) == (False, "no_answer", "")


def test_unparseable_gold_is_an_error(grader):
    result = grader.grade("", "\\boxed{7}")
    assert (result.correct, result.status) == (False, "error")


def test_empty_and_mismatched_batches(grader):
    assert grader.grade_many([], []) == []
    with pytest.raises(ValueError):
        grader.grade_many(["1", "2"], ["1"])


@pytest.mark.parametrize(
    "prediction, statuses",
    [
        # sympy grinds on the tower of powers until the worker's alarm fires
        ("\\boxed{10^{10^{10^{10}}}}", {"timeout"}),
        ("x" * 50_000, {"no_answer", "timeout", "error"}),
        # Python refuses to convert a 50,000-digit string to int (sys.get_int_max_str_digits)
        ("9" * 50_000, {"error", "timeout"}),
        # unbalanced braces: math-verify falls back to the unparsed string "{\frac{1}"
        ("\\boxed{\\frac{1}{2", {"no_answer"}),
    ],
    ids=["power-tower", "50kB-letters", "50kB-digits", "unbalanced"],
)
def test_pathological_inputs_are_bounded(grader, prediction, statuses):
    before = dict(grader.stats)
    start = time.monotonic()
    result = grader.grade("7", prediction)
    assert time.monotonic() - start < TIMEOUT_S + 10
    assert result.correct is False
    assert result.status in statuses
    if result.status != "ok":
        assert grader.stats[result.status] == before[result.status] + 1


def test_hung_worker_is_killed_and_replaced(grader):
    # Lower the parent's hard bound below the worker's own alarm so the parent must kill it.
    kills = grader.stats["worker_kills"]
    grader.hard_timeout_s = 0.5
    try:
        start = time.monotonic()
        results = grader.grade_many(["7", "7"], ["\\boxed{10^{10^{10^{10}}}}", "\\boxed{7}"])
        assert time.monotonic() - start < 0.5 + 10
    finally:
        grader.hard_timeout_s = TIMEOUT_S + 2.0
    assert (results[0].correct, results[0].status) == (False, "timeout")
    assert results[1].correct
    assert grader.stats["worker_kills"] == kills + 1
    # a fresh worker takes over: normal cases grade right afterwards, in parallel
    assert [r.correct for r in grader.grade_many(["7", "2"], ["\\boxed{7}", "\\boxed{3}"])] == [True, False]


def test_grading_from_a_thread(grader):
    out = []
    thread = threading.Thread(target=lambda: out.append(grader.grade("\\frac{1}{2}", "\\boxed{0.5}")))
    thread.start()
    thread.join(timeout=60)
    assert [r.correct for r in out] == [True]


def test_module_level_grade():
    assert grader_module.grade("7", "\\boxed{7}", timeout_s=TIMEOUT_S).correct
    assert not grader_module.grade("7", "\\boxed{8}", timeout_s=TIMEOUT_S).correct


def test_restarts_after_close(grader):
    grader.close()
    assert grader.grade("7", "\\boxed{7}").correct


def test_no_crash_when_workers_cannot_start(monkeypatch):
    def cannot_start(ctx):
        raise OSError("no processes here")

    monkeypatch.setattr(grader_module, "_Worker", cannot_start)
    g = Grader(num_workers=1)
    assert g.grade_many(["7", "8"], ["\\boxed{7}", "\\boxed{8}"]) == [GradeResult(False, "error")] * 2
    assert g.stats["error"] == 2
