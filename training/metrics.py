"""The paper's evaluation metrics: VQAv2 accuracy, caption BLEU-4/CIDEr (+ METEOR/SPICE), retrieval recall@k.

Each follows the arithmetic of the official script behind published figures, quirks included:
- VQA: the official VQAv2 accuracy (`VQAEval`, as LAVIS ships it). The prediction is normalised fully
  (punctuation, lower case, number words to digits, articles dropped, missing apostrophes restored) but
  the human answers only for punctuation, and not at all when the ten agree (see `vqa_accuracy`); a
  prediction scores min(#other humans who gave it / 3, 1), averaged over the leave-one-out subsets.
  A row with a single reference answer counts as ten humans agreeing. `scoring="lenient"` (off by
  default, named in the metrics) normalises the human answers fully too.
- Captions: pycocoevalcap's BLEU and CIDEr-D, on captions tokenised by its PTB tokenizer where Java is
  present and by a Python approximation of it elsewhere (the metrics name the tokenizer; figures from
  the Python one are not comparable with published ones); METEOR and SPICE only where Java (and, for
  SPICE, its Stanford CoreNLP jar) is present, otherwise they are skipped and reported as skipped.
- Retrieval: recall@k both ways from score matrices, as LAVIS's `_report_metrics` (its tie order,
  float64 percentages); several texts may belong to one image.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# --- VQA: the arithmetic of the official VQAv2 evaluation (VQAEval), quirks included ---------------------

_PUNCTUATION = list(';/[]"{}()=+\\_-><@`,?!')
# The official pattern, typo included: "(?!<=\d)" is a lookahead for the text "<=" + digit, not a
# lookbehind, so a period is dropped unless a digit follows it ("1.5" stays, "3." loses its period).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official script passes re.UNICODE as `sub`'s third positional argument, which is `count`: only the
# first 32 such periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBER_WORDS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
# Each line: the written-out form, then the spellings the official table maps to it. Its entries with a
# capital letter (Im, Ive, Id've, I'dve) are left out, as they never match a lower-cased word (so "im"
# stays "im"); so are let's and she's, which it maps to themselves. "somebody'd" really goes to "somebodyd".
_CONTRACTION_SPELLINGS = """
'ow's'at ow's'at 'ows'at 'ow'sat
'twas twas
ain't aint
aren't arent
can't cant
could've couldve
couldn't couldnt
couldn't've couldn'tve couldnt've
didn't didnt
doesn't doesnt
don't dont
hadn't hadnt
hadn't've hadnt've hadn'tve
hasn't hasnt
haven't havent
he'd hed
he'd've hed've he'dve
he's hes
how'd howd
how'll howll
how's hows
isn't isnt
it'd itd
it'd've itd've it'dve
it'll itll
ma'am maam
might've mightve
mightn't mightnt
mightn't've mightnt've mightn'tve
must've mustve
mustn't mustnt
needn't neednt
not've notve
o'clock oclock
oughtn't oughtnt
shan't shant
she'd've shed've she'dve
should've shouldve
shouldn't shouldnt
shouldn't've shouldnt've shouldn'tve
somebody'd've somebodyd've somebody'dve
somebody'll somebodyll
somebody's somebodys
somebodyd somebody'd
someone'd someoned
someone'd've someoned've someone'dve
someone'll someonell
someone's someones
something'd somethingd
something'd've somethingd've something'dve
something'll somethingll
that's thats
there'd thered
there'd've thered've there'dve
there're therere
there's theres
they'd theyd
they'd've theyd've they'dve
they'll theyll
they're theyre
they've theyve
wasn't wasnt
we'd've wed've we'dve
we've weve
weren't werent
what'll whatll
what're whatre
what's whats
what've whatve
when's whens
where'd whered
where's wheres
where've whereve
who'd whod
who'd've whod've who'dve
who'll wholl
who's whos
who've whove
why'll whyll
why're whyre
why's whys
won't wont
would've wouldve
wouldn't wouldnt
wouldn't've wouldnt've wouldn'tve
y'all yall
y'all'd've yall'd've y'alld've y'all'dve
y'all'll yall'll y'allll
you'd youd
you'd've youd've you'dve
you'll youll
you're youre
you've youve
"""
_CONTRACTIONS = {
    spelling: written
    for line in _CONTRACTION_SPELLINGS.strip().splitlines()
    for written, *spellings in [line.split()]
    for spelling in spellings
}
VQA_SCORING = ("official", "lenient")


def strip_punctuation(text: str) -> str:
    """The official punctuation rule (`processPunctuation`), the only step applied to human answers.

    Each mark is deleted if it touches a space anywhere in the text, or if the text has a comma between
    two digits anywhere ("3,000"); otherwise it becomes a space ("t-shirt" -> "t shirt"). Then periods
    not followed by a digit are deleted (the first 32 of them).
    """
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for mark in _PUNCTUATION:
        # tested on the text as given, not as rewritten so far, as the official loop does
        if digit_comma or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def normalize_answer(answer: str) -> str:
    """Normalise a prediction as the official VQAv2 evaluation does: tabs and newlines to spaces, outer
    spaces stripped, punctuation (`strip_punctuation`), lower case, number words to digits ("none" ->
    "0"), articles dropped, apostrophe-less contractions restored ("dont" -> "don't")."""
    text = strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str], scoring: str = "official") -> float:
    """VQAv2 accuracy of one prediction against the human answers (normally 10), in [0, 1].

    `scoring="official"` (the default) is the official evaluation's arithmetic (`VQAEval.evaluate`), the
    one behind published VQAv2 figures, quirk included: the prediction is normalised fully
    (`normalize_answer`) but the human answers are not. When they are not all the same they only go through
    `strip_punctuation` (no lower case, number words, articles or contractions; not even stripped), and
    when all agree they are compared as written. So a prediction "two" never matches the answer "Two",
    "the dog" never matches a unanimous "the dog", and "t-shirt" never matches a unanimous "t-shirt"
    (the prediction becomes "t shirt"). The annotation files ship answers mostly normalised already, which
    keeps the effect small on VQAv2 itself.

    Each human is left out in turn and the prediction scores min(1, #other humans who gave it / 3); the
    accuracy is the mean over those subsets (one per human, as the official answer dicts differ by
    `answer_id`). A single answer counts as ten humans agreeing: the accuracy is 1 if the normalised
    prediction equals it as written, else 0 (the official loop would give 0 whatever the prediction).

    `scoring="lenient"` normalises the human answers fully too: not comparable with published figures, but
    fairer to data whose answers are not already normalised (capitals, articles, hyphens).
    """
    if not answers:
        raise ValueError("no reference answers")
    if scoring not in VQA_SCORING:
        raise ValueError(f"scoring must be one of {VQA_SCORING}, not {scoring!r}")
    predicted = normalize_answer(prediction)
    if scoring == "lenient":
        humans = [normalize_answer(a) for a in answers]
    elif len(set(answers)) > 1:
        humans = [strip_punctuation(a) for a in answers]
    else:
        humans = list(answers)
    if len(humans) == 1:
        return float(predicted == humans[0])
    matches = [h == predicted for h in humans]
    total = sum(matches)
    # the official per-subset score and mean, in its order of operations (the sums are bit-identical)
    scores = [min(1, float(total - match) / 3) for match in matches]
    return float(sum(scores)) / len(scores)


def vqa_metrics(predictions: Sequence[str], rows: Sequence[dict], scoring: str = "official") -> dict:
    """Accuracy (`vqa_accuracy`) and exact match overall and per `question_type`, in percent; rows carry
    `answers` and/or `answer`. Exact match is this project's figure, not the official script's: the
    normalised prediction against `answer` (else the most common human answer), both normalised."""
    totals: dict[str, list[float]] = {}
    for prediction, row in zip(predictions, rows, strict=True):
        answers = row.get("answers") or [row["answer"]]
        single = row.get("answer") or max(set(answers), key=answers.count)
        accuracy = vqa_accuracy(prediction, answers, scoring)
        exact = float(normalize_answer(prediction) == normalize_answer(single))
        for key in ("all", row.get("question_type")):
            if key is not None:
                bucket = totals.setdefault(str(key), [0.0, 0.0, 0])
                bucket[0] += accuracy
                bucket[1] += exact
                bucket[2] += 1
    table = {
        key: {"accuracy": 100 * acc / n, "exact_match": 100 * exact / n, "count": n}
        for key, (acc, exact, n) in totals.items()
    }
    overall = table.pop("all", {"accuracy": 0.0, "exact_match": 0.0, "count": 0})
    return {**overall, "per_type": dict(sorted(table.items())), "scoring": scoring}


# --- captions ------------------------------------------------------------------------------------------

_PTB_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}  # fmt: skip
_WORDS = re.compile(r"\d+(?:[.,]\d+)+|[a-z0-9]+(?=n't)|n't|'[a-z]+|[a-z0-9]+|\.\.\.|--|[^\sa-z0-9]")
# PTB writes brackets as -lrb- etc., and (lower-cased) pycocoevalcap keeps them
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """A Python stand-in for pycocoevalcap's PTB tokenizer: lowercase words, punctuation tokens dropped."""
    tokens = [_BRACKETS.get(t, t) for t in _WORDS.findall(text.lower().replace("\n", " "))]
    return " ".join(t for t in tokens if t not in _PTB_DROPPED)


def _tokenize(captions: dict, use_java: bool) -> dict[str, list[str]]:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def _spice_ready() -> bool:
    import pycocoevalcap.spice as spice

    return (Path(spice.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar").exists()


def caption_metrics(
    predictions: dict[str, str], references: dict[str, list[str]], java: bool | None = None
) -> dict:
    """Corpus BLEU-1..4 and CIDEr(-D) in percent; METEOR and SPICE too where Java allows.

    `java=None` uses Java where it is installed; `java=False` never starts it (tokenisation in Python,
    METEOR/SPICE skipped), which makes scores identical across machines with and without Java.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        raise ValueError("predictions and references must cover the same images")
    use_java = java_available() if java is None else java
    gts = _tokenize(references, use_java)
    res = _tokenize({k: [v] for k, v in predictions.items()}, use_java)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    metrics = {f"bleu_{n + 1}": 100 * float(b) for n, b in enumerate(bleu)}
    metrics["cider"] = 100 * float(cider)
    skipped = []
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        metrics["meteor"] = 100 * float(Meteor().compute_score(gts, res)[0])
        if _spice_ready():
            from pycocoevalcap.spice.spice import Spice

            metrics["spice"] = 100 * float(Spice().compute_score(gts, res)[0])
        else:
            skipped.append("spice (no Stanford CoreNLP 3.6.0 jar; pycocoevalcap downloads it on first use)")
    else:
        skipped += ["meteor (no Java)", "spice (no Java)"]
    metrics["tokenizer"] = "ptb" if use_java else "python"
    metrics["skipped"] = skipped
    return metrics


# --- retrieval -----------------------------------------------------------------------------------------


def _first_hit_ranks(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """For each row, the rank (0-based) of the best-ranked relevant column (the row's length if none).

    The order is LAVIS's (`_report_metrics`: `np.argsort(score)[::-1]`) with numpy keeping equal scores
    in column order: best score first and, among equal scores, the later column first. Ties are common
    where captions repeat across images (identical texts score identically). numpy's default sort does
    not promise that order (its AVX-512 sort does not keep it), so on such data LAVIS's own figures can
    vary with the machine; this is the order its code means and numpy's generic sort gives.
    """
    # float64 holds float32/16 scores exactly, so converting never creates or breaks a tie
    order = scores.double().argsort(dim=1, stable=True).flip(1)
    hits = torch.gather(relevant, 1, order)
    first = hits.to(torch.uint8).argmax(dim=1)
    return torch.where(hits.any(dim=1), first, torch.full_like(first, scores.shape[1]))


def _percent(ranks: torch.Tensor, k: int) -> float:
    # LAVIS's arithmetic, in Python floats (float64): 100.0 * hits / queries
    return 100.0 * int((ranks < k).sum()) / len(ranks)


def retrieval_recall(
    scores_i2t: torch.Tensor,
    scores_t2i: torch.Tensor,
    text_image: Sequence[int] | torch.Tensor,
    ks: Iterable[int] = (1, 5, 10),
    text_caption: Sequence[int] | torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@k in percent, as LAVIS's `_report_metrics` computes it (tie order and float64 percentages).

    scores_i2t: (images, texts); scores_t2i: (texts, images); text_image[t]: the index of text t's image.
    An image's query hits when any of its texts is in the top k. text_caption[t], when given: an id of text
    t's wording; a text then also counts as the caption of every image that has a text worded the same (for
    data whose captions repeat across images). `i2t_r_mean`/`t2i_r_mean` are the means over `ks` (LAVIS's
    txt_r_mean/img_r_mean) and `r_mean` their mean.
    """
    ks = list(ks)
    text_image = torch.as_tensor(text_image)
    images = scores_i2t.shape[0]
    relevant_i2t = torch.arange(images)[:, None] == text_image[None, :]
    if text_caption is not None:
        text_caption = torch.as_tensor(text_caption)
        same_wording = (text_caption[:, None] == text_caption[None, :]).float()
        relevant_i2t = (relevant_i2t.float() @ same_wording) > 0
    i2t_ranks = _first_hit_ranks(scores_i2t.detach().cpu(), relevant_i2t)
    t2i_ranks = _first_hit_ranks(scores_t2i.detach().cpu(), relevant_i2t.T.contiguous())
    metrics = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = _percent(i2t_ranks, k)
        metrics[f"t2i_r{k}"] = _percent(t2i_ranks, k)
    i2t_mean = sum(metrics[f"i2t_r{k}"] for k in ks) / len(ks)
    t2i_mean = sum(metrics[f"t2i_r{k}"] for k in ks) / len(ks)
    metrics |= {"i2t_r_mean": i2t_mean, "t2i_r_mean": t2i_mean, "r_mean": (i2t_mean + t2i_mean) / 2}
    return metrics
