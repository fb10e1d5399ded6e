"""A pattern's champion as scoring uses it: model, config, graph, normaliser and typed thresholds
from the champion's verified cached artifacts, forecasting a batch of windows and turning
observed vs expected values into `Flag`s. Reads no table (artifacts: the model cache of
`tasks.models.registry.cached_artifacts`). The shared module's graph convolutions add edge by edge
on large passes (`_gcn_forward`: PyG's sums in PyG's order, the same bits, faster).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MethodType
from typing import NamedTuple

import numpy as np
import torch
from torch_geometric.nn import GCNConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from tasks.models.features import CALLS, COUNTS, ERRORS, LATENCIES
from tasks.models.forecast import Normaliser, Prepared, TrainConfig, input_windows, make_model, predict
from tasks.models.nn import graph_edge_index
from tasks.models.registry import cached_artifacts
from tasks.models.thresholds import (
    NodeBands,
    Thresholds,
    count_bands,
    count_ceiling,
    latency_band,
    normal_ceiling,
)
from tasks.models.trace_model import TRACE_MODEL_ARTIFACT, TraceModel
from tasks.settings import Settings


class Flag(NamedTuple):
    """An irregular point: sample (index into the forecast targets), node and feature indices."""

    sample: int
    node: int
    feature: int
    threshold: float
    score: float  # distance from the forecast in band widths (> 1)
    direction: str  # up | down
    kind: str  # traffic_spike | traffic_drop | errors | latency


# count features: kind of a point above / below its band (errors have no lower bound)
COUNT_KINDS: tuple[tuple[int, str, str | None], ...] = (
    (CALLS, "traffic_spike", "traffic_drop"),
    (ERRORS, "errors", None),
)


def flag_points(
    observed: np.ndarray, expected: np.ndarray, bands: Sequence[NodeBands], alarm_p: float, latency: bool = True
) -> list[Flag]:
    """Every point of observed vs expected [S, N, F] outside its node's band, node by node (each
    sample's flags keep this order: calls up, calls down, errors, then latency); latency only when
    `latency`. The limits of all nodes are found at once; only the few points beyond them are
    scored one by one (the same scalar arithmetic as ever)."""
    lo, hi = _count_limits(observed, expected, bands, alarm_p)
    groups: list[tuple[np.ndarray, int, np.ndarray, str, str]] = []  # beyond [S, N], feature, limit, direction, kind
    for c, (f, up, down) in enumerate(COUNT_KINDS):
        groups.append((observed[:, :, f] > hi[:, :, c], f, hi[:, :, c], "up", up))
        if down:
            groups.append((observed[:, :, f] < lo[:, :, c], f, lo[:, :, c], "down", down))
    if latency:
        groups += _latency_groups(observed, expected, bands)
    hits = [(n, g, s) for g, group in enumerate(groups) for s, n in zip(*np.nonzero(group[0]))]
    return [_flag(observed, expected, int(s), int(n), *groups[g][1:]) for n, g, s in sorted(hits)]


def _count_limits(
    observed: np.ndarray, expected: np.ndarray, bands: Sequence[NodeBands], alarm_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper count limits [S, N, len(COUNTS)], all nodes' counts in one `count_bands` call."""
    alpha = np.array([[node.count(f).alpha for f in COUNTS] for node in bands])  # [N, 2]
    phi = np.array([[node.count(f).phi for f in COUNTS] for node in bands])
    lower = np.tile([down is not None for _, _, down in COUNT_KINDS], len(bands))
    lo, hi = count_bands(
        expected[:, :, list(COUNTS)].reshape(len(expected), -1),
        alpha.reshape(-1),
        alarm_p,
        observed[:, :, list(COUNTS)].reshape(len(observed), -1),
        lower,
        phi.reshape(-1),
    )
    shape = expected.shape[:2] + (len(COUNTS),)
    return lo.reshape(shape), np.maximum(hi.reshape(shape), count_ceilings(expected, bands, alarm_p))


def count_ceilings(expected: np.ndarray, bands: Sequence[NodeBands], alarm_p: float) -> np.ndarray:
    """Per node's counts [S, N, len(COUNTS)], the count at or below which nothing is a spike: the
    highest validation saw under as low a forecast (`count_ceiling`), and the band at the node's
    normal level (`normal_ceiling`: a recovery is no spike)."""
    out = np.zeros(expected.shape[:2] + (len(COUNTS),))
    for n, node in enumerate(bands):
        for c, f in enumerate(COUNTS):
            band = node.count(f)
            normal = normal_ceiling(band.mean, band.alpha, alarm_p, band.phi)
            out[:, n, c] = np.maximum(count_ceiling(expected[:, n, f], band.ceiling), normal)
    return out


def _latency_groups(
    observed: np.ndarray, expected: np.ndarray, bands: Sequence[NodeBands]
) -> list[tuple[np.ndarray, int, np.ndarray, str, str]]:
    """Latency above its band (where the node had calls), per latency feature: the points beyond
    [S, N] and the upper limits, all nodes at once (elementwise: each node's own band)."""
    calls = observed[:, :, CALLS]
    out = []
    for f in LATENCIES:
        lat = [node.latency(f) for node in bands]
        sigma, k = np.array([band.sigma for band in lat]), np.array([band.k for band in lat])
        _, high = latency_band(expected[:, :, f], calls, sigma, k, np.array([band.phi for band in lat]))
        ok = (calls > 0) & np.isfinite(observed[:, :, f])
        out.append((ok & (observed[:, :, f] > high), f, high, "up", "latency"))
    return out


def _flag(
    observed: np.ndarray, expected: np.ndarray, s: int, n: int, f: int, limit: np.ndarray, direction: str, kind: str
) -> Flag:
    """The flag of point (s, n, f) beyond `limit` [S, N]: counts scored by the band's width, latency
    on the log scale. A count band is at least one count wide here: counts are whole, and a count
    forecast at ~0 (an all-zero series: errors of an RPC that never failed) has a band [0, 0] whose
    width, ~0, would score one event 1e9."""
    obs, exp, lim = observed[s, n, f], expected[s, n, f], limit[s, n]
    if kind == "latency":
        score = np.log(obs / exp) / max(np.log(lim / exp), 1e-9)
    else:
        distance = obs - exp if direction == "up" else exp - obs
        score = distance / max(lim - exp if direction == "up" else exp - lim, 1.0)
    return Flag(s, n, f, float(lim), float(score), direction, kind)


@dataclass(frozen=True)
class ModelGraph:
    """The pattern graph a model was trained on (`graph.json`)."""

    pattern_id: int
    version: int
    graph_hash: str
    nodes: list[str]
    edges: list[tuple[int, int]]
    bucket_seconds: int

    @classmethod
    def from_json(cls, doc: dict) -> ModelGraph:
        edges = [(int(a), int(b)) for a, b in doc["edges"]]
        return cls(doc["pattern_id"], doc["version"], doc["graph_hash"], doc["nodes"], edges, doc["bucket_seconds"])


@dataclass
class _SharedModule:
    """One module per model config, its parameters and buffers by name, and the detector whose
    weights it holds: building an STGCN (and load_state_dict's bookkeeping) costs more than
    copying a champion's weights into it."""

    model: torch.nn.Module
    state: dict[str, torch.Tensor]
    owner: Detector | None = None


_MODULES: dict[str, _SharedModule] = {}
EDGE_BY_EDGE_ROWS = 128  # snapshots from which `_gcn_forward` adds edge by edge (measured crossover: ~100)


class Detector:
    """A pattern's champion, ready to forecast and flag. Its module is shared with every detector
    of the same config (weights copied in when this detector uses it after another one did)."""

    def __init__(self, pattern_id: int, version: int, folder: Path) -> None:
        self.pattern_id, self.version, self.folder = pattern_id, version, folder
        self.cfg = TrainConfig(**_read(folder / "config.json"))
        self.graph = ModelGraph.from_json(_read(folder / "graph.json"))
        self.norm = Normaliser(**_read(folder / "normalisation.json"))
        self.thresholds = Thresholds.from_json(_read(folder / "thresholds.json"))
        self.bands = [self.thresholds.nodes[node] for node in self.graph.nodes]
        self.edge_index = graph_edge_index(len(self.graph.nodes), self.graph.edges)
        self.alarm_p = self.thresholds.alarm_p  # scoring lowers it for the hour's many tests
        trace_file = folder / f"{TRACE_MODEL_ARTIFACT}.json"  # versions before the trace model lack it
        self.trace_model = TraceModel.load(trace_file) if trace_file.is_file() else None

    @classmethod
    def load(cls, settings: Settings, pattern_id: int, version: int) -> Detector:
        """The registered version's detector, from the cache verified against the registry's
        digests on every load (an edited cached file is downloaded again, never trusted)."""
        return cls(pattern_id, version, cached_artifacts(settings, pattern_id, version))

    @property
    def nodes(self) -> list[str]:
        return self.graph.nodes

    @property
    def lead(self) -> int:
        """Buckets before the first target that its window needs."""
        return self.cfg.window + self.cfg.horizon - 1

    @property
    def model(self) -> torch.nn.Module:
        """The shared module of this config holding this detector's weights (loaded with
        `weights_only=True`) and caching its graph's normalised edges."""
        shared = _shared_module(self.cfg)
        if shared.owner is not self:
            _copy_weights(shared, torch.load(self.folder / "state_dict.pt", map_location="cpu", weights_only=True))
            shared.owner = self
        return shared.model

    def forecast(self, clean: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Forecasts [S, N, F] of `targets`, each from its window of `clean`, in one forward pass."""
        starts = targets - self.cfg.horizon - self.cfg.window + 1
        first, last = starts.min(), starts.max() + self.cfg.window  # only the buckets these windows read
        x, offsets = input_windows(self.norm, clean[first:last], starts - first, self.cfg.window)
        prep = Prepared(x, torch.zeros(0), targets, 0, self.edge_index, offsets, self.norm)
        return predict(self.model, prep, slice(None), torch.device("cpu"))

    def flags(self, observed: np.ndarray, expected: np.ndarray) -> list[Flag]:
        """The points of observed vs expected [S, N, F] outside the calibrated bands, counts at
        `alarm_p`. Latency is judged by the trace model where the version has one (each trace on its
        own, not a bucket's mean or p95 of a few calls); by the bands otherwise."""
        return flag_points(observed, expected, self.bands, self.alarm_p, latency=self.trace_model is None)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _shared_module(cfg: TrainConfig) -> _SharedModule:
    key = json.dumps(asdict(cfg), sort_keys=True)
    if key not in _MODULES:
        model = make_model(cfg)
        for conv in model.modules():
            if isinstance(conv, GCNConv):
                conv.cached = True  # the graph's normalised edges: computed once per champion, not per pass
                edge_by_edge(conv)
        _MODULES[key] = _SharedModule(model, model.state_dict(keep_vars=False))
    return _MODULES[key]


def edge_by_edge(conv: GCNConv) -> None:
    """Give a cached GCNConv of PyG's defaults (normalised, summed, no hooks) `_gcn_forward`; any
    other is left as it is."""
    hooks = any(
        getattr(conv, f"_{h}_forward{p}_hooks") for h in ("propagate", "message", "aggregate") for p in ("", "_pre")
    )
    defaults = (conv.aggr, conv.flow, conv.node_dim, conv.decomposed_layers) == ("add", "source_to_target", -2, 1)
    if conv.cached and conv.normalize and defaults and not conv.explain and not hooks:
        conv.forward = MethodType(_gcn_forward, conv)


def _gcn_forward(
    conv: GCNConv, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """GCNConv's forward with the same sums in the same order, faster on many snapshots x [S, N, C].

    PyG gathers every edge's source row, scales it by the edge's normalised weight and scatter-adds
    it into its target node: each target sums 0 and its edges' terms in edge order. Adding the
    scaled rows edge by edge into zeros makes the same float operations in the same order (the same
    bits: tests/models/test_detector.py) without the [S, edges, C] gather and scatter: a quarter of a
    60-window pass. Few snapshots (a re-forecast): PyG's own forward, quicker there."""
    if x.dim() != 3 or x.size(0) < EDGE_BY_EDGE_ROWS:
        return GCNConv.forward(conv, x, edge_index, edge_weight)
    if conv._cached_edge_index is None:  # as GCNConv.forward fills its cache
        conv._cached_edge_index = gcn_norm(
            edge_index, edge_weight, x.size(conv.node_dim), conv.improved, conv.add_self_loops, conv.flow, x.dtype
        )
    edges, weights = conv._cached_edge_index
    h = conv.lin(x)
    out = torch.zeros_like(h)
    for source, target, weight in zip(edges[0].tolist(), edges[1].tolist(), weights.unbind()):
        out[:, target] += weight * h[:, source]
    return out if conv.bias is None else out + conv.bias


def _copy_weights(shared: _SharedModule, state: dict[str, torch.Tensor]) -> None:
    """Copy a champion's weights into the shared module and forget the previous one's graph."""
    own = shared.state
    if state.keys() != own.keys() or any(state[k].shape != v.shape for k, v in own.items()):
        shared.model.load_state_dict(state)  # raises with the mismatch spelled out
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name])
    for conv in shared.model.modules():
        if isinstance(conv, GCNConv):  # PyG's cache attributes, cleared as its reset_parameters does
            conv._cached_edge_index = conv._cached_adj_t = None


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread while scoring: these tensors are tiny, and threads only wait on each
    other on a busy host (10x slower measured on 2 shared cores; training does the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
