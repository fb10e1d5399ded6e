"""The dense GCNConv propagation used in training: PyG's GCNConv on tiny hand-built graphs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch_geometric.nn import GCNConv

from tasks.models.forecast import TrainConfig, make_model
from tasks.models.nn.dense_gcn import gcn_matrix, use_dense_propagation


@pytest.mark.parametrize(
    "edges",
    [
        [[0, 1, 1, 2], [1, 0, 2, 1]],  # a path, both directions
        [[0, 0, 2, 3, 3], [1, 1, 2, 0, 1]],  # a repeated edge and a self-loop
        [[], []],  # no edges: self-loops only
    ],
)
def test_dense_propagation_equals_message_passing(edges):
    torch.manual_seed(0)
    edge_index = torch.tensor(edges, dtype=torch.long).reshape(2, -1)
    conv = GCNConv(5, 3)
    dense = use_dense_propagation(copy.deepcopy(conv))
    x = torch.randn(7, 4, 5, requires_grad=True)  # 7 snapshots of 4 nodes
    expected, out = conv(x, edge_index), dense(x, edge_index)
    assert out.shape == (7, 4, 3)
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected.sum().backward()
    assert torch.allclose(grad, x.grad, atol=1e-6)


def test_the_matrix_is_pygs_normalisation():
    """Path 0-1 with self-loops: degrees 2 and 2, so every entry is 1/2."""
    conv = GCNConv(1, 1)
    matrix = gcn_matrix(conv, torch.tensor([[0, 1], [1, 0]]), None, 2, torch.float32)
    assert torch.allclose(matrix, torch.full((2, 2), 0.5))


def test_a_dense_model_forecasts_as_the_pyg_model():
    torch.manual_seed(1)
    model = make_model(TrainConfig(hidden=8))
    dense = use_dense_propagation(copy.deepcopy(model))
    x, edge_index = torch.randn(3, 12, 6, 4), torch.tensor([[0, 1, 1, 2, 4], [1, 0, 2, 1, 5]])
    assert torch.allclose(dense(x, edge_index), model(x, edge_index), atol=1e-5)
    other = torch.tensor([[0, 3], [3, 0]])  # another graph: not the cached matrix of the first
    assert torch.allclose(dense(x, other), model(x, other), atol=1e-5)
