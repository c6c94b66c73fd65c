"""Grading under both evaluation protocols, and the five benchmarks' gold answers.

The self-consistency check reads every problem of the five real benchmark files in
../shared/benchmarks (30 + 500 + 40 + 272 + 675 = 1,517), writes its gold answer the way the Qwen
evaluation prompt asks a model to, and requires the grader to accept it: a gold that does not parse,
a normalisation that loses information, or an extraction that misses the box shows up here.
"""

import pytest

from aapo_app import answers
from aapo_app.answers import (base_number, braces_balanced, extract_answer, last_boxed, math_equal, parse_number,
                              strip_string)
from aapo_app.benchmarks import BENCHMARK_ORDER, load_benchmark, normalize_gold, parse_benchmark_names
from aapo_app.errors import AapoError
from aapo_app.grader import Grader

# (gold, prediction, lighteval verdict, simplerl verdict), each verdict checked by hand against the
# protocol's rules (lighteval = math-verify 0.9.0; simplerl = aapo_app/answers.py's documented rules).
CASES = [
    # fractions and decimals
    ("\\frac{1}{2}", "\\boxed{0.5}", True, True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True, True),
    ("\\frac{1}{2}", "\\boxed{\\tfrac12}", True, True),
    ("\\frac{1}{2}", "\\boxed{1/2}", True, True),
    ("0.75", "\\boxed{\\frac{3}{4}}", True, True),
    ("27.0", "\\boxed{27}", True, True),  # AMC23 golds are floats
    ("25", "\\boxed{025}", True, True),  # AIME answers may be written zero-padded
    ("1000", "\\boxed{1,000}", True, True),
    ("1,000", "\\boxed{1000}", True, True),  # a thousands separator in the gold
    ("0,111", "\\boxed{111}", False, False),  # not a thousands separator: a list (or a decimal comma)
    # numbers in a base: digits and base, never the numeric tolerance (1112112 is within 1e-4 of 1112122)
    ("1112122_3", "\\boxed{1112112_3}", False, False),
    ("1112122_3", "\\boxed{1112122_3}", True, True),
    ("1010_2", "\\boxed{1010_{2}}", True, True),
    ("1010_2", "\\boxed{1010}", True, True),  # the digits asked for, base left out
    ("1010_2", "\\boxed{10}", False, False),  # the decimal value is not the base-2 answer
    # units, degrees, percent, currency
    ("5", "\\boxed{5\\text{ cm}}", True, True),
    ("12", "\\boxed{12 \\text{ inches}}", True, True),
    ("5", "\\boxed{5\\textnormal{ cm}}", True, True),
    ("12", "\\boxed{12 \\textnormal{inches}}", True, True),
    ("90", "\\boxed{90^\\circ}", True, True),
    ("50", "\\boxed{50\\%}", True, True),
    # 50% against 0.5: math-verify reads 50\% as 1/2; simplerl strips "%" and accepts 100x the gold
    ("0.5", "\\boxed{50\\%}", True, True),
    ("10", "\\boxed{\\$10}", True, True),
    ("18.90", "\\boxed{\\$18.90}", True, True),
    # intervals and tuples
    ("[1,2)", "\\boxed{[1, 2)}", True, True),
    ("(-\\infty, 3]", "\\boxed{(-\\infty,3]}", True, True),
    ("(1,2)", "\\boxed{(1, 2)}", True, True),
    ("(3, \\frac{\\pi}{2})", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", True, True),
    # matrices
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}}", True, True),
    ("\\begin{pmatrix} 1/2 \\\\ 3 \\end{pmatrix}", "\\boxed{\\begin{pmatrix} 0.5 \\\\ 3 \\end{pmatrix}}", True, True),
    # scientific notation: math-verify does not read the "e" form, simplerl does
    ("3\\times10^{5}", "\\boxed{300000}", True, True),
    ("4.5 \\times 10^{-6}", "\\boxed{4.5e-6}", False, True),
    ("1.5\\times 10^{8}", "\\boxed{1.5 \\times 10^8}", True, True),
    # solution lists, equations, radicals, text, complex numbers
    ("1,-2", "\\boxed{-2, 1}", True, True),
    ("x=5", "\\boxed{5}", True, True),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", True, True),
    ("\\text{Evelyn}", "\\boxed{Evelyn}", True, True),
    ("6 - 5i", "\\boxed{6-5i}", True, True),
    ("y = 2x + 3", "\\boxed{y=3+2x}", True, True),
    # unboxed answers: "the answer is" / the last number
    ("7", "The answer is 7.", True, True),
    ("7", "so we get 3 and then 7", True, True),
    # near misses
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", False, False),
    ("0.5", "\\boxed{0.51}", False, False),  # 2% off: outside the 1e-4 relative tolerance
    ("(1,2)", "\\boxed{(2,1)}", False, False),  # a tuple is ordered
    ("[1,2)", "\\boxed{(1,2)}", False, False),  # an interval's brackets matter
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}}", False, False),
    ("3\\times10^{5}", "\\boxed{3\\times10^{6}}", False, False),
    ("2\\sqrt{3}", "\\boxed{3\\sqrt{2}}", False, False),
    ("1,-2", "\\boxed{1, 2}", False, False),
    ("27", "\\boxed{28}", False, False),
    ("5", "\\boxed{5.01}", False, False),
    ("\\pi", "\\boxed{3.14}", False, False),  # 3.14 is 0.05% off pi: more than 1e-4
]


@pytest.mark.parametrize("protocol", ["lighteval", "simplerl"])
def test_grading_cases_table(protocol):
    column = 2 if protocol == "lighteval" else 3
    with Grader(timeout_s=5.0, protocol=protocol) as grader:
        results = grader.grade_many([c[0] for c in CASES], [c[1] for c in CASES])
    got = [(c[0], c[1], r.correct) for c, r in zip(CASES, results)]
    assert got == [(c[0], c[1], c[column]) for c in CASES]


def test_extraction_rules():
    # the Qwen prompt's own final line wins, even over an earlier box
    assert extract_answer("\\boxed{3} ... Therefore, the final answer is $\\frac{1}{2}$. I hope it is correct.") \
        == "\\frac{1}{2}"
    assert extract_answer("x \\boxed{\\frac{a}{b+{c}}} done") == "\\frac{a}{b+{c}}"  # nested braces
    assert extract_answer("first \\boxed{1}, then \\boxed{2}") == "2"  # the last box
    assert extract_answer("The answer is: $12$.") == "12"
    assert extract_answer("we get 3, 4 and finally 5.5 apples") == "5.5"  # last number
    assert extract_answer("no digits at all") == ""
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\fbox{4}") == "4"


def test_normalisation_rules():
    assert strip_string("\\dfrac{1}{2}") == "\\frac{1}{2}"
    assert strip_string("\\frac12") == "\\frac{1}{2}"
    assert strip_string("3/4") == "\\frac{3}{4}"
    assert strip_string("x = 5") == "5"  # short left side dropped
    assert strip_string("area = 5") == "area=5"  # a long one is kept
    assert strip_string("\\left( 1, 2 \\right)") == "(1,2)"
    assert strip_string("1,000,000") == "1000000"
    assert strip_string("\\sqrt3") == "\\sqrt{3}"
    assert strip_string("5 \\text{ cm}^2") == "5"
    assert strip_string("\\text{Evelyn}") == "Evelyn"  # text that is the answer stays
    assert strip_string("5\\textnormal{ cm}") == "5"  # \\textnormal units go like \\text ones
    assert strip_string("5 \\textnormal{ cm}^2") == "5"
    assert strip_string("\\textnormal{Evelyn}") == "Evelyn"
    assert strip_string("0,111") == "0,111"  # a leading group 0 is no thousands separator
    assert strip_string("-12,345.5") == "-12345.5"


def test_numbers_and_tolerance():
    assert parse_number("1,000") == 1000.0
    assert parse_number("1,2") is None  # a list, not a thousands separator
    assert parse_number("25%") == 0.25
    assert parse_number("3\\times10^{5}") == 300000.0
    # relative tolerance 1e-4: 1.00009 is within 9e-5 of 1, 1.0002 is 2e-4 away
    assert math_equal("1.00009", "1") and not math_equal("1.0002", "1")
    assert not math_equal("50", "0.5", include_percentage=False)


def test_thousands_separators():
    assert parse_number("1,000") == 1000.0 and parse_number("12,345,678") == 12345678.0
    assert parse_number("0,111") is None and parse_number("01,000") is None  # not thousands separators
    assert parse_number("1,00") is None and parse_number("1,0000") is None  # groups of three digits only
    assert math_equal("1000", strip_string("1,000")) and math_equal("1,000", "1000")
    assert not math_equal("111", strip_string("0,111")) and not math_equal("0.111", strip_string("0,111"))
    assert math_equal("0,111", strip_string("0,111"))


def test_numbers_in_a_base():
    assert base_number("1112122_3") == ("1112122", 3)
    assert base_number("10_{2}") == ("10", 2) and base_number("0a3_{16}") == ("A3", 16)
    assert base_number("x_1") is None and base_number("a_2") is None  # subscripted variables
    assert base_number("12_2") is None and base_number("10_{2") is None  # a digit too large, unbalanced
    assert not math_equal("1112112_3", "1112122_3")  # one digit off: never within a tolerance
    assert not math_equal("1112122_4", "1112122_3")  # same digits, another base
    assert math_equal("1112122_{3}", "1112122_3") and math_equal("a3_{16}", "A3_{16}")
    assert math_equal("1112122", "1112122_3") and not math_equal("1112112", "1112122_3")
    assert not math_equal("1112122.0001", "1112122_3") and not math_equal("(1,2)", "1112122_3")
    assert math_equal("(10_2,11_2)", "(10_2,11_2)") and not math_equal("(10_2,11_2)", "(10_2,10_2)")


def test_braces_balanced():
    assert braces_balanced("\\frac{1}{2}") and braces_balanced("\\{1,2\\}") and braces_balanced("7")
    assert not braces_balanced("\\frac{1}{2") and not braces_balanced("}{") and not braces_balanced("\\{1,2\\}}")


def test_memory_error_is_not_swallowed(monkeypatch):
    """Under the grader's memory cap a MemoryError must reach the worker (scored as an error), not
    read as "not equal"; other errors still mean "not equal by this step"."""
    import sympy

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(answers, "_to_sympy", out_of_memory)
    with pytest.raises(MemoryError):
        answers.symbolic_equal("x", "y")
    with pytest.raises(MemoryError):
        math_equal("10^{10^{10^{11}}}", "10^{10^{10^{10}}}")
    monkeypatch.undo()
    monkeypatch.setattr(sympy, "simplify", out_of_memory)
    with pytest.raises(MemoryError):
        answers.symbolic_equal("x^2-1", "(x-1)(x+1)")

    def broken(*args, **kwargs):
        raise ValueError("unparseable")

    monkeypatch.setattr(answers, "_to_sympy", broken)
    assert answers.symbolic_equal("x", "x+1") is False


def test_gold_normalisation():
    assert normalize_gold("aime24", {"answer": "025"}) == "25"
    assert normalize_gold("amc23", {"answer": 27.0}) == "27"
    assert normalize_gold("amc23", {"answer": 2.5}) == "2.5"
    assert normalize_gold("minerva", {"solution": "so \\boxed{1} then \\boxed{4.5 \\times 10^{-6}}"}) \
        == "4.5 \\times 10^{-6}"
    assert normalize_gold("olympiadbench", {"final_answer": ["$69$,$84$"]}) == "69,84"
    assert normalize_gold("olympiadbench", {"final_answer": ["$221,$8$"]}) == "221,8"
    assert normalize_gold("olympiadbench", {"final_answer": ["$(-\\infty, 0) \\cup\\{1\\}$."]}) \
        == "(-\\infty, 0) \\cup\\{1\\}"
    assert normalize_gold("math500", {"answer": "\\$18.90"}) == "\\$18.90"  # an escaped dollar is kept
    with pytest.raises(AapoError, match="has no .boxed"):
        normalize_gold("minerva", {"solution": "no box"})
    with pytest.raises(AapoError, match="'answer' column"):
        normalize_gold("aime24", {"problem": "?"})


def test_benchmark_names():
    assert parse_benchmark_names("all") == list(BENCHMARK_ORDER)
    assert parse_benchmark_names("minerva, aime24") == ["aime24", "minerva"]  # the paper's order
    with pytest.raises(AapoError, match="unknown benchmark 'gsm8k'"):
        parse_benchmark_names("aime24,gsm8k")


EXPECTED_ROWS = {"aime24": 30, "math500": 500, "amc23": 40, "minerva": 272, "olympiadbench": 675}


@pytest.fixture(scope="module")
def all_problems(shared_dir):
    return {name: load_benchmark(name, str(shared_dir / "benchmarks")) for name in BENCHMARK_ORDER}


def test_benchmark_files_load(all_problems):
    assert {n: len(p) for n, p in all_problems.items()} == EXPECTED_ROWS
    assert sum(EXPECTED_ROWS.values()) == 1517
    for problems in all_problems.values():
        assert all(p.problem.strip() and p.gold.strip() for p in problems)
        assert len({p.id for p in problems}) == len(problems)  # ids identify problems in samples.jsonl


@pytest.mark.parametrize("protocol", ["lighteval", "simplerl"])
def test_gold_self_consistency_over_1517_problems(all_problems, protocol):
    """Every gold, written as a model following the Qwen prompt would write it, grades correct."""
    with Grader(timeout_s=10.0, protocol=protocol) as grader:
        for name, problems in all_problems.items():
            golds = [p.gold for p in problems]
            answers = [f"Let me think step by step. ... Therefore, the final answer is: $\\boxed{{{g}}}$. "
                       f"I hope it is correct." for g in golds]
            results = grader.grade_many(golds, answers)
            unparsed = [(p.id, p.gold) for p, r in zip(problems, results) if not r.gold]
            wrong = [(p.id, p.gold, r.status) for p, r in zip(problems, results) if not r.correct]
            assert not unparsed, f"{name}: golds that do not parse: {unparsed[:5]}"
            assert not wrong, f"{name}: {len(wrong)}/{len(problems)} golds not accepted: {wrong[:5]}"


def test_benchmarks_load_from_the_hub_by_default(monkeypatch):
    """Without --data-dir each benchmark is read through datasets.load_dataset(hub id), taking its
    named split (or the only one there is), and normalised the same way."""
    import datasets

    asked = []

    def fake_load(hub_id):
        asked.append(hub_id)
        rows = [{"problem": "p1", "answer": 27.0}, {"problem": "p2", "answer": 3.5}]
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    problems = load_benchmark("amc23")
    assert asked == ["knoveleng/AMC-23"]
    assert [(p.problem, p.gold) for p in problems] == [("p1", "27"), ("p2", "3.5")]

    def offline(hub_id):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(AapoError, match="cannot load HuggingFaceH4/aime_2024 from the hub.*--data-dir"):
        load_benchmark("aime24")
