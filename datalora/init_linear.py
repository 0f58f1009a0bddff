"""``nn.Linear`` layers that keep their own initialisation under a generic re-init.

torch's meta-device recipe (``to_empty()`` then ``reset_parameters()`` on every module, as
FSDP and torchtitan do) calls each module's ``reset_parameters``; a plain ``nn.Linear``
child would come back Kaiming-initialised, losing an init its parent set. These carry it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class NormalInitLinear(nn.Linear):
    """``nn.Linear`` initialised with weight ~ N(0, ``std``) and bias = ``bias_value``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 std: float = 0.02, bias_value: float = 0.0, device=None, dtype=None):
        self.std, self.bias_value = float(std), float(bias_value)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.weight, std=self.std)
            if self.bias is not None:
                self.bias.fill_(self.bias_value)


class XavierInitLinear(nn.Linear):
    """``nn.Linear`` initialised with a Xavier-uniform weight and a zero bias."""

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.xavier_uniform_(self.weight)
            if self.bias is not None:
                self.bias.zero_()
