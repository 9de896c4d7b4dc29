"""Generate tests/training/data/vqa_eval_reference.json from the official VQAv2 evaluation.

NOT run by the test suite: `test_vqa_eval_parity.py` only reads the file this script writes. It runs
the official VQAv2 accuracy, `VQAEval.evaluate` from `lavis/common/vqa_tools/vqa_eval.py` (the VQA
team's script as LAVIS ships it, in the PyPI wheel salesforce-lavis 1.0.2), on seeded random questions
with ten human answers each, and records every question's accuracy as that code computes it.

That module needs only the standard library, so no environment is built for it: the file is read from
the wheel (or from an unpacked copy) and executed as it is, never copied into the project:

    pip download --no-deps salesforce-lavis==1.0.2 -d /tmp/lavis_dl
    python tests/training/make_vqa_eval_reference.py --lavis /tmp/lavis_dl/salesforce_lavis-1.0.2-py3-none-any.whl

The questions are drawn (seed 0) to hit every rule of the official normalisation: upper and mixed case,
articles, number words ("none" -> "0"), apostrophe-less contractions (every spelling in the official
table, the capitalised ones that never match included), each punctuation mark next to a space or not,
a comma between digits anywhere in the text (which changes how every other mark is treated), periods
before digits and elsewhere, more than 32 periods (the official `sub` call is capped at 32), tabs,
newlines and outer spaces; answers unanimous, nine-to-one and split two to four ways.

`VQAEval.evaluate` is run as it is on `vqa`/`vqaRes` stand-ins holding the official annotation layout
(ten answer dicts with `answer_id` 1-10); only its `setEvalQA` is overridden, to keep each question's
accuracy unrounded (the official one stores round(100 * acc, 2)). Its own overall and per-question-type
figures (rounded to 2 decimals as it reports them) are recorded too. The output is identical from run
to run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import random
import types
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

OUT = Path(__file__).parent / "data" / "vqa_eval_reference.json"
MODULE = "lavis/common/vqa_tools/vqa_eval.py"
CASES = 3000
SEED = 0

# Spellings of one answer, as humans and models write it; a question draws its answers and (mostly)
# its prediction from one group, so that matches and near misses are frequent.
GROUPS = [
    ["two", "2", "Two", "TWO", "two.", "2.", " two", "two ", "2 ."],
    ["the dog", "dog", "a dog", "The Dog", "dog.", "dogs", "the  dog", "an dog", "THE DOG"],
    ["one dog", "1 dog", "One dog", "a dog", "one  dog", "1 dog."],
    ["none", "0", "zero", "None", "nothing", "no", "NONE", "0."],
    ["t-shirt", "t shirt", "tshirt", "T-shirt", "t - shirt", "t-shirt.", "t- shirt", "T-Shirt"],
    ["dont", "don't", "do not", "Dont", "dont know", "don't know", "i dont know"],
    ["Red.", "red", "red.", "RED", "red!", "red?", "(red)", "red .", "red,", "'red'"],
    ["3,000", "3000", "3 000", "3,000.", "3.000", "3, 000", "3,000 dogs", "three thousand"],
    ["1.5", "1.50", "1,5", "1 . 5", "1. 5", ".5", "0.5", "1.5.", "one and half"],
    ["yes", "Yes", "yes!", "yes.", "YES", "yeah", "yes ", "yes,", "yes?", "Yes."],
    ["red/white", "red / white", "red and white", "red white", "red, white", "red,white", "red-white"],
    ["10:30", "10.30", "10,30", "1030", "ten thirty", "10:30.", "10 30"],
    ["e.g.", "eg", "e.g", "u.s.a.", "usa", "U.S.A.", "mr. smith", "mr smith", "Mr. Smith"],
    ["c++", "c", "@home", "at home", 'a "quote"', "a_b", "a b", "a=b", "<3", "x>y", "x > y"],
    ["back\\slash", "back slash", "`tick`", "tick", "semi;colon", "semi ; colon", "[box]", "{brace}"],
    ["red\tdog", "red\ndog", "red  dog", "\nred dog", "red dog\t", "red dog"],
    ["eleven", "11", "ten", "10", "Ten", "TEN", "four", "4", "Four", "4 ."],
    ["lets go", "let's go", "Let's go", "shes", "she's", "im", "i'm", "Im", "I'm", "ive"],
    ["5 oclock", "5 o'clock", "five oclock", "oclock", "o'clock", "O'clock"],
    ["whats that", "what's that", "thats it", "that's it", "its", "it's", "wont", "won't"],
    ["café", "Café", "CAFÉ", "cafe", "naïve", "naive"],
    ["a" + "." * 40, "a" + "." * 31, "a" + "." * 33, "a", "a" + ". " * 35, "..." * 12 + "5"],
]
# Pieces for free-form strings: each punctuation mark, digits, number words, articles and contractions.
PIECES = (
    list(';/[]"{}()=+\\_-><@`,?!.')
    + ["a", "an", "the", "The", "two", "Two", "none", "ten", "3", "1,000", "2,5", "1.5", "dog", "dont"]
    + ["im", "Ive", "t-shirt", "red.", "yes", "no", "'", "'s", "x"]
)
SEPARATORS = ["", " ", " ", "  ", "\t"]
QUESTION_TYPES = {"how many": "number", "what color is the": "other", "is the": "yes/no", "what is": "other"}


def load_vqa_eval(source: Path) -> tuple[type, str]:
    """The official module, from the wheel file or an unpacked wheel; returns VQAEval and the file's sha256."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            code = wheel.read(MODULE).decode()
    else:
        code = (source / MODULE).read_text()
    module = types.ModuleType("vqa_eval")
    exec(compile(code, MODULE, "exec"), module.__dict__)  # noqa: S102 - the official code, run as it is
    return module.VQAEval, hashlib.sha256(code.encode()).hexdigest()


def contraction_groups(vqa_eval: type) -> list[list[str]]:
    """One group per written-out form in the official contraction table, with every spelling mapped to it."""
    groups: dict[str, list[str]] = {}
    for spelling, written in vqa_eval().contractions.items():
        groups.setdefault(written, [written]).append(spelling)
    return list(groups.values())


def perturb(rng: random.Random, text: str) -> str:
    """A variant a model might write: another case, an article, a mark, a space."""
    change = rng.randrange(11)
    if change == 0:
        return text.upper()
    if change == 1:
        return text.title()
    if change == 2:
        return rng.choice(["the ", "a ", "an ", "The "]) + text
    if change == 3:
        return text + rng.choice([".", "!", "?", " .", ",", "..."])
    if change == 4:
        return rng.choice([" ", "\t", "\n", "  "]) + text + rng.choice(["", " ", "\n"])
    if change == 5:
        return text.replace(" ", rng.choice(["-", "/", "_", " - ", ", "]))
    if change == 6:
        return rng.choice(["(", '"', "[", "'"]) + text + rng.choice([")", '"', "]", "'"])
    if change == 7:
        return text + rng.choice([" 1,000", " 2,5", " 3.5", " 1, 0"])  # a digit comma elsewhere
    if change == 8:
        return rng.choice(["two ", "none ", "ten ", "one "]) + text
    if change == 9:
        return text.capitalize()
    return text


def free_form(rng: random.Random) -> str:
    text = rng.choice(PIECES)
    for _ in range(rng.randrange(4)):
        text += rng.choice(SEPARATORS) + rng.choice(PIECES)
    return text


def answers_for(rng: random.Random, group: list[str], groups: list[list[str]]) -> list[str]:
    mode = rng.random()
    if mode < 0.3:  # unanimous
        answer = rng.choice(group) if rng.random() < 0.85 else perturb(rng, rng.choice(group))
        return [answer] * 10
    if mode < 0.45:  # nine to one
        main, other = rng.sample(group, 2)
        answers = [main] * 9 + [other]
    else:  # split two to four ways, now and then with a stranger or a free-form answer
        pool = rng.sample(group, min(len(group), rng.randint(2, 4)))
        if rng.random() < 0.3:
            pool.append(rng.choice(rng.choice(groups)) if rng.random() < 0.5 else free_form(rng))
        if rng.random() < 0.3:
            pool.append(perturb(rng, rng.choice(pool)))
        answers = [rng.choice(pool) for _ in range(10)]
    rng.shuffle(answers)
    return answers


def prediction_for(rng: random.Random, group: list[str], answers: list[str], groups: list[list[str]]) -> str:
    draw = rng.random()
    if draw < 0.35:
        return rng.choice(answers)
    if draw < 0.6:
        return rng.choice(group)
    if draw < 0.85:
        return perturb(rng, rng.choice(answers if rng.random() < 0.5 else group))
    if draw < 0.93:
        return rng.choice(rng.choice(groups))
    return free_form(rng)


def make_cases(rng: random.Random, contractions: list[list[str]], count: int) -> list[dict]:
    groups = GROUPS + contractions
    cases = []
    for question_id in range(count):
        # the ~100 contraction groups would otherwise crowd out the rest
        group = rng.choice(GROUPS if rng.random() < 0.75 else contractions)
        answers = answers_for(rng, group, groups)
        prediction = prediction_for(rng, group, answers, groups)
        question_type = rng.choice(sorted(QUESTION_TYPES))
        cases.append(
            {
                "question_id": question_id,
                "question_type": question_type,
                "prediction": prediction,
                "answers": answers,
            }
        )
    return cases


def official_accuracy(vqa_eval: type, cases: list[dict]) -> tuple[dict[int, float], dict]:
    """Run `VQAEval.evaluate` on the cases; per-question accuracy (unrounded) and its own summary."""

    class Unrounded(vqa_eval):
        def setEvalQA(self, quesId, acc):  # noqa: N802, N803 - the official method's name
            self.evalQA[quesId] = acc

    gts = {
        case["question_id"]: {
            "question_id": case["question_id"],
            "question_type": case["question_type"],
            "answer_type": QUESTION_TYPES[case["question_type"]],
            "answers": [
                {"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
                for i, answer in enumerate(case["answers"])
            ],
        }
        for case in cases
    }
    res = {c["question_id"]: {"question_id": c["question_id"], "answer": c["prediction"]} for c in cases}
    vqa = types.SimpleNamespace(qa=copy.deepcopy(gts), getQuesIds=lambda: list(gts))  # evaluate edits qa
    scorer = Unrounded(vqa, types.SimpleNamespace(qa=res), n=2)
    with redirect_stdout(io.StringIO()):  # its progress bar
        scorer.evaluate()
    return scorer.evalQA, scorer.accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lavis", type=Path, required=True, help="salesforce-lavis 1.0.2 wheel, or it unpacked"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    vqa_eval, sha256 = load_vqa_eval(args.lavis)
    cases = make_cases(random.Random(SEED), contraction_groups(vqa_eval), CASES)
    accuracy, summary = official_accuracy(vqa_eval, cases)
    for case in cases:
        case["accuracy"] = accuracy[case["question_id"]]
    header = {
        "generator": "tests/training/make_vqa_eval_reference.py",
        "official": f"salesforce-lavis 1.0.2 (PyPI), {MODULE}, VQAEval.evaluate",
        "official_sha256": sha256,
        "seed": SEED,
        "overall": summary["overall"],
        "per_question_type": summary["perQuestionType"],
    }
    # one case per line: small diffs and readable failures
    lines = [json.dumps(case, ensure_ascii=False) for case in cases]
    text = (
        json.dumps(header, indent=1, ensure_ascii=False)[:-2]
        + ',\n "cases": [\n'
        + ",\n".join(lines)
        + "\n]}\n"
    )
    json.loads(text)  # well-formed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    unanimous = sum(len(set(c["answers"])) == 1 for c in cases)
    print(
        f"{args.out}: {len(cases)} questions ({unanimous} unanimous), official overall {summary['overall']}"
    )


if __name__ == "__main__":
    main()
