"""Spatio-temporal "sandwich" block: temporal conv -> graph conv -> temporal conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn import GCNConv

from tasks.models.nn.temporal_conv import TemporalGatedConv


def apply_node_mask(x: Tensor, node_mask: Tensor | None) -> Tensor:
    r"""Zeroes padded nodes of ``x: [B, T, N, C]``; ``node_mask`` is ``[N]`` or ``[B, N]``."""
    if node_mask is None:
        return x
    if node_mask.dim() == 1:
        m = node_mask.view(1, 1, -1, 1)
    elif node_mask.dim() == 2:
        m = node_mask.view(node_mask.size(0), 1, node_mask.size(1), 1)
    else:
        raise ValueError(f"node_mask must be [N] or [B, N], got {list(node_mask.shape)}")
    return x * m.to(x.dtype)


class STConvBlock(torch.nn.Module):
    r"""One STGCN block (Yu et al., 2018), vectorised over batch and time.

    ``TemporalGatedConv(in -> hidden)`` -> ``GCNConv(hidden, hidden)`` + ReLU
    -> ``TemporalGatedConv(hidden -> out)`` -> ``LayerNorm(out)`` -> dropout.

    The graph convolution is applied to all ``B * T`` snapshots in one call
    (features reshaped to ``[B * T, N, C]`` with one static ``edge_index``).
    The layer norm normalises the channel dim of each node, so the block works
    for any node count.  With ``use_graph=False`` the graph convolution is
    replaced by a per-node ``Linear(hidden, hidden)`` (no-graph baseline).

    Args:
        in_channels (int): Input channels.
        hidden_channels (int): Channels of the graph convolution.
        out_channels (int): Output channels.
        kernel_size (int, optional): Temporal kernel length ``k``. (default: ``3``)
        use_graph (bool, optional): Use ``GCNConv`` (else per-node linear). (default: ``True``)
        dropout (float, optional): Dropout on the block output. (default: ``0.0``)

    Shapes:
        - **input:** ``x [B, T, N, C_in]``, ``edge_index [2, E]``,
          ``edge_weight [E]`` (optional), ``node_mask [N]`` or ``[B, N]`` (optional)
        - **output:** ``[B, T - 2 * (k - 1), N, C_out]``
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        use_graph: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.use_graph = use_graph
        self.dropout = dropout

        self.tconv1 = TemporalGatedConv(in_channels, hidden_channels, kernel_size)
        self.spatial: GCNConv | torch.nn.Linear
        if use_graph:
            self.spatial = GCNConv(hidden_channels, hidden_channels)
        else:
            self.spatial = torch.nn.Linear(hidden_channels, hidden_channels)
        self.tconv2 = TemporalGatedConv(hidden_channels, out_channels, kernel_size)
        self.norm = torch.nn.LayerNorm(out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Resets all learnable parameters of the module."""
        self.tconv1.reset_parameters()
        self.spatial.reset_parameters()
        self.tconv2.reset_parameters()
        self.norm.reset_parameters()

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_weight: Tensor | None = None,
        node_mask: Tensor | None = None,
    ) -> Tensor:
        h = self.tconv1(x)  # [B, T1, N, H]
        # Padded nodes send nothing to their (normally non-existent) neighbours.
        h = apply_node_mask(h, node_mask)
        b, t, n, c = h.shape
        if self.use_graph:
            h = self.spatial(h.reshape(b * t, n, c), edge_index, edge_weight)
            h = h.view(b, t, n, c)
        else:
            h = self.spatial(h)
        h = F.relu(h)
        h = self.tconv2(h)  # [B, T2, N, C_out]
        h = self.norm(h)
        h = F.dropout(h, p=self.dropout, training=self.training)
        return apply_node_mask(h, node_mask)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.hidden_channels}, "
            f"{self.out_channels}, kernel_size={self.kernel_size}, "
            f"use_graph={self.use_graph})"
        )
