"""Each metric pinned against cases computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.metrics import (
    caption_metrics,
    normalize_answer,
    retrieval_recall,
    simple_tokenize,
    vqa_accuracy,
    vqa_metrics,
)

# Ten human answers: 4 x yes, 3 x yeah, 2 x no, 1 x maybe.
HUMANS = ["yes"] * 4 + ["yeah"] * 3 + ["no"] * 2 + ["maybe"]


@pytest.mark.parametrize(
    "prediction, expected",
    [
        # leaving out one of the 4 "yes": 3 others agree -> 1; leaving out any other: 4 agree -> 1
        ("yes", 1.0),
        # leaving out a "yeah" (3 subsets): 2 agree -> 2/3; otherwise (7): 3 agree -> 1. (3*2/3 + 7)/10
        ("yeah", 0.9),
        # leaving out a "no" (2): 1/3; otherwise (8): 2/3. (2/3 + 16/3)/10
        ("no", 0.6),
        # leaving out "maybe" (1): 0; otherwise (9): 1/3. 3/10
        ("maybe", 0.3),
        ("blue", 0.0),
    ],
)
def test_vqa_accuracy_ten_humans(prediction, expected):
    assert vqa_accuracy(prediction, HUMANS) == pytest.approx(expected)


def test_vqa_answer_normalisation():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("The Dog!") == "dog"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("a red-and-white\tsign") == "red and white sign"
    # normalisation applies before counting: "2" and "two" are the same answer
    assert vqa_accuracy("two", ["2", "2", "2", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "prediction, answers, official, lenient",
    [
        # the prediction is normalised ("dog"), a unanimous answer is compared as written ("the dog")
        ("the dog", ["the dog"] * 10, 0.0, 1.0),
        # a unanimous "t-shirt": the prediction becomes "t shirt", the answers stay "t-shirt"
        ("t-shirt", ["t-shirt"] * 10, 0.0, 1.0),
        # split answers only lose punctuation: "one dog" stays, the prediction is "1 dog"
        ("one dog", ["none"] * 3 + ["one dog"] * 4 + ["red"] * 3, 0.0, 1.0),
        # "TWO" -> "2" matches the one "2" but not the four "Two": 9 subsets of 1/3 -> 0.3
        ("TWO", ["2"] + ["Two"] * 4 + ["apple"] * 5, 0.3, 1.0),
        # split answers lose their punctuation and nothing else: "red." -> "red" (5 agree: 1.0) but
        # "Red." -> "Red", which never equals a normalised prediction
        ("red", ["red."] * 5 + ["Red."] * 5, 1.0, 1.0),
        ("red", ["Red."] * 9 + ["blue"], 0.0, 1.0),
        # a comma between digits anywhere: every mark is deleted, not turned into a space
        ("3,000", ["3000"] * 6 + ["three thousand"] * 4, 1.0, 1.0),
        # (3 humans agree: leaving one of them out leaves 2/3, any other 1 -> (3 * 2/3 + 7) / 10)
        ("red-white 1,0", ["redwhite 10"] * 3 + ["x"] * 7, 0.9, 0.9),
        # a single answer is ten agreeing humans: compared as written
        ("Blue", ["blue"], 1.0, 1.0),
        ("two", ["Two"], 0.0, 1.0),
    ],
)
def test_vqa_official_quirks_and_lenient_option(prediction, answers, official, lenient):
    assert vqa_accuracy(prediction, answers) == pytest.approx(official)
    assert vqa_accuracy(prediction, answers, scoring="lenient") == pytest.approx(lenient)


def test_vqa_official_contraction_table_quirks():
    # its "Im"/"Ive" keys are capitalised and never match a lower-cased word; "somebody'd" loses its apostrophe
    assert normalize_answer("Im") == "im"
    assert normalize_answer("couldnt've") == normalize_answer("couldn'tve") == "couldn't've"
    assert normalize_answer("couldntve") == "couldntve"
    assert normalize_answer("somebody'd") == "somebodyd"
    # periods: kept before a digit, and at most 32 removed
    assert normalize_answer("3.5.") == "3.5"
    assert normalize_answer("a" + "." * 40) == "a" + "." * 8


def test_vqa_metrics_names_its_scoring():
    rows = [{"answers": ["The Dog"] * 10, "question_type": "what"}]
    assert vqa_metrics(["the dog"], rows)["scoring"] == "official"
    assert vqa_metrics(["the dog"], rows)["accuracy"] == 0.0
    lenient = vqa_metrics(["the dog"], rows, scoring="lenient")
    assert lenient["scoring"] == "lenient" and lenient["accuracy"] == 100.0
    with pytest.raises(ValueError, match="scoring"):
        vqa_accuracy("a", ["a"], scoring="strict")


def test_vqa_single_answer_is_exact_match_and_per_type():
    rows = [
        {"answer": "blue", "question_type": "color"},
        {"answer": "circle", "question_type": "shape"},
        {"answer": "yes", "question_type": "yes/no"},
        {"answer": "no", "question_type": "yes/no"},
        {"answers": HUMANS, "answer": "yes", "question_type": "yes/no"},
    ]
    metrics = vqa_metrics(["Blue", "triangle", "yes", "yes", "yeah"], rows)
    # accuracy: 1 + 0 + 1 + 0 + 0.9 = 2.9 / 5; exact match: 1 + 0 + 1 + 0 + 0 = 2 / 5
    assert metrics["accuracy"] == pytest.approx(58.0)
    assert metrics["exact_match"] == pytest.approx(40.0)
    assert metrics["count"] == 5
    assert metrics["per_type"]["yes/no"]["accuracy"] == pytest.approx(100 * 1.9 / 3)
    assert metrics["per_type"]["color"]["exact_match"] == 100.0
    assert metrics["per_type"]["shape"]["accuracy"] == 0.0


def test_bleu_and_cider_on_a_two_caption_corpus():
    references = {"1": ["the cat sat on a mat"], "2": ["a dog runs"]}
    predictions = {"1": "The cat sat on the mat.", "2": "a dog runs"}
    metrics = caption_metrics(predictions, references, java=False)
    # Corpus BLEU, clipped n-gram matches summed over both captions (lengths 6+3 = refs 6+3, BP = 1):
    #   1-grams: (5 + 3) / (6 + 3); 2-grams: (3 + 2) / (5 + 2); 3-grams: (2 + 1) / (4 + 1); 4-grams: 1 / 3
    precisions = [8 / 9, 5 / 7, 3 / 5, 1 / 3]
    bleu_4 = math.exp(sum(math.log(p) for p in precisions) / 4)
    assert metrics["bleu_4"] == pytest.approx(100 * bleu_4, rel=1e-6)
    assert metrics["bleu_1"] == pytest.approx(100 * 8 / 9, rel=1e-6)
    # CIDEr-D with 2 images: idf = log(2 / df). Every n-gram of "a dog runs" occurs in one reference
    # only (df = 1), so for image 2 each of n = 1, 2, 3 has cosine 1 and n = 4 is empty:
    # 10 * (1 + 1 + 1 + 0) / 4 = 7.5. Image 1 ("the cat sat on the mat" vs "the cat sat on a mat"):
    # the n-grams of image 1's reference all have df = 1 except "a" (df = 2, idf 0).
    #   n=1: cand tf {the:2, cat, sat, on, mat}, ref {the, cat, sat, on, a(idf 0), mat}, weight log 2 each;
    #        dot = min(2,1)*1 + 4 = 5 (the clipped "the"), |c| = sqrt(4 + 4), |r| = sqrt(5) -> 5 / sqrt(40)
    #   n=2: cand {the cat, cat sat, sat on, on the, the mat}, ref {the cat, cat sat, sat on, on a, a mat}
    #        -> 3 / (sqrt 5 * sqrt 5) = 0.6;  n=3: 2 / 4 = 0.5;  n=4: 1 / 3
    # lengths are equal, so no length penalty: 10 * (5/sqrt(40) + 0.6 + 0.5 + 1/3) / 4
    cider_1 = 10 * (5 / math.sqrt(40) + 0.6 + 0.5 + 1 / 3) / 4
    assert metrics["cider"] == pytest.approx(100 * (cider_1 + 7.5) / 2, rel=1e-6)
    assert metrics["tokenizer"] == "python"
    assert "meteor (no Java)" in metrics["skipped"]


def test_python_tokenizer_matches_ptb_rules():
    assert simple_tokenize("A man's hat, on the mat.") == "a man 's hat on the mat"


def test_recall_at_k_with_duplicated_image_ids():
    # 3 images; texts 0,1 belong to image 0, text 2 to image 1, texts 3,4 to image 2.
    text_image = [0, 0, 1, 2, 2]
    i2t = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.2, 0.0],  # image 0: best text 1 (its own) -> hit at rank 0
            [0.8, 0.7, 0.6, 0.1, 0.0],  # image 1: its text 2 is ranked third -> rank 2
            [0.9, 0.1, 0.2, 0.3, 0.8],  # image 2: text 0, then text 4 (its own) -> rank 1
        ]
    )
    t2i = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # text 0 -> image 0 first: rank 0
            [0.1, 0.9, 0.0],  # text 1 -> image 1, then its image 0 ... rank 1
            [0.1, 0.9, 0.5],  # text 2 -> image 1: rank 0
            [0.5, 0.4, 0.3],  # text 3 -> image 2 ranked last: rank 2
            [0.0, 0.1, 0.9],  # text 4 -> image 2: rank 0
        ]
    )
    metrics = retrieval_recall(i2t, t2i, text_image, ks=(1, 2, 3))
    assert metrics["i2t_r1"] == pytest.approx(100 / 3)
    assert metrics["i2t_r2"] == pytest.approx(200 / 3)
    assert metrics["i2t_r3"] == pytest.approx(100.0)
    assert metrics["t2i_r1"] == pytest.approx(60.0)
    assert metrics["t2i_r2"] == pytest.approx(80.0)
    assert metrics["t2i_r3"] == pytest.approx(100.0)


def test_recall_with_same_caption_positives_counts_identical_wording_as_a_hit():
    # three images, each with one caption; images 0 and 2 are both "a red circle"
    text_image, text_caption = [0, 1, 2], [0, 1, 0]
    i2t = torch.tensor(
        [
            [0.1, 0.5, 0.9],  # image 0: text 2 first: another image's text, worded as its own -> hit
            [0.9, 0.1, 0.5],  # image 1: text 0 first ("a red circle", not its wording) -> miss
            [0.8, 0.1, 0.2],  # image 2: text 0 first, worded as its own -> hit
        ]
    )
    t2i = i2t.T.contiguous()  # text 0 -> image 1 first: miss; text 1 -> image 0: miss; text 2 -> image 0: hit
    by_image = retrieval_recall(i2t, t2i, text_image, ks=(1,))
    by_wording = retrieval_recall(i2t, t2i, text_image, ks=(1,), text_caption=text_caption)
    assert by_image["i2t_r1"] == pytest.approx(0.0) and by_image["t2i_r1"] == pytest.approx(0.0)
    assert by_wording["i2t_r1"] == pytest.approx(200 / 3)
    assert by_wording["t2i_r1"] == pytest.approx(100 / 3)


def test_recall_breaks_ties_as_lavis_does():
    # LAVIS ranks with np.argsort(score)[::-1]: among equal scores the later column comes first.
    text_image = [0, 1, 2, 2]
    i2t = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.1],  # image 0: texts 2, 1, 0 (its own) -> rank 2
            [0.9, 0.9, 0.2, 0.2],  # image 1: text 1 (its own), then 0 -> rank 0
            [0.7, 0.1, 0.1, 0.1],  # image 2: text 0, then 3 (its own) -> rank 1
        ]
    )
    t2i = torch.tensor(
        [
            [0.4, 0.4, 0.4],  # text 0: images 2, 1, 0 (its own) -> rank 2
            [0.6, 0.6, 0.1],  # text 1: image 1 (its own) -> rank 0
            [0.3, 0.3, 0.3],  # text 2: image 2 (its own) -> rank 0
            [0.2, 0.5, 0.5],  # text 3: image 2 (its own) -> rank 0
        ]
    )
    metrics = retrieval_recall(i2t, t2i, text_image, ks=(1, 2, 3))
    assert [metrics[f"i2t_r{k}"] for k in (1, 2, 3)] == [100 * 1 / 3, 100 * 2 / 3, 100.0]
    assert [metrics[f"t2i_r{k}"] for k in (1, 2, 3)] == [75.0, 75.0, 100.0]
    assert metrics["r_mean"] == ((100 / 3 + 200 / 3 + 100) / 3 + (75 + 75 + 100) / 3) / 2


def _recall_as_lavis(i2t: np.ndarray, t2i: np.ndarray, text_image: list[int]) -> dict[str, float]:
    """LAVIS's `_report_metrics` rewritten for the test, with numpy's stable sort pinning its tie order."""

    def percent(ranks, k):
        return 100.0 * len(np.where(ranks < k)[0]) / len(ranks)

    i2t_ranks = np.zeros(i2t.shape[0])
    for image, row in enumerate(i2t):
        order = np.argsort(row, kind="stable")[::-1]
        own = [t for t, i in enumerate(text_image) if i == image]
        i2t_ranks[image] = min(np.where(order == t)[0][0] for t in own)
    t2i_ranks = np.zeros(t2i.shape[0])
    for text, row in enumerate(t2i):
        order = np.argsort(row, kind="stable")[::-1]
        t2i_ranks[text] = np.where(order == text_image[text])[0][0]
    out = {
        f"{name}_r{k}": percent(r, k)
        for name, r in (("i2t", i2t_ranks), ("t2i", t2i_ranks))
        for k in (1, 5, 10)
    }
    tr_mean = (out["i2t_r1"] + out["i2t_r5"] + out["i2t_r10"]) / 3
    ir_mean = (out["t2i_r1"] + out["t2i_r5"] + out["t2i_r10"]) / 3
    return out | {"i2t_r_mean": tr_mean, "t2i_r_mean": ir_mean, "r_mean": (tr_mean + ir_mean) / 2}


@pytest.mark.parametrize("seed", range(5))
def test_recall_equals_lavis_on_tied_float32_scores(seed):
    # few distinct values: most rows are full of ties, as when captions repeat across images
    generator = torch.Generator().manual_seed(seed)
    images, texts = 37, 74
    text_image = torch.randint(0, images, (texts,), generator=generator)
    text_image[:images] = torch.arange(images)  # every image has a text
    i2t = torch.randint(0, 4, (images, texts), generator=generator).float() / 3  # float32, as LAVIS's
    t2i = torch.randint(0, 4, (texts, images), generator=generator).float() / 3
    ours = retrieval_recall(i2t, t2i, text_image)
    expected = _recall_as_lavis(i2t.numpy(), t2i.numpy(), text_image.tolist())
    assert ours == expected  # float64 arithmetic in the same order: equal, not just close
