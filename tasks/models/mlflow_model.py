"""MLflow pyfunc wrapper of a pattern model (models-from-code: nothing is pickled).

`mlflow.pyfunc.load_model("models:/rpcwatch-pattern-<id>@champion").predict(frame)` takes the
pattern's recent series (columns bucket_ts, node, calls, errors, rt_mean, rt_p95; at least W
buckets) and returns the next bucket's expected values per node (columns node, calls, rt_mean,
rt_p95, errors). Reads only the version's artifact files; no tables. Each version is logged with
this as its signature (`tasks.models.tracking.signature`: counts as long, latencies as double, as
`pattern_series` holds them) and the pattern's last W buckets as its input example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class PatternForecaster(PythonModel):
    def load_context(self, context: Any) -> None:
        from tasks.models.training import load_model

        self.folder = Path(context.artifacts["state_dict"]).parent
        self.model, self.cfg, self.graph, self.norm, self.thresholds = load_model(self.folder)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import numpy as np
        import torch

        from tasks.models.features import COUNTS, FEATURES
        from tasks.models.forecast import Prepared, input_windows
        from tasks.models.forecast import predict as forecast
        from tasks.models.nn import graph_edge_index

        nodes = self.graph["nodes"]
        frame = model_input.pivot_table(index="bucket_ts", columns="node", values=list(FEATURES))
        frame = frame.sort_index().iloc[-self.cfg.window :]
        values = np.stack([frame[f].reindex(columns=nodes).to_numpy() for f in FEATURES], axis=-1)
        for f in COUNTS:  # a node without a row in a bucket had no calls (latency stays unknown: NaN)
            values[..., f] = np.nan_to_num(values[..., f])
        x, offsets = input_windows(self.norm, values, np.array([0]), self.cfg.window)
        prep = Prepared(
            x,
            torch.zeros(1, len(nodes), len(FEATURES)),
            np.array([0]),
            0,
            graph_edge_index(len(nodes), [tuple(e) for e in self.graph["edges"]]),
            offsets,
            self.norm,
        )
        out = forecast(self.model, prep, slice(0, 1), torch.device("cpu"))[0]
        return pd.DataFrame(out, index=nodes, columns=list(FEATURES)).rename_axis("node").reset_index()


mlflow.models.set_model(PatternForecaster())
