"""The peer baseline: the same model, batch and data trained with Hugging Face accelerate (DDP).

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 bench/accelerate_train.py OUT.json STEPS

Written the way accelerate's examples are: Accelerator(), prepare(), accelerator.backward(),
clip_grad_norm_, one AdamW. It reads fmtrain's tokenized cache through the same sampler, so both
frameworks see identical batches.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType

from fmtrain.data import GlobalBatches, prepare
from fmtrain.models.llama import Transformer
from launch.compose import compose


def main(out: str, steps: int) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    assert accelerator.num_processes == 2, accelerator.num_processes
    cfg = compose(["launcher.nproc=2"])
    corpus = prepare(cfg.data, cfg.model.vocab_size)
    batches = GlobalBatches(corpus.train, cfg.data.seq_len, cfg.seed)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device="cpu")
    model.init_weights(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    micro = cfg.trainer.global_batch_size // 2
    warmup, start, forward_backward = 5, 0.0, 0.0
    for step in range(steps):
        if step == warmup:
            start, forward_backward = time.perf_counter(), 0.0
        batch = batches.micro_batch(step * cfg.trainer.global_batch_size, 0, accelerator.process_index, micro, 2)
        began = time.perf_counter()
        loss = F.cross_entropy(model(batch["input_ids"]).flatten(0, 1).float(), batch["labels"].flatten())
        accelerator.backward(loss)
        forward_backward += time.perf_counter() - began
        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    elapsed = time.perf_counter() - start
    tokens_per_s = (steps - warmup) * cfg.trainer.global_batch_size * cfg.data.seq_len / elapsed
    if accelerator.is_main_process:
        with open(out, "w") as f:
            # forward_backward_share: the part of the step both frameworks spend in the same model's
            # forward and backward (with DDP's all-reduce overlapped); what is left is the loop's.
            share = forward_backward / elapsed
            json.dump({"tokens_per_s": tokens_per_s, "loss": loss.item(), "forward_backward_share": share}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
