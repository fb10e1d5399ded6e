"""The registered champion served the MLflow way: `mlflow.pyfunc.load_model(...).predict(frame)`."""

from __future__ import annotations

import duckdb
import numpy as np

from tasks.models.features import FEATURES
from tasks.models.registry import model_name, setup_mlflow


def test_the_pyfunc_champion_forecasts_the_next_bucket_of_every_node(trained):
    settings, _, outcomes = trained
    outcome = outcomes[0]
    pid = outcome["pattern_id"]
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        series = con.execute(
            "SELECT bucket_ts, node, calls, errors, rt_mean, rt_p95 FROM pattern_series WHERE pattern_id = ? "
            "ORDER BY bucket_ts, node",
            [pid],
        ).df()
        nodes = [
            r[0]
            for r in con.execute(
                "SELECT node FROM pattern_nodes WHERE pattern_id = ? AND version = ? ORDER BY node",
                [pid, outcome["pattern_version"]],
            ).fetchall()
        ]
    mlflow = setup_mlflow(settings)  # the fixture's tracking URI
    model = mlflow.pyfunc.load_model(f"models:/{model_name(pid)}@champion")
    forecast = model.predict(series)
    assert list(forecast.columns) == ["node", *FEATURES]
    assert forecast["node"].tolist() == nodes, "one row per graph node, in the graph's order"
    values = forecast[list(FEATURES)].to_numpy()
    assert values.shape == (len(nodes), len(FEATURES)) and np.isfinite(values).all() and (values >= 0).all()
