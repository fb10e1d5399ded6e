"""A pattern's champion as scoring uses it: model, config, graph, normaliser and typed thresholds
from the champion's verified cached artifacts, forecasting a batch of windows and turning
observed vs expected values into `Flag`s. Reads no table (artifacts: the model cache of
`tasks.models.registry.cached_artifacts`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch_geometric.nn import GCNConv

from tasks.models.features import CALLS, COUNTS, ERRORS, LATENCIES
from tasks.models.forecast import Normaliser, Prepared, TrainConfig, input_windows, make_model, predict
from tasks.models.nn import graph_edge_index
from tasks.models.registry import cached_artifacts
from tasks.models.thresholds import NodeBands, Thresholds, count_bands, latency_band
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
    sample's flags keep this order); latency only when `latency`."""
    lo, hi = _count_limits(observed, expected, bands, alarm_p)
    out: list[Flag] = []
    for n, node in enumerate(bands):
        for c, (f, up, down) in enumerate(COUNT_KINDS):
            out += _outside(observed[:, n, f], expected[:, n, f], hi[:, n, c], n, f, "up", up)
            if down:
                out += _outside(observed[:, n, f], expected[:, n, f], lo[:, n, c], n, f, "down", down)
        if latency:
            out += _latency_flags(observed, expected, n, node)
    return out


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
    return lo.reshape(shape), hi.reshape(shape)


def _outside(
    obs: np.ndarray, exp: np.ndarray, limit: np.ndarray, n: int, f: int, direction: str, kind: str
) -> list[Flag]:
    """Flags of the samples of one count series beyond `limit`, scored by the band's width."""
    beyond = obs > limit if direction == "up" else obs < limit
    flags = []
    for s in np.flatnonzero(beyond):
        distance = obs[s] - exp[s] if direction == "up" else exp[s] - obs[s]
        width = limit[s] - exp[s] if direction == "up" else exp[s] - limit[s]
        flags.append(Flag(int(s), n, f, float(limit[s]), float(distance / max(width, 1e-9)), direction, kind))
    return flags


def _latency_flags(observed: np.ndarray, expected: np.ndarray, n: int, node: NodeBands) -> list[Flag]:
    """Latency above its band (where the node had calls), scored on the log scale."""
    calls = observed[:, n, CALLS]
    flags = []
    for f in LATENCIES:
        band = node.latency(f)
        obs, exp = observed[:, n, f], expected[:, n, f]
        _, high = latency_band(exp, calls, band.sigma, band.k, band.phi)
        ok = (calls > 0) & np.isfinite(obs)
        for s in np.flatnonzero(ok & (obs > high)):
            score = np.log(obs[s] / exp[s]) / max(np.log(high[s] / exp[s]), 1e-9)
            flags.append(Flag(int(s), n, f, float(high[s]), float(score), "up", "latency"))
    return flags


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
        _MODULES[key] = _SharedModule(model, model.state_dict(keep_vars=False))
    return _MODULES[key]


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
