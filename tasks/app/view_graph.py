"""A pattern's graph as a picture: its RPCs (nodes) in layers by call depth, parent calls above
their child calls, an incident's RPCs coloured and its most likely culprit service outlined.

Plain layout code (no graph library): a call graph is near a tree, so layers by depth (breadth
first from the entry RPCs) with each layer ordered by its parents' positions read well; a layer
wider than `MAX_PER_ROW` wraps onto more rows. Drawn with matplotlib's object API (no pyplot, so
it is safe in a web server's threads); every text from data is drawn with math parsing off.
Reads and writes no table.
"""

from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tasks.keys import split_node_key

MAX_PER_ROW = 5
LABEL_CHARS = 26
NORMAL_FACE, NORMAL_EDGE = "#f1f3f5", "#adb5bd"
MARKED_FACE, MARKED_EDGE = "#ffc9c9", "#e03131"
STRONGEST_FACE, STRONGEST_EDGE = "#e03131", "#a51111"
CULPRIT_EDGE = "#7048e8"


@dataclass(frozen=True)
class GraphSpec:
    """What to draw: the graph (node keys, parent→child edges) and the incident on it."""

    nodes: list[str]
    edges: list[tuple[str, str]]
    marked: dict[str, float] = field(default_factory=dict)  # incident RPC -> its peak score
    strongest: str | None = None
    culprit: str | None = None  # the most likely culprit service
    outside: set[str] = field(default_factory=set)  # incident RPCs not in the pattern's graph
    title: str = ""


def _parts(node: str) -> tuple[str, str, str]:
    try:
        caller, callee, interface, _ = split_node_key(node)
    except ValueError:
        return node, "", ""
    return caller, callee, interface or ""


def _short(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def node_text(node: str) -> str:
    caller, callee, interface = _parts(node)
    return _short(f"{caller} → {callee}") + ("\n" + _short(interface) if interface else "")


def involves(node: str, service: str | None) -> bool:
    """Whether the RPC is made or served by `service`."""
    return service is not None and service in _parts(node)[:2]


def _depths(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Call depth: 0 for entry RPCs (no parent), else one below the nearest parent (breadth first);
    an RPC only reached through a cycle starts a new tree at depth 0."""
    children: dict[str, list[str]] = {n: [] for n in nodes}
    has_parent = set()
    for parent, child in edges:
        if parent in children and child in children and parent != child:
            children[parent].append(child)
            has_parent.add(child)
    depth: dict[str, int] = {}
    for start in [n for n in nodes if n not in has_parent] + nodes:
        if start in depth:
            continue
        depth[start] = 0
        todo = deque([start])
        while todo:
            node = todo.popleft()
            for child in children[node]:
                if child not in depth:
                    depth[child] = depth[node] + 1
                    todo.append(child)
    return depth


def layers(nodes: list[str], edges: list[tuple[str, str]]) -> list[list[str]]:
    """The nodes in rows, top to bottom: by call depth, each row ordered by its parents' positions
    (ties by name), rows wider than MAX_PER_ROW wrapped."""
    nodes = sorted(set(nodes))
    depth = _depths(nodes, edges)
    parents: dict[str, list[str]] = {n: [] for n in nodes}
    for parent, child in edges:
        if parent in parents and child in parents and parent != child:
            parents[child].append(parent)
    by_depth: dict[int, list[str]] = {}
    for node in nodes:
        by_depth.setdefault(depth[node], []).append(node)
    position: dict[str, float] = {}
    rows: list[list[str]] = []
    for d in sorted(by_depth):

        def order(node: str) -> tuple[float, str]:
            placed = [position[p] for p in parents[node] if p in position]
            return (sum(placed) / len(placed) if placed else -1.0, node)

        layer = sorted(by_depth[d], key=order)
        for i in range(0, len(layer), MAX_PER_ROW):
            row = layer[i : i + MAX_PER_ROW]
            for j, node in enumerate(row):
                position[node] = (j + 0.5) / len(row)
            rows.append(row)
    return rows


def positions(rows: list[list[str]]) -> dict[str, tuple[float, float]]:
    """(x, y) per node: rows centred on x = 0, one unit apart; the first row at y = 0."""
    return {node: (j - (len(row) - 1) / 2, -float(i)) for i, row in enumerate(rows) for j, node in enumerate(row)}


def _style(spec: GraphSpec, node: str) -> tuple[str, dict[str, Any]]:
    """The node's text colour and box."""
    face, edge, color, width = NORMAL_FACE, NORMAL_EDGE, "black", 1.0
    if node in spec.marked:
        face, edge = MARKED_FACE, MARKED_EDGE
    if node == spec.strongest:
        face, edge, color = STRONGEST_FACE, STRONGEST_EDGE, "white"
    if involves(node, spec.culprit):
        edge, width = CULPRIT_EDGE, 2.8
    box = {
        "boxstyle": "round,pad=0.4",
        "facecolor": face,
        "edgecolor": edge,
        "linewidth": width,
        "linestyle": "--" if node in spec.outside else "-",
    }
    return color, box


def graph_png(spec: GraphSpec) -> bytes:
    """The picture as PNG bytes (a short note instead when the graph is empty)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    nodes = list(dict.fromkeys([*spec.nodes, *sorted(spec.outside)]))
    rows = layers(nodes, spec.edges)
    where = positions(rows)
    width = max((len(r) for r in rows), default=1)
    fig = Figure(figsize=(max(6.0, 2.4 * width), max(2.4, 0.8 * len(rows) + 1.2)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_xlim(-width / 2, width / 2)
    ax.set_ylim(-len(rows) + 0.45, 0.55)
    if not nodes:
        ax.text(0, 0, "no graph for this incident in the snapshot", ha="center", va="center", parse_math=False)
    for parent, child in spec.edges:
        if parent in where and child in where and parent != child:
            hot = child in spec.marked
            ax.annotate(
                "",
                xy=where[child],
                xytext=where[parent],
                arrowprops={
                    "arrowstyle": "-|>",
                    "color": MARKED_EDGE if hot else "#868e96",
                    "lw": 1.4 if hot else 0.8,
                    "shrinkA": 15,
                    "shrinkB": 15,
                    "alpha": 0.9 if hot else 0.6,
                },
            )
    for node, (x, y) in where.items():
        color, box = _style(spec, node)
        ax.text(x, y, node_text(node), ha="center", va="center", fontsize=8.5, color=color, bbox=box, parse_math=False)
    legend = [
        Patch(facecolor=MARKED_FACE, edgecolor=MARKED_EDGE, label="RPC in the incident"),
        Patch(facecolor=STRONGEST_FACE, edgecolor=STRONGEST_EDGE, label="its strongest RPC"),
    ]
    if spec.culprit:
        legend.append(
            Patch(
                facecolor="white",
                edgecolor=CULPRIT_EDGE,
                linewidth=2.4,
                label=f"culprit {_short(spec.culprit)}: its RPCs",
            )
        )
    if spec.outside:
        legend.append(Patch(facecolor=MARKED_FACE, edgecolor=MARKED_EDGE, linestyle="--", label="not in the graph"))
    shown = ax.legend(
        handles=legend,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        fontsize=8.5,
        frameon=False,
        ncol=2 if width < 3 else 4,
    )
    for text in shown.get_texts():
        text.set_parse_math(False)
    if spec.title:
        ax.set_title(spec.title, fontsize=10, loc="left", parse_math=False)
    out = io.BytesIO()
    fig.savefig(out, format="png", bbox_inches="tight", pad_inches=0.15)
    return out.getvalue()
