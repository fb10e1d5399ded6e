"""How the synthetic traces are laid out and written under the output folder (no tables: files).

Writes `dt=YYYY-MM-DD/hour=HH/part-<generated hour>.parquet` (the span files, columns `COLUMNS`),
`truth/trace_templates.parquet` (schema `TRUTH_SCHEMA`) through `generate`, and `manifest.json`;
`clean_output` removes exactly these (and `labels.parquet`, which `events.write_labels` writes)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.synth.events import Event
from tasks.synth.system import Template

HOUR_MS = 3_600_000
# Alibaba v2022 CallGraph columns (text between the timestamp and rt) plus rpcwatch's `error`
TEXT_COLUMNS = ("traceid", "service", "rpc_id", "rpctype", "um", "uminstanceid", "interface", "dm", "dminstanceid")
SPAN_SCHEMA = pa.schema(
    [("timestamp", pa.int64()), *((c, pa.string()) for c in TEXT_COLUMNS), ("rt", pa.float64()), ("error", pa.int8())]
)
COLUMNS = tuple(SPAN_SCHEMA.names)  # the span files' columns, in this order
TRUTH_SCHEMA = pa.schema([("traceid", pa.string()), ("request_type", pa.string())])
_DICT_COLUMNS_NO_TRACE = [c for c in COLUMNS if SPAN_SCHEMA.field(c).type == pa.string() and c != "traceid"]


def hour_key(epoch_hour: int) -> str:
    """'2026-01-01T03:00': how the summary and the manifest name an hour."""
    return datetime.fromtimestamp(epoch_hour * 3600, UTC).strftime("%Y-%m-%dT%H:00")


def hour_path(epoch_hour: int, gen_hour: int) -> str:
    """The span file, relative to the output folder, of partition hour `epoch_hour` written for `gen_hour`."""
    d = datetime.fromtimestamp(epoch_hour * 3600, UTC)
    g = datetime.fromtimestamp(gen_hour * 3600, UTC)
    return f"dt={d:%Y-%m-%d}/hour={d:%H}/part-{g:%Y%m%d%H}.parquet"


def clean_output(out: Path) -> None:
    """Remove what a previous `generate` wrote into `out` (and only that)."""
    for f in out.glob("dt=*/hour=*/part-*.parquet"):
        f.unlink()
    for d in sorted(out.glob("dt=*/hour=*")) + sorted(out.glob("dt=*")):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    for f in (
        out / "truth" / "trace_templates.parquet",
        out / "labels.parquet",
        out / "manifest.json",
    ):
        f.unlink(missing_ok=True)


def partitions(table: pa.Table, ts: np.ndarray, epoch_hour: int) -> list[tuple[int, pa.Table]]:
    """Split an hour's spans by the hour of each span's timestamp. Spans past the hour belong
    to the traces that started last, i.e. sit in the table's tail: only the tail is filtered."""
    end_ms = (epoch_hour + 1) * HOUR_MS
    late = ts >= end_ms
    if not late[-1] and not late.any():
        return [(epoch_hour, table)]
    first = int(np.argmax(late))
    tail, tail_ts = table.slice(first), ts[first:]
    part = tail_ts // HOUR_MS
    head = pa.concat_tables([table.slice(0, first), tail.filter(pa.array(part == epoch_hour))])
    out = [(epoch_hour, head)]
    for p in range(epoch_hour + 1, int(part.max()) + 1):
        mask = part == p
        if mask.any():
            out.append((p, tail.filter(pa.array(mask))))
    return out


_WRITE_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 1,
    "use_dictionary": _DICT_COLUMNS_NO_TRACE,
    "write_statistics": ["timestamp"],
    "column_encoding": {
        "timestamp": "DELTA_BINARY_PACKED",
        "traceid": "PLAIN",  # trace-major order: zstd squeezes the repeats
        "rt": "BYTE_STREAM_SPLIT",
        "error": "PLAIN",
    },
    "store_schema": False,  # readers see plain string columns, not Arrow dictionary types
}


class SpanFiles:
    """The span files of one generated hour, appended chunk by chunk (on the writer thread)."""

    def __init__(self) -> None:
        self.writers: dict[Path, pq.ParquetWriter] = {}

    def write(self, path: Path, table: pa.Table) -> None:
        writer = self.writers.get(path)
        if writer is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = self.writers[path] = pq.ParquetWriter(path, table.schema, **_WRITE_OPTIONS)
        writer.write_table(table)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


@dataclass(frozen=True)
class SynthParameters:
    """The validated arguments of one `generate` run, as the manifest records them."""

    start: datetime
    hours: int
    seed: int
    spans_per_hour: int
    anomalies: bool
    systems: int = 1  # independent shops in one fleet (`system.build_fleet`)


def _template_entry(t: Template) -> dict[str, Any]:
    return {
        "request_type": t.request_type,
        "entry": t.entry,
        "base_rate": round(t.base_rate, 6),
        "expected_spans": round(t.expected_spans(), 3),
        "nodes": [
            {
                "rpc_id": n.rpc_id,
                "caller": n.caller,
                "callee": n.callee,
                "interface": n.interface,
                "rpctype": n.rpctype,
                "optional": n.optional,
                "p": n.p,
            }
            for n in t.nodes
        ],
    }


def write_manifest(
    out: Path,
    params: SynthParameters,
    rows_per_hour: dict[str, int],
    templates: list[Template],
    events: list[Event],
    files: list[str],
) -> None:
    """`manifest.json`: parameters, rows per partition hour, the templates, the events and the file list."""
    manifest = {
        "format": "alibaba-v2022",
        "columns": list(COLUMNS),
        "start": params.start.isoformat(),
        "hours": params.hours,
        "seed": params.seed,
        "spans_per_hour": params.spans_per_hour,
        "anomalies": bool(params.anomalies),
        "systems": params.systems,
        "rows_per_hour": rows_per_hour,
        "templates": [_template_entry(t) for t in templates],
        "events": [
            {
                "event_id": ev.event_id,
                "kind": ev.kind,
                "request_type": templates[ev.template].request_type,
            }
            for ev in events
        ],
        "files": sorted(files),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
