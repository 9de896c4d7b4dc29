"""Cross-rank gathers: two gloo processes under torchrun equal one process holding the whole batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.assemble import preset
from training.losses import HardNegatives, stage1_losses

ROOT = Path(__file__).resolve().parents[2]


def global_batch():
    """8 samples; each half has the same number of text tokens, so per-rank ITG means average exactly."""
    generator = torch.Generator().manual_seed(123)
    vision_hidden = torch.randn(8, 65, 64, generator=generator)
    lengths = [5, 7, 4, 6, 6, 4, 7, 5]
    input_ids = torch.zeros(8, 7, dtype=torch.long)
    attention_mask = torch.zeros(8, 7, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, 0], input_ids[row, length - 1] = 2, 3  # [CLS] ... [SEP]
        input_ids[row, 1 : length - 1] = torch.randint(5, 300, (length - 2,), generator=generator)
        attention_mask[row, :length] = 1
    # Negatives cross the rank boundary on purpose: rows 0-3 live on rank 0, rows 4-7 on rank 1.
    negatives = HardNegatives(
        image_for_text=torch.tensor([5, 6, 0, 7, 1, 2, 3, 0]),
        text_for_image=torch.tensor([4, 0, 7, 1, 3, 6, 2, 5]),
    )
    return vision_hidden, input_ids, attention_mask, negatives


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    out = tmp_path / "ddp.safetensors"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),  # a fixed port collides with any other run of the suite on the machine
    ]
    command += [str(ROOT / "tests" / "training" / "ddp_worker.py"), str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = load_file(str(out))

    model = preset("tiny-opt").stage1.eval()
    model.retrieval.vision_model.embeddings.requires_grad_(False)
    model.retrieval.vision_model.encoder.requires_grad_(False)
    vision_hidden, input_ids, attention_mask, negatives = global_batch()
    losses = stage1_losses(model, vision_hidden, input_ids, attention_mask, hard_negatives=negatives)
    losses.total.backward()

    torch.testing.assert_close(
        distributed["losses"], torch.stack([losses.itc, losses.itm, losses.itg]).detach()
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {k.removeprefix("grad.") for k in distributed if k.startswith("grad.")}
    for name, param in trainable.items():
        torch.testing.assert_close(distributed["grad." + name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
