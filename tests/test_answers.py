"""Grading under both evaluation protocols, and the five benchmarks' gold answers.

The self-consistency check reads every problem of the five real benchmark files in
../shared/benchmarks (30 + 500 + 40 + 272 + 675 = 1,517), writes its gold answer the way the Qwen
evaluation prompt asks a model to, and requires the grader to accept it: a gold that does not parse,
a normalisation that loses information, or an extraction that misses the box shows up here.
"""

import pytest

from aapo_app import answers
from aapo_app.answers import _raw_answer, braces_balanced, extract_answer, last_boxed, math_equal, strip_string
from aapo_app.benchmarks import BENCHMARK_ORDER, load_benchmark, normalize_gold, parse_benchmark_names
from aapo_app.errors import AapoError
from aapo_app.grader import Grader

# (gold, prediction, lighteval verdict, simplerl verdict). Each verdict is the reference's, computed by
# running it: lighteval 0.8.1's extractive match (open-rs evaluate.py's settings, the gold as "$gold$")
# and SimpleRL-Zoo's Qwen2.5-Math grader (strip_string(gold) against extract_answer + strip_string).
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
    ("0,111", "\\boxed{111}", True, True),  # both drop the comma: 0,111 reads as 111
    # numbers in a base: digits and base, never the numeric tolerance (1112112 is within 1e-4 of 1112122)
    ("1112122_3", "\\boxed{1112112_3}", False, True),  # simplerl: the subscript drops, 1e-5 apart is within 1e-4
    ("1112122_3", "\\boxed{1112122_3}", True, True),
    ("1010_2", "\\boxed{1010_{2}}", True, True),
    ("1010_2", "\\boxed{1010}", True, False),  # simplerl: 1010 against the symbol 1010_2
    ("1010_2", "\\boxed{10}", False, False),  # the decimal value is not the base-2 answer
    # units, degrees, percent, currency
    ("5", "\\boxed{5\\text{ cm}}", True, True),
    ("12", "\\boxed{12 \\text{ inches}}", True, True),
    ("5", "\\boxed{5\\textnormal{ cm}}", True, False),  # simplerl drops \\text{} units, not \\textnormal{}
    ("12", "\\boxed{12 \\textnormal{inches}}", True, False),
    ("90", "\\boxed{90^\\circ}", True, True),
    ("50", "\\boxed{50\\%}", False, True),  # lighteval: 50% is 1/2
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
    ("4.5 \\times 10^{-6}", "\\boxed{4.5e-6}", False, False),  # both read e as a symbol
    ("1.5\\times 10^{8}", "\\boxed{1.5 \\times 10^8}", True, True),
    # solution lists, equations, radicals, text, complex numbers
    ("1,-2", "\\boxed{-2, 1}", True, False),  # simplerl: a list's first items differ
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
    ("[1,2)", "\\boxed{(1,2)}", False, True),  # simplerl ignores bracket types
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\boxed{\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}}", False, False),
    ("3\\times10^{5}", "\\boxed{3\\times10^{6}}", False, False),
    ("2\\sqrt{3}", "\\boxed{3\\sqrt{2}}", False, False),
    ("1,-2", "\\boxed{1, 2}", False, True),  # simplerl: only first items compare
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


# The Qwen2.5-Math evaluation's own outputs (SimpleRL-Zoo parser.py / grader.py, run on these inputs):
# (model output, extract_answer(output, "math500"), extract_answer(output, "minerva_math"))
EXTRACTIONS = [
    ("\\boxed{3} ... Therefore, the final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}", "\\frac{1}{2}"),
    ("x \\boxed{\\frac{a}{b+{c}}} done", "\\frac{}{b+{}}", "\\frac{a}{b+{c}}"),
    ("first \\boxed{1}, then \\boxed{2}", "2", "2"),
    ("The answer is: $12$.", "12", "12"),
    ("we get 3, 4 and finally 5.5 apples", "5.5", "5.5"),
    ("no digits at all", "", ""),
    ("so the final answer is 7", "7", "7"),
    ("\\boxed{unclosed", "unclosed", "unclosed"),
    ("\\boxed 5$ later", "5", "5"),
    ("In the end, the final answer is 3.5 m.", "3.5", "3.5m"),
]
# (answer, strip_string(answer), strip_string(answer, skip_unit=True))
NORMALISATIONS = [
    ("\\dfrac{1}{2}", "\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\frac12", "\\frac{1}{2}", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}", "\\frac{3}{4}"),
    ("x = 5", "5", "5"),
    ("area = 5", "area=5", "area=5"),
    ("\\left( 1, 2 \\right)", "(1,2)", "(1,2)"),
    ("1,000,000", "1,000,000", "1,000,000"),
    ("\\sqrt3", "\\sqrt{3}", "\\sqrt{3}"),
    ("5 \\text{ cm}^2", "5^2", "5cm^2"),
    ("\\text{Evelyn}", "Evelyn", "Evelyn"),
    ("5\\textnormal{ cm}", "5\\textnormal{}", "5\\textnormal{cm}"),
    ("0,111", "0,111", "0,111"),
    ("-12,345.5", "-12,345.5", "-12,345.5"),
    ("two", "2", "2"),
    ("27.0", "27", "27"),
    ("5 cm", "5", "5cm"),
    ("\\sqrt{12}x", "\\sqrt{12}x", "\\sqrt{12}x"),
    ("a", "a", "a"),
    ("3 m", "3", "3m"),
    ("\\$18.90", "18.90", "18.90"),
    ("90^\\circ", "90", "90"),
    ("50\\%", "50", "50"),
    ("x\\in[1,2)", "[1,2)", "[1,2)"),
    ("\\emptyset", "{}", "{}"),
]
# (prediction, reference, math_equal(prediction, reference))
EQUALITIES = [
    ("1.00009", "1", True),
    ("1.0002", "1", False),
    ("50", "0.5", True),
    ("0.005", "0.5", True),
    ("1000", "1,000", True),
    ("0", "0.00001", False),
    ("(3,4]", "[3,4)", True),
    ("-2,1", "1,-2", False),
    ("1,2", "1,3", False),
    ("0.002", "\\frac{2}{1005}", False),
    ("0.0019900", "\\frac{2}{1005}", True),
    ("A", "A", True),
    ("(A)", "A", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1&2\\end{pmatrix}", True),
    ("k=5", "5", True),
    ("y=2x+3", "2x-y+3=0", True),
]


def test_extraction_normalisation_and_equality_are_the_references():
    """Quirks included: unit words are any lone "a", "c", "m" ("\\frac{a}{b+{c}}" loses its a and c),
    "\\textnormal{}" is no unit, a comma list compares by its first item, brackets are ignored."""
    assert [(x, strip_string(_raw_answer(x)), strip_string(_raw_answer(x), True)) for x, _, _ in EXTRACTIONS] \
        == EXTRACTIONS
    assert [(x, strip_string(x), strip_string(x, skip_unit=True)) for x, _, _ in NORMALISATIONS] == NORMALISATIONS
    assert [(p, r, math_equal(p, r)) for p, r, _ in EQUALITIES] == EQUALITIES
    # a prediction is normalised twice (in extraction and when scored), a Minerva one keeps its units
    assert extract_answer("so \\boxed{1.6 \\text{ cm}}") == "1.6" and extract_answer("\\boxed{1.6 cm}", "minerva") == "1.6cm"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("\\fbox{4}") == "4"


def test_braces_balanced():
    assert braces_balanced("\\frac{1}{2}") and braces_balanced("\\{1,2\\}") and braces_balanced("7")
    assert not braces_balanced("\\frac{1}{2") and not braces_balanced("}{") and not braces_balanced("\\{1,2\\}}")


def test_memory_error_is_not_swallowed(monkeypatch):
    """Under the grader's memory cap a MemoryError must reach the worker (scored as an error), not
    read as "not equal"; other errors still mean "not equal by this step"."""
    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(answers, "_to_sympy", out_of_memory)
    with pytest.raises(MemoryError):
        answers.symbolic_equal("x", "y")
    with pytest.raises(MemoryError):
        math_equal("10^{10^{10^{11}}}", "10^{10^{10^{10}}}")
    monkeypatch.undo()
    monkeypatch.setattr(answers, "_sympy_parse_latex", out_of_memory)
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


# The golds the references themselves reject when a model boxes the bare gold (the differential check
# finds the reference's verdict equal to ours on every one of these 1,517 pairs per protocol):
# OlympiadBench 2349's gold text "$221,$8$" is malformed; Minerva 139's gold "\\lambda_{\\text {red}} / \\sqrt{2}"
# is normalised once, a prediction twice: the second pass unwraps the "\\text{red}" the gold keeps.
REFERENCE_REJECTS = {"lighteval": [("olympiadbench", "2349")], "simplerl": [("minerva", "139")]}


@pytest.mark.parametrize("protocol", ["lighteval", "simplerl"])
def test_gold_self_consistency_over_1517_problems(all_problems, protocol):
    """Every gold, written as a model following the Qwen prompt would write it, grades correct against
    the gold as the protocol's reference reads it, except where the reference itself rejects it."""
    rejected = []
    with Grader(timeout_s=10.0, protocol=protocol) as grader:
        for name, problems in all_problems.items():
            answers = [f"Let me work it out. ... Therefore, the final answer is: $\\boxed{{{p.gold}}}$. "
                       f"I hope it is correct." for p in problems]
            results = grader.grade_many([p.reference[protocol][0] for p in problems], answers,
                                        [p.reference[protocol][1] for p in problems])
            rejected += [(name, p.id) for p, r in zip(problems, results) if not r.correct]
    assert rejected == REFERENCE_REJECTS[protocol]


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
