import subprocess
import sys

import torch

from training.data import caption_ids
from training.losses import positive_pairs, sample_hard_negatives

TEXTS = ["a red circle", "a red circle", "a blue square", "a green triangle"]


def test_same_caption_rows_are_positives_and_never_itm_negatives():
    images = torch.arange(4)
    assert torch.equal(positive_pairs(images), torch.eye(4, dtype=torch.bool))
    positives = positive_pairs(images, caption_ids(TEXTS))
    expected = torch.eye(4, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = True
    assert torch.equal(positives, expected)
    uniform = torch.zeros(4, 4)  # every negative equally likely: a same-caption row would be drawn often
    torch.manual_seed(0)
    for _ in range(200):
        negatives = sample_hard_negatives(uniform, uniform, positives)
        for row, (image, text) in enumerate(
            zip(negatives.image_for_text, negatives.text_for_image, strict=True)
        ):
            assert not positives[row, image] and not positives[row, text]


def test_caption_ids_are_the_same_in_every_process():
    # DDP ranks gather each other's ids: they must not depend on Python's per-process string hash salt
    code = f"from training.data import caption_ids; print(caption_ids({TEXTS!r}).tolist())"
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }  # fmt: skip
    assert runs == {f"{caption_ids(TEXTS).tolist()}\n"}
