"""Tests of the spatio-temporal GCN layers in ``tasks.nn``."""

from __future__ import annotations

import copy

import pytest
import torch

from tasks.models.nn import STGCN, STConvBlock, TemporalGatedConv, graph_edge_index, pad_nodes

B, W, N, F_IN = 2, 12, 3, 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def edge_index() -> torch.Tensor:
    # 3 nodes, parent 0 calls children 1 and 2.
    return graph_edge_index(3, [(0, 1), (0, 2)])


def _x(b: int = B, w: int = W, n: int = N, f: int = F_IN, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, w, n, f, generator=g)


def test_graph_edge_index() -> None:
    ei = graph_edge_index(3, [(0, 1), (0, 2), (0, 1)])
    assert ei.dtype == torch.long
    assert ei.tolist() == [[0, 0, 1, 2], [1, 2, 0, 0]]
    directed = graph_edge_index(3, [(0, 2), (0, 1)], undirected=False)
    assert directed.tolist() == [[0, 0], [1, 2]]
    empty = graph_edge_index(1, [])
    assert empty.shape == (2, 0) and empty.dtype == torch.long
    with pytest.raises(ValueError):
        graph_edge_index(2, [(0, 2)])


def test_temporal_gated_conv_shapes() -> None:
    x = _x()
    for c_out in (2, 4, 8):  # residual: 1x1 conv, identity, zero padding
        conv = TemporalGatedConv(F_IN, c_out, kernel_size=3)
        assert conv(x).shape == (B, W - 2, N, c_out)
    assert TemporalGatedConv(F_IN, 5, kernel_size=4)(x).shape == (B, W - 3, N, 5)


def test_temporal_gated_conv_is_causal() -> None:
    torch.manual_seed(0)
    k = 3
    conv = TemporalGatedConv(F_IN, 8, kernel_size=k)
    x = _x()
    out = conv(x)
    x2 = x.clone()
    t = 7
    x2[:, t] += 5.0  # only output steps t-k+1 .. t can see input step t
    out2 = conv(x2)
    assert torch.allclose(out[:, : t - k + 1], out2[:, : t - k + 1])
    assert torch.allclose(out[:, t + 1 :], out2[:, t + 1 :])
    assert not torch.allclose(out[:, t - k + 1 : t + 1], out2[:, t - k + 1 : t + 1])


@pytest.mark.parametrize("use_graph", [True, False])
def test_st_conv_block_shapes(edge_index: torch.Tensor, use_graph: bool) -> None:
    block = STConvBlock(F_IN, 16, 8, kernel_size=3, use_graph=use_graph)
    out = block(_x(), edge_index)
    assert out.shape == (B, W - 4, N, 8)
    w = torch.rand(edge_index.size(1))
    assert block(_x(), edge_index, w).shape == (B, W - 4, N, 8)


def test_stgcn_shapes(edge_index: torch.Tensor) -> None:
    model = STGCN()
    assert model(_x(), edge_index).shape == (B, N, 4)
    one = STGCN(num_features=3, num_outputs=2, hidden_channels=8, window=5, num_blocks=1)
    assert one(_x(w=5, f=3), edge_index).shape == (B, N, 2)
    # Vectorised forward on a larger batch (no per-item / per-step loop needed).
    big = _x(b=64, w=12, n=50)
    ei = graph_edge_index(50, [(i, i + 1) for i in range(49)])
    assert model(big, ei).shape == (64, 50, 4)
    with pytest.raises(ValueError, match="window"):
        model(_x(w=11), edge_index)


def test_window_too_short_raises() -> None:
    with pytest.raises(ValueError, match="window=8"):
        STGCN(window=8, kernel_size=3, num_blocks=2)
    STGCN(window=9, kernel_size=3, num_blocks=2)  # exactly one step left


def test_permutation_equivariance(edge_index: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = STGCN(hidden_channels=16, dropout=0.1).eval()
    x = _x(n=4)
    ei = graph_edge_index(4, [(0, 1), (0, 2), (2, 3)])
    perm = torch.tensor([2, 0, 3, 1])  # new node j is old node perm[j]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(4)
    out = model(x, ei)
    out_p = model(x[:, :, perm], inv[ei])
    assert torch.allclose(out_p, out[:, perm], atol=1e-5)


def test_graph_mixes_neighbours_only_when_enabled(edge_index: torch.Tensor) -> None:
    x = _x()
    x2 = x.clone()
    x2[:, :, 2] += 3.0
    for use_graph in (False, True):
        torch.manual_seed(0)
        model = STGCN(use_graph=use_graph).eval()
        same = torch.allclose(model(x, edge_index)[:, 0], model(x2, edge_index)[:, 0])
        assert same is (not use_graph)
    # Node 1 and node 2 only meet through node 0 (two hops, two blocks).
    model = STGCN(use_graph=True, num_blocks=1, window=5).eval()
    x, x2 = x[:, :5], x2[:, :5]
    assert torch.allclose(model(x, edge_index)[:, 1], model(x2, edge_index)[:, 1])


def test_reset_parameters() -> None:
    torch.manual_seed(0)
    model = STGCN()
    before = copy.deepcopy(model.state_dict())
    model.reset_parameters()
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() > 1:  # randomly initialised
            assert not torch.equal(p, before[name]), name
    torch.manual_seed(123)
    model.reset_parameters()
    first = copy.deepcopy(model.state_dict())
    torch.manual_seed(123)
    model.reset_parameters()
    for name, p in model.state_dict().items():
        assert torch.equal(p, first[name]), name
    # Fresh modules built under the same seed match as well.
    torch.manual_seed(5)
    a = STConvBlock(4, 8, 8)
    torch.manual_seed(5)
    b = STConvBlock(4, 8, 8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_parameter_count() -> None:
    model = STGCN()
    n = model.num_parameters()
    print(f"STGCN parameters at defaults: {n}")
    assert n == sum(p.numel() for p in model.parameters())
    assert n <= 100_000


@pytest.mark.parametrize("mask_2d", [False, True])
def test_padding_with_mask_keeps_real_nodes(edge_index: torch.Tensor, mask_2d: bool) -> None:
    torch.manual_seed(0)
    model = STGCN().eval()
    x = _x()
    out = model(x, edge_index)
    xp, mask = pad_nodes(x, 7)
    assert xp.shape == (B, W, 7, F_IN) and mask.tolist() == [True] * 3 + [False] * 4
    assert torch.equal(xp[:, :, :3], x) and not xp[:, :, 3:].any()
    xp[:, :, 3:] = torch.randn(B, W, 4, F_IN)  # garbage in padded slots is ignored too
    m = mask.expand(B, -1) if mask_2d else mask
    out_p = model(xp, edge_index, node_mask=m)
    assert out_p.shape == (B, 7, 4)
    assert torch.allclose(out_p[:, :3], out, atol=1e-6)
    assert not out_p[:, 3:].any()
    with pytest.raises(ValueError):
        pad_nodes(x, 2)


def test_overfits_tiny_batch(edge_index: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = STGCN(hidden_channels=16)
    x = _x(b=4)
    y = torch.randn(4, N, 4, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for step in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x, edge_index), y)
        loss.backward()
        if step == 0:
            first = loss.item()
            for name, p in model.named_parameters():
                assert p.grad is not None, name
            for block in model.blocks:
                assert block.spatial.lin.weight.grad.abs().sum() > 0
        opt.step()
    final = torch.nn.functional.mse_loss(model(x, edge_index), y).item()
    print(f"overfit MSE {first:.4f} -> {final:.6f}")
    assert final * 10 <= first, (first, final)


def test_vmap_per_pattern_models() -> None:
    """Per-pattern parameters under vmap, graphs as a shared edge list + batched weights."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    graphs = [(3, [(0, 1), (0, 2)]), (4, [(0, 1), (1, 2), (2, 3)]), (2, [])]
    n_max = 4
    models = [STGCN(hidden_channels=8).eval() for _ in graphs]
    xs = [_x(n=n, seed=i) for i, (n, _) in enumerate(graphs)]
    refs = [m(x, graph_edge_index(n, e)) for m, x, (n, e) in zip(models, xs, graphs)]

    pairs = [(i, j) for i in range(n_max) for j in range(n_max) if i != j]
    shared = torch.tensor(pairs).t()
    weights = torch.zeros(len(graphs), len(pairs))
    for p, (n, e) in enumerate(graphs):
        present = set(map(tuple, graph_edge_index(n, e).t().tolist()))
        weights[p] = torch.tensor([float(pair in present) for pair in pairs])
    padded = [pad_nodes(x, n_max) for x in xs]
    X = torch.stack([xp for xp, _ in padded])
    M = torch.stack([m for _, m in padded])

    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def call(p, b, x, w, m):
        return functional_call(base, (p, b), (x, shared, w, m))

    out = vmap(call)(params, buffers, X, weights, M)
    assert out.shape == (3, B, n_max, 4)
    for p, (n, _) in enumerate(graphs):
        assert torch.allclose(out[p, :, :n], refs[p], atol=1e-5)
        assert not out[p, :, n:].any()
