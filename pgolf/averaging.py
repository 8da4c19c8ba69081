"""Weight averages applied before export: SWA (a running fp32 mean of checkpoints) and EMA (an fp32
exponential moving average updated every step, decay 0.9965 in the 1.0611 record)."""
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


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: t.detach().float().clone() for k, t in model.state_dict().items() if t.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        for name, avg in self.shadow.items():
            avg.mul_(self.decay).add_(state[name].detach().float(), alpha=1.0 - self.decay)
        self.updates += 1

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        for name, avg in self.shadow.items():
            state[name].copy_(avg.to(state[name].dtype))
