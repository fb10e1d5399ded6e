"""The node key: one RPC (caller, callee, interface, rpc_type) written as one text.

Fields are joined with `|`. Names come from trace files and may hold anything, so a `\\`, `|` or
`>` inside a field is escaped with a `\\`: every key splits back into exactly its four fields, two
different RPCs never share a key, and an edge `parent > child` splits at its one unescaped `>`.
Names without those characters keep the plain `caller|callee|interface|rpc_type` form. A missing
interface is written as the empty field.
"""

from __future__ import annotations

from typing import NamedTuple

SEP = "|"
ESCAPE = "\\"
EDGE = " > "


class NodeParts(NamedTuple):
    caller: str
    callee: str
    interface: str | None
    rpc_type: str


def _escape(field: str) -> str:
    return field.replace(ESCAPE, ESCAPE * 2).replace(SEP, ESCAPE + SEP).replace(">", ESCAPE + ">")


def node_key(caller: str, callee: str, interface: str | None, rpc_type: str) -> str:
    return SEP.join(_escape(f) for f in (caller, callee, interface or "", rpc_type))


def _fields(key: str) -> list[str]:
    fields, current, escaped = [], [], False
    for char in key:
        if escaped:
            current.append(char)
            escaped = False
        elif char == ESCAPE:
            escaped = True
        elif char == SEP:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def split_node_key(key: str) -> NodeParts:
    """The four fields of a key made by `node_key` (or `node_key_sql`)."""
    fields = _fields(key)
    if len(fields) != 4:
        raise ValueError(f"not a node key (caller|callee|interface|rpc_type): {key!r}")
    caller, callee, interface, rpc_type = fields
    return NodeParts(caller, callee, interface or None, rpc_type)


def _escape_sql(column: str) -> str:
    return f"replace(replace(replace({column}, '\\', '\\\\'), '|', '\\|'), '>', '\\>')"


def node_key_sql(alias: str = "") -> str:
    """The same key as a DuckDB expression over the columns of table alias `alias` (a constant
    of the calling code, never outside text)."""
    prefix = f"{alias}." if alias else ""
    parts = [f"{prefix}caller", f"{prefix}callee", f"coalesce({prefix}interface, '')", f"{prefix}rpc_type"]
    return "concat_ws('|', " + ", ".join(_escape_sql(p) for p in parts) + ")"


def rpc_label(caller: str, callee: str, interface: str | None) -> str:
    """An RPC as people name it (`rpcwatch plot --node`, the labels file): `caller:callee:interface`.
    For display and matching only: unlike a node key it is not escaped and has no rpc_type."""
    return f"{caller}:{callee}:{interface or ''}"


def node_label(key: str) -> str:
    """The `rpc_label` of a node key."""
    caller, callee, interface, _ = split_node_key(key)
    return rpc_label(caller, callee, interface)


def edge_key(parent: str, child: str) -> str:
    return parent + EDGE + child


def split_edge_key(edge: str) -> tuple[str, str]:
    """(parent, child) node keys of an edge: the separator is the only unescaped `>`."""
    escaped = False
    for i, char in enumerate(edge):
        if escaped:
            escaped = False
        elif char == ESCAPE:
            escaped = True
        elif char == ">":
            return edge[: i - 1], edge[i + 2 :]
    raise ValueError(f"not an edge (parent > child): {edge!r}")
