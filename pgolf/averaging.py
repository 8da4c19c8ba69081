"""SWA: a running fp32 average of model weights, applied before export."""
from __future__ import annotations

import torch


class SWA:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    @torch.no_grad()
    def add(self, model: torch.nn.Module) -> None:
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name in self.sums:
                self.sums[name].add_(t.float())
            else:
                self.sums[name] = t.detach().float().clone()
        self.count += 1

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        """Replace the model's float weights with the average (no-op before the first add)."""
        if not self.count:
            return
        state = model.state_dict()
        for name, total in self.sums.items():
            state[name].copy_((total / self.count).to(state[name].dtype))
