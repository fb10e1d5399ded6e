"""The detector's flags and the typed thresholds it reads (`tasks.models.detector`, `tasks.models.thresholds`)."""

from __future__ import annotations

import json

import numpy as np

from tasks.models.detector import flag_points
from tasks.models.features import CALLS, COUNTS, FEATURES, LATENCIES
from tasks.models.thresholds import CountBand, LatencyBand, Thresholds, count_band, latency_band


def _thresholds_json(rng: np.random.Generator, nodes: list[str]) -> dict:
    """thresholds.json as models wrote it, some from before burst factors (no phi) existed."""
    return {
        "alarm_p": 1e-3,
        "method": "quantile",
        "calibrated_mape_calls": 0.2,
        "nodes": {
            n: {
                "calls": {
                    "alpha": float(rng.choice([0, 0.01, 0.3])),
                    "phi": float(rng.choice([1.0, 1.0, 4.0])),
                    "mean": 3.0,
                },
                "errors": {"alpha": float(rng.choice([0, 0.05]))},  # no phi: models calibrated before it existed
                "rt_mean": {"sigma": 0.3, "k": 5.0, "phi": 2.0},
                "rt_p95": {"sigma": 0.4, "k": 6.0},
            }
            for n in nodes
        },
    }


def test_thresholds_json_round_trips_and_old_files_load_with_default_burst_factors():
    doc = _thresholds_json(np.random.default_rng(0), ["a", "b"])
    th = Thresholds.from_json(json.loads(json.dumps(doc)))
    assert th.nodes["a"].errors == CountBand(doc["nodes"]["a"]["errors"]["alpha"], 1.0)
    assert th.nodes["b"].rt_p95 == LatencyBand(0.4, 6.0, 1.0)
    again = th.to_json()
    assert set(again) == set(doc) and set(again["nodes"]["a"]) == set(FEATURES)
    assert again["nodes"]["a"]["calls"] == doc["nodes"]["a"]["calls"]
    assert Thresholds.from_json(json.loads(json.dumps(again))) == th


def test_vectorised_flags_equal_the_per_node_bands():
    rng = np.random.default_rng(0)
    nodes = [f"n{i}" for i in range(7)]
    thresholds = Thresholds.from_json(_thresholds_json(rng, nodes))
    exp = rng.uniform(0.01, 50, size=(40, len(nodes), len(FEATURES)))
    obs = rng.poisson(exp * rng.choice([1, 1, 1, 3, 0.2], size=exp.shape)).astype(float)
    obs[:, :, list(LATENCIES)] = exp[:, :, list(LATENCIES)] * rng.lognormal(0, 1, size=(40, len(nodes), 2))
    kinds = {COUNTS[0]: ("traffic_spike", "traffic_drop"), COUNTS[1]: ("errors", None)}
    expected = []
    for n, node in enumerate(nodes):
        bands = thresholds.nodes[node]
        for f, (up, down) in kinds.items():
            band = bands.count(f)
            lo, hi = count_band(exp[:, n, f], band.alpha, thresholds.alarm_p, band.phi)
            expected += [(s, n, f, hi[s], "up", up) for s in np.flatnonzero(obs[:, n, f] > hi)]
            expected += [(s, n, f, lo[s], "down", down) for s in np.flatnonzero(obs[:, n, f] < lo)] if down else []
        for f in LATENCIES:
            band = bands.latency(f)
            _, hi = latency_band(exp[:, n, f], obs[:, n, CALLS], band.sigma, band.k, band.phi)
            calls = obs[:, n, CALLS] > 0
            expected += [(s, n, f, hi[s], "up", "latency") for s in np.flatnonzero(calls & (obs[:, n, f] > hi))]
    flags = flag_points(obs, exp, [thresholds.nodes[n] for n in nodes], thresholds.alarm_p)
    got = [(f.sample, f.node, f.feature, f.threshold, f.direction, f.kind) for f in flags]
    assert got == expected and len({g[-1] for g in got}) == 4


def test_the_edge_by_edge_graph_convolution_gives_pyg_s_bits():
    import torch
    from torch_geometric.nn import GCNConv

    from tasks.models.detector import EDGE_BY_EDGE_ROWS, edge_by_edge
    from tasks.models.nn import graph_edge_index

    torch.manual_seed(0)
    stock, fast = GCNConv(32, 32, cached=True), GCNConv(32, 32, cached=True)
    fast.load_state_dict(stock.state_dict())
    edge_by_edge(fast)
    assert "forward" in vars(fast) and "forward" not in vars(stock), "PyG's defaults: the edge-by-edge forward"
    rng = np.random.default_rng(1)
    for nodes, rows in [(8, EDGE_BY_EDGE_ROWS), (8, 600), (13, 360), (5, 3), (1, 200)]:
        edges = [(int(a), int(b)) for a, b in rng.integers(0, nodes, size=(2 * nodes, 2)) if a != b]
        edge_index = graph_edge_index(nodes, edges)
        stock._cached_edge_index = fast._cached_edge_index = None
        for _ in range(3):  # the first pass fills the cache, the others read it
            x = torch.randn(rows, nodes, 32) * 4
            with torch.no_grad():
                assert torch.equal(fast(x, edge_index), stock(x, edge_index)), (nodes, rows)


def test_a_count_normal_traffic_reached_under_as_low_a_forecast_is_no_spike():
    """A sparse, bursty RPC: after a quiet minute the forecaster says ~0.1, and validation shows the
    next minute bringing 6-9 calls (one trace calls it in a loop). Its Poisson band at 0.1 is [0, 2]:
    every normal burst would be a spike. The ceiling learnt in validation lets those through and
    still flags a flood."""
    from tasks.models.thresholds import NodeBands, ceiling_steps, count_ceiling

    pred = np.array([0.1, 0.1, 0.1, 0.1, 3.0, 3.0, 3.5, 4.0])
    obs = np.array([0.0, 6.0, 9.0, 0.0, 5.0, 12.0, 3.0, 8.0])
    steps = ceiling_steps(pred, obs)
    assert steps == ((0.1, 9.0), (3.0, 12.0))  # a running maximum over the forecasts, kept where it rises
    assert count_ceiling(np.array([0.01, 0.1, 2.9, 3.0, 50.0]), steps).tolist() == [9.0, 9.0, 9.0, 12.0, 12.0]
    assert count_ceiling(np.array([1.0]), ()).tolist() == [0.0]  # models calibrated before ceilings: no floor

    quiet = CountBand(0.0, 1.0, 0.0)
    lat = LatencyBand(0.3, 5.0)
    expected = np.zeros((3, 1, len(FEATURES)))
    expected[:, 0, CALLS] = 0.1
    observed = expected.copy()
    observed[:, 0, CALLS] = [9.0, 10.0, 40.0]
    without = NodeBands(CountBand(0.0, 1.0, 2.0), quiet, lat, lat)
    learnt = NodeBands(CountBand(0.0, 1.0, 2.0, steps), quiet, lat, lat)
    spikes = [
        [f.sample for f in flag_points(observed, expected, [bands], 1e-3) if f.kind == "traffic_spike"]
        for bands in (without, learnt)
    ]
    assert spikes == [[0, 1, 2], [1, 2]]  # 9 calls reached under a forecast of 0.1 in validation: no spike
    doc = Thresholds(1e-3, "quantile", {"n": learnt}, 0.2).to_json()
    assert doc["nodes"]["n"]["calls"]["ceiling"] == [list(s) for s in steps]
    assert Thresholds.from_json(json.loads(json.dumps(doc))).nodes["n"] == learnt


def test_traffic_back_at_its_normal_level_after_an_outage_is_no_spike():
    """An outage the forecaster followed down (a drop on a thin series rarely reaches the hour's
    alarm level): it forecasts ~1 call where the node's normal level is 12. Traffic back at 12 is a
    recovery, within the band at the normal level; a flood above that band is still a spike."""
    from tasks.models.thresholds import NodeBands, count_quantile, normal_ceiling

    band = CountBand(0.0, 1.0, 12.0)  # Poisson, its calibration mean 12
    at_mean = normal_ceiling(12.0, 0.0, 1e-3)
    assert at_mean == float(count_quantile("isf", 5e-4, np.array([12.0]), np.array([0.0]))[0])
    assert normal_ceiling(None, 0.0, 1e-3) == 0.0  # models calibrated before the mean was kept
    lat = LatencyBand(0.3, 5.0)
    expected = np.zeros((3, 1, len(FEATURES)))
    expected[:, 0, CALLS] = 1.0
    observed = expected.copy()
    observed[:, 0, CALLS] = [12.0, at_mean, 60.0]
    flags = flag_points(observed, expected, [NodeBands(band, CountBand(0.0, 1.0, 0.0), lat, lat)], 1e-3)
    assert [f.sample for f in flags if f.kind == "traffic_spike"] == [2]
