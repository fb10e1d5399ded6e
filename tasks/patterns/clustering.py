"""Group trace shapes into patterns (HDBSCAN), keep pattern identities stable, build pattern graphs.

Features of a shape: TF-IDF over the RPCs it calls and the parent→child edges it contains. RPCs
say *what* a request touches, edges say *how* it chains them; IDF down-weights the RPCs every
request shares (gateway, auth, caches), so the RPCs unique to a request type dominate. Sublinear
tf keeps a fan-out of 8 identical calls from outweighing the chain. The sparse vectors are reduced
with truncated SVD and L2-normalised, so Euclidean distance is a monotone function of cosine
distance, and HDBSCAN (density-based, noise-aware, as in the method) runs on dense, low-dim points.

Weighting: distinct shapes are clustered, never one row per trace. HDBSCAN finds the dense groups
of shapes (the variants of one request type: optional branches, fan-outs); then traffic decides
about the shapes it left as noise: a shape frequent enough to matter joins the group it overlaps
most, or is a pattern of its own, while a rare outlier stays noise and is counted as such.

Pure computation: reads and writes no table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xxhash

from tasks.keys import edge_key, split_edge_key


@dataclass
class Shapes:
    """Distinct shapes of a window, with how many traces and calls each carries."""

    shape_id: np.ndarray
    traces: np.ndarray
    calls: np.ndarray
    rpcs: list[list[str]]
    edges: list[list[str]]

    def __len__(self) -> int:
        return len(self.shape_id)


def shape_features(shapes: Shapes, dims: int = 32, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    docs = [list(r) + ["E:" + e for e in es] for r, es in zip(shapes.rpcs, shapes.edges)]
    tfidf = TfidfVectorizer(analyzer=lambda doc: doc, sublinear_tf=True).fit_transform(docs)
    k = min(dims, tfidf.shape[1] - 1, len(shapes) - 1)
    if k < 2:
        return normalize(tfidf.toarray())
    return normalize(TruncatedSVD(n_components=k, random_state=seed).fit_transform(tfidf))


def containment(a: set[str], b: set[str]) -> float:
    """Share of a's RPCs that b also has."""
    return len(a & b) / len(a) if a else 1.0


def related(a: set[str], b: set[str], min_containment: float) -> bool:
    """Two shapes of one request type: most of the smaller's RPCs are in the larger, or they share
    most RPCs overall. Different request types share only infrastructure (gateway, auth, caches)."""
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    return containment(small, large) >= min_containment or jaccard(a, b) >= 0.5


def _split_incoherent(labels: np.ndarray, rpc_sets: list[set[str]], min_containment: float) -> np.ndarray:
    """Split a cluster into the connected components of `related` among its shapes: HDBSCAN may
    join two sparse groups of unrelated shapes that happen to be each other's nearest neighbours."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    out, next_label = labels.copy(), int(labels.max()) + 1
    for c in sorted(set(labels) - {-1}):
        members = np.flatnonzero(labels == c)
        pairs = [
            (i, j)
            for i in range(len(members))
            for j in range(i + 1, len(members))
            if related(rpc_sets[members[i]], rpc_sets[members[j]], min_containment)
        ]
        rows, cols = zip(*pairs) if pairs else ((), ())
        graph = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(members), len(members)))
        k, component = connected_components(graph, directed=False)
        for part in range(1, k):
            out[members[component == part]] = next_label
            next_label += 1
    return out


def _merge_variants(labels: np.ndarray, rpc_sets: list[set[str]], min_containment: float) -> np.ndarray:
    """Merge a cluster into a larger one that contains (almost) all of its RPCs: the same request
    type seen with and without an optional subtree, not a different request."""
    merged = True
    while merged:
        merged = False
        unions = {c: set().union(*(rpc_sets[i] for i in np.flatnonzero(labels == c))) for c in set(labels) - {-1}}
        for small in sorted(unions, key=lambda c: len(unions[c])):
            hosts = [
                c
                for c in unions
                if c != small
                and len(unions[c]) >= len(unions[small])
                and containment(unions[small], unions[c]) >= min_containment
            ]
            if hosts:
                host = max(
                    hosts, key=lambda c: (containment(unions[small], unions[c]), jaccard(unions[small], unions[c]))
                )
                labels[labels == small] = host
                merged = True
                break
    return labels


def cluster_labels(
    shapes: Shapes,
    features: np.ndarray,
    min_cluster_size: int,
    min_samples: int,
    min_pattern_traces: int,
    min_containment: float = 0.9,
) -> np.ndarray:
    """Pattern label per distinct shape (-1: noise), dense labels 0..k-1.

    1. HDBSCAN on the shapes' features finds dense groups of variants.
    2. A group is split where its shapes share no RPCs beyond infrastructure (see `related`).
    3. A group whose RPCs another group (almost) contains is merged into it (optional subtrees).
    4. Traffic decides about the shapes HDBSCAN left as noise: one carried by at least
       `min_pattern_traces` traces joins the group that contains its RPCs, or founds its own;
       rare outliers stay noise and are counted as such.
    """
    import hdbscan

    n = len(shapes)
    labels = np.full(n, -1, dtype=np.int64)
    if n > min_cluster_size:
        labels = (
            hdbscan.HDBSCAN(
                min_cluster_size=min_cluster_size,
                min_samples=min_samples,
            )
            .fit_predict(features)
            .astype(np.int64)
        )
    rpc_sets = [set(r) for r in shapes.rpcs]
    labels = _split_incoherent(labels, rpc_sets, min_containment)
    for c in set(labels) - {-1}:  # a split-off fragment too small to be dense is noise again
        members = labels == c
        if members.sum() < min_cluster_size and shapes.traces[members].sum() < min_pattern_traces:
            labels[members] = -1
    next_label = int(labels.max()) + 1
    for i in np.argsort(-shapes.traces, kind="stable"):
        if labels[i] < 0 and shapes.traces[i] >= min_pattern_traces:
            labels[i], next_label = next_label, next_label + 1
    labels = _merge_variants(labels, rpc_sets, min_containment)
    dense = {c: k for k, c in enumerate(sorted(set(labels) - {-1}))}
    return np.array([dense.get(c, -1) for c in labels], dtype=np.int64)


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def match_clusters(new: dict[int, set[str]], old: dict[int, set[str]], min_jaccard: float) -> dict[int, int]:
    """One-to-one matching of new clusters to existing patterns by RPC-set Jaccard (best total)."""
    from scipy.optimize import linear_sum_assignment

    if not new or not old:
        return {}
    new_keys, old_keys = list(new), list(old)
    score = np.array([[jaccard(new[n], old[o]) for o in old_keys] for n in new_keys])
    rows, cols = linear_sum_assignment(-score)
    return {new_keys[r]: old_keys[c] for r, c in zip(rows, cols) if score[r, c] >= min_jaccard}


@dataclass
class Graph:
    """A pattern's graph: nodes (RPC keys) with support and calls, edges with co-occurrence weight."""

    nodes: dict[str, tuple[float, int]] = field(default_factory=dict)
    edges: dict[tuple[str, str], int] = field(default_factory=dict)
    traces: int = 0
    calls: int = 0

    @property
    def hash(self) -> str:
        text = "\n".join(sorted(self.nodes)) + "\n--\n" + "\n".join(edge_key(p, c) for p, c in sorted(self.edges))
        return xxhash.xxh3_64(text.encode()).hexdigest()


def build_graph(shapes: Shapes, members: np.ndarray, min_support: float) -> Graph:
    """Union of the member shapes' trees, keeping what at least `min_support` of traces contain."""
    total = int(shapes.traces[members].sum())
    node_traces: dict[str, int] = {}
    node_calls: dict[str, int] = {}
    edge_traces: dict[tuple[str, str], int] = {}
    for i in members:
        n = int(shapes.traces[i])
        keys, counts = np.unique(np.asarray(shapes.rpcs[i], dtype=object), return_counts=True)
        for key, count in zip(keys, counts):
            node_traces[key] = node_traces.get(key, 0) + n
            node_calls[key] = node_calls.get(key, 0) + n * int(count)
        for edge in set(shapes.edges[i]):
            parent, child = split_edge_key(edge)
            edge_traces[(parent, child)] = edge_traces.get((parent, child), 0) + n
    keep = max(1.0, min_support * total)
    nodes = {k: (v / total, node_calls[k]) for k, v in node_traces.items() if v >= keep}
    edges = {e: w for e, w in edge_traces.items() if w >= keep and e[0] in nodes and e[1] in nodes}
    return Graph(nodes, edges, total, int(shapes.calls[members].sum()))


def critical(calls: dict[int, int], total_calls: int, coverage: float, min_calls: int) -> set[int]:
    """The busiest clusters until `coverage` of all calls, each with at least `min_calls`."""
    chosen, covered = set(), 0
    for key, n in sorted(calls.items(), key=lambda kv: -kv[1]):
        if covered >= coverage * total_calls or n < min_calls:
            break
        chosen.add(key)
        covered += n
    return chosen
