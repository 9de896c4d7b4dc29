"""Run by test_distributed.py under `torchrun --nproc_per_node 2`: each rank holds half of a global batch.

Rank 0 writes the rank-averaged losses and the DDP-averaged gradients to the file given as argv[1].
"""

import sys

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.training.test_distributed import global_batch
from training import distributed
from training.assemble import preset
from training.losses import HardNegatives, stage1_losses


class Losses(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, vision_hidden, input_ids, attention_mask, negatives):
        losses = stage1_losses(self.model, vision_hidden, input_ids, attention_mask, hard_negatives=negatives)
        return losses.total, torch.stack([losses.itc, losses.itm, losses.itg])


def main(out: str) -> None:
    distributed.setup("cpu")
    rank, world = distributed.rank(), distributed.world_size()
    model = preset("tiny-opt").stage1.eval()
    model.retrieval.vision_model.embeddings.requires_grad_(False)
    model.retrieval.vision_model.encoder.requires_grad_(False)
    vision_hidden, input_ids, attention_mask, negatives = global_batch()
    rows = slice(rank * len(input_ids) // world, (rank + 1) * len(input_ids) // world)
    local_negatives = HardNegatives(negatives.image_for_text[rows], negatives.text_for_image[rows])
    ddp = DistributedDataParallel(Losses(model))
    total, parts = ddp(vision_hidden[rows], input_ids[rows], attention_mask[rows], local_negatives)
    total.backward()
    torch.distributed.all_reduce(parts)
    if rank == 0:
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        save_file({"losses": parts / world, **{"grad." + n: g.contiguous() for n, g in grads.items()}}, out)
    del ddp, total  # the DDP wrapper goes before the process group (see distributed.teardown)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
