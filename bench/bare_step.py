"""The bare reference for the start-up benchmark: under torchrun, build the model and take one step.

torchrun --standalone --nproc_per_node=1 bench/bare_step.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmtrain.config import ModelConfig
from fmtrain.models.llama import Transformer


def main() -> None:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ModelConfig(dim=256, n_layers=4, n_heads=4, max_seq_len=1024))
    model.to_empty(device="cpu")
    model.init_weights(1337)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 256, (16, 257))
    loss = F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    print(f"loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
