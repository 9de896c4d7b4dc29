"""The paper's evaluation metrics: VQAv2 accuracy, caption BLEU-4/CIDEr (+ METEOR/SPICE), retrieval recall@k.

- VQA: the official VQAv2 accuracy. Answers are normalised as the official evaluation does
  (punctuation, number words to digits, articles dropped, missing apostrophes restored); a prediction
  scores min(#humans who gave it / 3, 1), averaged over the 10 leave-one-out subsets of 9 humans.
  A row with a single reference answer counts as ten humans agreeing, so its accuracy is exact match.
- Captions: pycocoevalcap's BLEU and CIDEr-D, on captions tokenised by its PTB tokenizer where Java is
  present and by an equivalent Python tokenizer elsewhere; METEOR and SPICE only where Java (and, for
  SPICE, its Stanford CoreNLP jar) is present, otherwise they are skipped and reported as skipped.
- Retrieval: recall@k both ways from score matrices; several texts may belong to one image.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# --- VQA answer normalisation (the rules of the official VQAv2 evaluation) ---------------------------

_PUNCTUATION = list(';/[]"{}()=+\\_-><@`,?!')
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBER_WORDS = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}


def _contractions() -> dict[str, str]:
    """Words written without their apostrophe, mapped back (the official table's rules)."""
    table = {}
    negatives = "ain aren can couldn didn doesn don hadn hasn haven isn mightn mustn needn oughtn shan shouldn wasn weren won wouldn"
    for stem in negatives.split():
        table[stem + "t"] = stem + "'t"
    for stem in "could might must should would".split():
        table[stem + "ve"] = stem + "'ve"
        table[stem + "ntve"] = table[stem + "nt've"] = table[stem + "n'tve"] = stem + "n't've"
    for word, fixed in {
        "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "im": "i'm",
        "ive": "i've", "itd": "it'd", "itll": "it'll", "lets": "let's", "maam": "ma'am", "oclock": "o'clock",
        "shes": "she's", "thats": "that's", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
        "theyre": "they're", "theyve": "they've", "twas": "'twas", "wed": "we'd", "weve": "we've",
        "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
        "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
        "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
        "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
        "somebodys": "somebody's", "someones": "someone's", "somethings": "something's",
    }.items():  # fmt: skip
        table[word] = fixed
    return table


_CONTRACTIONS = _contractions()


def normalize_answer(answer: str) -> str:
    """Normalise an answer as the official VQAv2 evaluation does before comparing."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (normally 10)."""
    if not answers:
        raise ValueError("no reference answers")
    predicted = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in answers]
    if len(humans) == 1:
        return float(predicted == humans[0])
    scores = []
    for left_out in range(len(humans)):
        others = humans[:left_out] + humans[left_out + 1 :]
        scores.append(min(1.0, sum(h == predicted for h in others) / 3))
    return sum(scores) / len(scores)


def vqa_metrics(predictions: Sequence[str], rows: Sequence[dict]) -> dict:
    """Accuracy and exact match overall and per `question_type`; rows carry `answers` and/or `answer`."""
    totals: dict[str, list[float]] = {}
    for prediction, row in zip(predictions, rows, strict=True):
        answers = row.get("answers") or [row["answer"]]
        single = row.get("answer") or max(set(answers), key=answers.count)
        accuracy = vqa_accuracy(prediction, answers)
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
    return {**overall, "per_type": dict(sorted(table.items()))}


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
    """For each row, the rank (0-based) of the best-ranked relevant column."""
    order = scores.argsort(dim=1, descending=True)
    hits = torch.gather(relevant, 1, order)
    return hits.float().argmax(dim=1)


def retrieval_recall(
    scores_i2t: torch.Tensor,
    scores_t2i: torch.Tensor,
    text_image: Sequence[int] | torch.Tensor,
    ks: Iterable[int] = (1, 5, 10),
    text_caption: Sequence[int] | torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@k in percent. scores_i2t: (images, texts); scores_t2i: (texts, images);
    text_image[t]: the index of text t's image. An image's query hits when any of its texts is in the top k.
    text_caption[t], when given: an id of text t's wording; a text then also counts as the caption of every
    image that has a text worded the same (for data whose captions repeat across images).
    """
    text_image = torch.as_tensor(text_image)
    images = scores_i2t.shape[0]
    relevant_i2t = torch.arange(images)[:, None] == text_image[None, :]
    if text_caption is not None:
        text_caption = torch.as_tensor(text_caption)
        same_wording = (text_caption[:, None] == text_caption[None, :]).float()
        relevant_i2t = (relevant_i2t.float() @ same_wording) > 0
    i2t_ranks = _first_hit_ranks(scores_i2t.float().cpu(), relevant_i2t)
    t2i_ranks = _first_hit_ranks(scores_t2i.float().cpu(), relevant_i2t.T.contiguous())
    metrics = {}
    for k in ks:
        metrics[f"i2t_r{k}"] = 100 * (i2t_ranks < k).float().mean().item()
        metrics[f"t2i_r{k}"] = 100 * (t2i_ranks < k).float().mean().item()
    metrics["r_mean"] = sum(metrics.values()) / len(metrics)
    return metrics
