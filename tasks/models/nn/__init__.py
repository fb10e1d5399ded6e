"""Spatio-temporal graph networks for per-RPC traffic forecasting (torch layers only: no tables)."""

from tasks.models.nn.st_block import STConvBlock
from tasks.models.nn.stgcn import STGCN, graph_edge_index, pad_nodes
from tasks.models.nn.temporal_conv import TemporalGatedConv

__all__ = [
    "TemporalGatedConv",
    "STConvBlock",
    "STGCN",
    "graph_edge_index",
    "pad_nodes",
]
