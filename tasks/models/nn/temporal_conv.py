"""Gated temporal convolution (GLU) of the STGCN family (Yu et al., 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class TemporalGatedConv(torch.nn.Module):
    r"""Causal gated temporal convolution, shared by all nodes.

    .. math::
        [P \,\|\, Q] = \mathrm{Conv}_{(k, 1)}(X), \qquad
        Y = P \odot \sigma(Q) + R(X)_{t + k - 1}

    The convolution runs over (time, node) with a ``(kernel_size, 1)`` kernel,
    so every node is filtered independently with the same weights, and output
    step ``t`` sees only input steps ``t .. t + kernel_size - 1``.  The residual
    ``R`` aligns channels (identity when equal, zero padding when
    ``in_channels < out_channels``, a learned 1x1 convolution otherwise) and is
    taken at the last step of each receptive field.

    Args:
        in_channels (int): Input channels ``C_in``.
        out_channels (int): Output channels ``C_out``.
        kernel_size (int, optional): Temporal kernel length ``k``. (default: ``3``)

    Shapes:
        - **input:** ``[B, T, N, C_in]``
        - **output:** ``[B, T - k + 1, N, C_out]``
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.conv = torch.nn.Conv2d(in_channels, 2 * out_channels, (kernel_size, 1))
        self.align: torch.nn.Conv2d | None = None
        if in_channels > out_channels:
            self.align = torch.nn.Conv2d(in_channels, out_channels, (1, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Resets all learnable parameters of the module."""
        self.conv.reset_parameters()
        if self.align is not None:
            self.align.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.size(-1) != self.in_channels:
            raise ValueError(f"expected x of shape [B, T, N, {self.in_channels}], got {list(x.shape)}")
        if x.size(1) < self.kernel_size:
            raise ValueError(f"time length {x.size(1)} is shorter than kernel_size {self.kernel_size}")
        h = x.permute(0, 3, 1, 2)  # [B, C_in, T, N]
        p, q = self.conv(h).chunk(2, dim=1)  # 2 x [B, C_out, T', N]

        res = h[:, :, self.kernel_size - 1 :, :]
        if self.align is not None:
            res = self.align(res)
        elif self.in_channels < self.out_channels:
            res = F.pad(res, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

        out = p * torch.sigmoid(q) + res
        return out.permute(0, 2, 3, 1)  # [B, T', N, C_out]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size})"
