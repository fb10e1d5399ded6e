"""Spatio-temporal graph networks for per-RPC traffic forecasting."""

from tasks.nn.temporal_conv import TemporalGatedConv
from tasks.nn.st_block import STConvBlock
from tasks.nn.stgcn import STGCN, graph_edge_index, pad_nodes

__all__ = [
    "TemporalGatedConv",
    "STConvBlock",
    "STGCN",
    "graph_edge_index",
    "pad_nodes",
]
