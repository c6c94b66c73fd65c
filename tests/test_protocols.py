"""Each protocol reproduces its reference: one case per disagreement found between our graders and
the references (issue: "Evaluation that reproduces the paper's protocols"). Every expected verdict is
the reference's, obtained by running it (lighteval 0.8.1 with latex2sympy2_extended 1.0.6 and sympy
1.13.3 for the lighteval protocol; SimpleRL-Zoo's Qwen2.5-Math parser.py / grader.py for simplerl;
evaluation/differential_check.py runs both over every benchmark gold).
"""

import pytest

from aapo_app.benchmarks import reference_golds
from aapo_app.data import render_prompt
from aapo_app.errors import AapoError
from aapo_app.evaluate import PROTOCOLS, SIMPLERL_STOP, cut_at_stop, eval_settings, markdown_table, summarize
from aapo_app.grader import Grader

MINERVA_SOLUTION = "The angle is $\\theta=1.22 \\lambda / D$, so the diameter is \\boxed{4.03188} cm."


@pytest.fixture(scope="module")
def lighteval():
    with Grader(timeout_s=10.0, protocol="lighteval") as g:
        yield g


@pytest.fixture(scope="module")
def simplerl():
    with Grader(timeout_s=10.0, protocol="simplerl") as g:
        yield g


# ---------------------------------------------------------------- lighteval (open-rs evaluate.py, lighteval 0.8.1)


def test_lighteval_compares_at_5_decimals(lighteval):
    # the reference's metric has precision=5: 4.031881 rounds to the gold 4.03188 (math-verify's default
    # 6 places rejected it), and a fraction written to 5 decimals matches
    results = lighteval.grade_many([MINERVA_SOLUTION, "so $x = \\boxed{\\frac{1}{3}}$", MINERVA_SOLUTION],
                                   ["\\boxed{4.031881}", "\\boxed{0.33333}", "\\boxed{4.0319}"], ["latex"] * 3)
    assert [r.correct for r in results] == [True, True, False]


def test_lighteval_keeps_bare_unit_words(lighteval):
    # lighteval 0.8.1 (latex2sympy2_extended 1.0.6) keeps "cm" (1.6 cm is not 1.6); math-verify 0.9
    # strips it. A unit in \text{} is dropped by both.
    results = lighteval.grade_many(["$1.6$", "$1.6$"], ["\\boxed{1.6 cm}", "\\boxed{1.6 \\text{ cm}}"], ["latex"] * 2)
    assert [r.correct for r in results] == [False, True]


def test_lighteval_compares_decimals_only_with_plain_numbers(lighteval):
    # lighteval 0.8.1 rounds only when both sides are numbers: sqrt(2) against 1.41421 is wrong
    assert lighteval.grade_many(["$\\sqrt{2}$"], ["\\boxed{1.41421}"], ["latex"])[0].correct is False


def test_lighteval_reads_the_gold_from_the_references_column():
    # open-rs hands the metric MATH-500's and Minerva's whole solution, AIME/AMC's answer (as an
    # expression; AMC floats as str) and OlympiadBench's `answer` column; a local file in the
    # Qwen2.5-Math layout has OlympiadBench's gold in `final_answer` instead
    row = {"question": "q", "answer": "$\\frac{1}{2}$", "final_answer": ["$0.5$"]}
    assert reference_golds("olympiadbench", row)["lighteval"] == ("$\\frac{1}{2}$", "latex")
    assert reference_golds("olympiadbench", {"question": "q", "final_answer": ["$0.5$"]})["lighteval"] \
        == ("$0.5$", "latex")
    row = {"problem": "p", "answer": "7", "solution": "so \\boxed{7}"}
    assert reference_golds("math500", row)["lighteval"] == ("so \\boxed{7}", "latex")
    assert reference_golds("amc23", {"problem": "p", "answer": 27.0})["lighteval"] == ("27.0", "expr")


# ---------------------------------------------------------------- simplerl (SimpleRL-Zoo's Qwen2.5-Math grader)


def test_simplerl_ignores_bracket_types(simplerl):
    assert simplerl.grade("(3,4]", "\\boxed{[3,4)}").correct is True


def test_simplerl_lists_are_order_sensitive(simplerl):
    # sympy's LaTeX parser reads a comma list as its first item: -2,1 against 1,-2 is wrong
    assert simplerl.grade("1,-2", "\\boxed{-2,1}").correct is False


def test_simplerl_tolerance_is_relative_1e4(simplerl):
    # 2/1005 = 0.00199...: 0.002 is 5e-3 off relatively (our old absolute tolerance accepted it)
    results = simplerl.grade_many(["\\frac{2}{1005}"] * 2, ["\\boxed{0.002}", "\\boxed{0.00199005}"])
    assert [r.correct for r in results] == [False, True]


def test_simplerl_text_answers(simplerl):
    assert simplerl.grade("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}").correct is True


def test_simplerl_keeps_unit_words_for_minerva(simplerl):
    golds = reference_golds("minerva", {"problem": "p", "solution": "The size is \\boxed{1.6} cm."})["simplerl"]
    assert golds == ("1.6", "ref:minerva")
    results = simplerl.grade_many(["1.6", "1.6"], ["so \\boxed{1.6 cm}", "so \\boxed{1.6 cm}"], ["ref:minerva", "ref:math500"])
    assert [r.correct for r in results] == [False, True]  # MATH-500 strips the unit word, Minerva keeps it


def test_simplerl_final_answer_is_branch(simplerl):
    assert simplerl.grade("7", "We add them up, so the final answer is 7").correct is True


def test_simplerl_prompt_stop_strings_and_length():
    # SimpleRL-Zoo evaluates its zero-RL models with the raw "abel" prompt, no chat template, stop
    # strings "Question:" / "Answer:" and 16,000 new tokens (the AAPO README: Llama rows follow it)
    s = PROTOCOLS["simplerl"]
    assert (s.use_chat_template, s.temperature, s.top_p, s.max_new_tokens) == (False, 1.0, 0.95, 16000)
    assert render_prompt(None, "What is 1+1?", s) == "Question:\nWhat is 1+1?\nAnswer:\nLet's think step by step.\n"
    assert SIMPLERL_STOP == ("</s>", "<|im_end|>", "<|endoftext|>", "Question:", "Answer:")
    assert cut_at_stop("2.\n\nQuestion: what next?\nAnswer: 3", s.stop) == ("2.\n\n", True)
    assert cut_at_stop("no stop here", s.stop) == ("no stop here", False)


# ---------------------------------------------------------------- the results table and the tokenization quirk


def _records(max_new: int, context: int | None):
    return [{"benchmark": "aime24", "problem_id": "0", "correct": True, "status": "ok", "max_new_tokens": max_new,
             "context": context}]


def test_a_capped_length_shows_in_the_results_table():
    # Qwen2.5-Math-7B has 4,096 positions; the protocol asks 32,768 new tokens
    capped = summarize(_records(3800, 4096), ["aime24"], (1,))
    full = summarize(_records(32768, 131072), ["aime24"], (1,))
    table = markdown_table({"7b": capped, "1.5b": full}, ["aime24"], (1,), asked_tokens=32768)
    assert "| Model | AIME24 | Avg. | Max new tokens |" in table
    assert "| 7b | 100.0 | 100.0 | 3,800 (capped by the model's 4,096-position context; the protocol asks 32,768) |" \
        in table
    assert "| 1.5b | 100.0 | 100.0 | 32,768 |" in table


def test_reference_quirks_setting():
    assert eval_settings().reference_quirks is False
    assert eval_settings(overrides=["reference_quirks=true"]).reference_quirks is True
    assert eval_settings(protocol="simplerl", overrides=['stop=["Q:"]']).stop == ("Q:",)
    with pytest.raises(AapoError, match="^stop: give a list of strings"):
        eval_settings(overrides=["stop=[{a: 1}]"])
