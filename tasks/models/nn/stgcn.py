r"""STGCN forecaster for the per-RPC traffic of one call-chain pattern.

A pattern is a small graph whose nodes are RPCs (parent -> child calls).  The
model reads a window of ``W`` past time steps of ``F`` features per node and
predicts ``num_outputs`` raw values per node for the next step.

Training many patterns in one batched step (e.g. on one GPU)
-------------------------------------------------------------
Every operation is vectorised over batch, time and nodes, and nothing depends
on the node count except the inputs, so patterns of different sizes can be
batched in two ways:

1. *One model shared by all patterns*: put the patterns side by side as one
   disjoint graph, i.e. concatenate their node dims (``x [B, W, sum N_p, F]``)
   and offset each pattern's ``edge_index`` by the node count before it
   (a block-diagonal adjacency; ``torch_geometric.data.Batch`` does exactly
   this).  No padding is needed.

2. *One model per pattern* (what the per-pattern forecaster wants): build
   ``P`` models of identical hyper-parameters, stack their states with
   ``params, buffers = torch.func.stack_module_state(models)`` and call
   ``torch.func.functional_call(base, (params, buffers), (x, edge_index,
   edge_weight, node_mask))`` under ``torch.func.vmap`` over the pattern dim.
   Inputs are padded to a common node count with :func:`pad_nodes`
   (``x [P, B, W, N_max, F]``, ``node_mask [P, N_max]``).  ``vmap`` cannot
   batch edge lists of different lengths, so pass *one shared, unbatched*
   ``edge_index`` (the union of all patterns' edges on ``N_max`` nodes, or
   simply all ``N_max * (N_max - 1)`` pairs) together with a batched
   ``edge_weight [P, E]`` that is ``1`` where the pattern has the edge and
   ``0`` where it does not.  A zero-weight edge contributes nothing to the
   GCN degree nor to the messages, so this equals each pattern's own graph
   exactly (see ``tests/test_nn.py::test_vmap_per_pattern_models``).  Leave
   self-loops out of the shared ``edge_index``: ``GCNConv`` adds them itself,
   and an explicit self-loop would take its (possibly zero) weight instead.
   Run ``vmap`` with ``randomness="different"`` when dropout is on.  For
   training, detach the stacked params, set ``requires_grad_()`` and hand them
   to the optimizer; gradients reach every pattern's ``GCNConv`` weights.

Padding semantics: padded nodes must be isolated (no edges, or zero-weight
edges only).  ``node_mask`` (``True`` = real node) zeroes the input, the hidden
state after every block and the output of padded nodes, so padding never
changes the outputs of real nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.models.nn.st_block import STConvBlock, apply_node_mask

#: Meaning of the 4 default output channels (raw, un-activated values).
OUTPUT_CHANNELS = ("log_call_rate", "latency_mean_norm", "latency_p95_norm", "log_error_rate")


class STGCN(torch.nn.Module):
    r"""Spatio-temporal GCN (Yu et al., 2018) with a one-step output head.

    ``num_blocks`` x :class:`STConvBlock` (the first ``num_features -> hidden
    -> hidden``, the others ``hidden -> hidden -> hidden``), then a temporal
    convolution collapsing the remaining ``T_rest = window - num_blocks * 2 *
    (kernel_size - 1)`` steps, ReLU, and a per-node ``Linear(hidden,
    num_outputs)``.

    Outputs are raw (no activation).  The training code interprets the
    default four channels as (see :data:`OUTPUT_CHANNELS`):
    ``0`` log-rate of calls, ``1`` normalised latency mean, ``2`` normalised
    latency p95, ``3`` log-rate of errors.

    Args:
        num_features (int, optional): Input features per node ``F``. (default: ``4``)
        num_outputs (int, optional): Outputs per node. (default: ``4``)
        hidden_channels (int, optional): Hidden width. (default: ``32``)
        window (int, optional): Input time steps ``W``. (default: ``12``)
        kernel_size (int, optional): Temporal kernel length. (default: ``3``)
        num_blocks (int, optional): Number of ST blocks. (default: ``2``)
        use_graph (bool, optional): ``False`` gives the no-graph baseline. (default: ``True``)
        dropout (float, optional): Dropout after each block. (default: ``0.0``)

    Shapes:
        - **input:** ``x [B, W, N, F]``, ``edge_index [2, E]`` (long),
          ``edge_weight [E]`` (optional), ``node_mask [N]`` or ``[B, N]``
          (bool, ``True`` = real node, optional)
        - **output:** ``[B, N, num_outputs]`` (padded nodes are ``0``)
    """

    def __init__(
        self,
        num_features: int = 4,
        num_outputs: int = 4,
        hidden_channels: int = 32,
        window: int = 12,
        kernel_size: int = 3,
        num_blocks: int = 2,
        use_graph: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        t_rest = window - num_blocks * 2 * (kernel_size - 1)
        if t_rest < 1:
            raise ValueError(
                f"window={window} is too short: {num_blocks} block(s) with "
                f"kernel_size={kernel_size} consume {num_blocks * 2 * (kernel_size - 1)} "
                f"time steps, so window must be >= {num_blocks * 2 * (kernel_size - 1) + 1}"
            )
        self.num_features = num_features
        self.num_outputs = num_outputs
        self.hidden_channels = hidden_channels
        self.window = window
        self.kernel_size = kernel_size
        self.num_blocks = num_blocks
        self.use_graph = use_graph
        self.dropout = dropout
        self.t_rest = t_rest

        self.blocks = torch.nn.ModuleList(
            [
                STConvBlock(
                    num_features if i == 0 else hidden_channels,
                    hidden_channels,
                    hidden_channels,
                    kernel_size,
                    use_graph,
                    dropout,
                )
                for i in range(num_blocks)
            ]
        )
        self.head_conv = torch.nn.Conv2d(hidden_channels, hidden_channels, (t_rest, 1))
        self.head_lin = torch.nn.Linear(hidden_channels, num_outputs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Resets all learnable parameters of the module."""
        for block in self.blocks:
            cast(STConvBlock, block).reset_parameters()  # a ModuleList yields plain Modules to the type checker
        self.head_conv.reset_parameters()
        self.head_lin.reset_parameters()

    def num_parameters(self) -> int:
        r"""Number of learnable scalars."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_weight: Tensor | None = None,
        node_mask: Tensor | None = None,
    ) -> Tensor:
        if x.dim() != 4 or x.size(1) != self.window or x.size(-1) != self.num_features:
            raise ValueError(
                f"expected x of shape [B, window={self.window}, N, "
                f"num_features={self.num_features}], got {list(x.shape)}"
            )
        h = apply_node_mask(x, node_mask)
        for block in self.blocks:
            h = block(h, edge_index, edge_weight, node_mask)  # masked inside
        h = self.head_conv(h.permute(0, 3, 1, 2))  # [B, H, 1, N]
        h = F.relu(h.squeeze(2).transpose(1, 2))  # [B, N, H]
        out = self.head_lin(h)  # [B, N, num_outputs]
        if node_mask is not None:
            out = apply_node_mask(out.unsqueeze(1), node_mask).squeeze(1)
        return out

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_features={self.num_features}, "
            f"num_outputs={self.num_outputs}, hidden_channels={self.hidden_channels}, "
            f"window={self.window}, kernel_size={self.kernel_size}, "
            f"num_blocks={self.num_blocks}, use_graph={self.use_graph})"
        )


def graph_edge_index(
    num_nodes: int,
    edges: Sequence[tuple[int, int]],
    undirected: bool = True,
) -> Tensor:
    r"""Turns ``(parent, child)`` pairs into a sorted, deduplicated ``edge_index``.

    With ``undirected=True`` the reverse direction of every edge is added.
    Sorted by source, then target.  Self-loops are kept as given (``GCNConv``
    adds one per node anyway).  An empty edge list gives shape ``[2, 0]``.
    """
    pairs = [(int(s), int(d)) for s, d in edges]
    for s, d in pairs:
        if not (0 <= s < num_nodes and 0 <= d < num_nodes):
            raise ValueError(f"edge ({s}, {d}) out of range for num_nodes={num_nodes}")
    if undirected:
        pairs += [(d, s) for s, d in pairs]
    if not pairs:
        return torch.empty((2, 0), dtype=torch.long)
    return torch.tensor(sorted(set(pairs)), dtype=torch.long).t().contiguous()


def pad_nodes(x: Tensor, n_max: int) -> tuple[Tensor, Tensor]:
    r"""Zero-pads the node dim of ``x [B, W, N, F]`` to ``n_max``.

    Returns the padded tensor ``[B, W, n_max, F]`` and the node mask
    ``[n_max]`` (bool, ``True`` for the ``N`` real nodes, which stay first).
    """
    n = x.size(2)
    if n_max < n:
        raise ValueError(f"n_max={n_max} is smaller than the node count {n}")
    padded = F.pad(x, (0, 0, 0, n_max - n))
    mask = torch.zeros(n_max, dtype=torch.bool, device=x.device)
    mask[:n] = True
    return padded, mask
