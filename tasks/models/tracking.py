"""What MLflow shows about a training, so that versions compare in its UI: the pyfunc's signature
and input example, run tags naming the Airflow task that trained (from the `AIRFLOW_CTX_*`
variables Airflow sets in a task's process: no Airflow import), the registered model's and each
version's descriptions and tags, the decision as run params and tags, the champion / challenger
aliases; and where the UI is: links that open it in its model-training view, and whether the
server at an address serves this home's store (`ui_problem`)."""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.models.features import CALLS, ERRORS, FEATURES, RT_MEAN, RT_P95
from tasks.models.forecast import TrainConfig
from tasks.models.registry import (
    ARTIFACTS_TAG,
    CHALLENGER,
    CHAMPION,
    file_digests,
    process_tags,
    registered_champion,
)
from tasks.models.series import PatternData
from tasks.models.trace_model import TraceModel

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Experiment
    from mlflow.models import ModelSignature

    from tasks.models.fitting import Fitted

# run tag <- the variable Airflow sets in a task process (absent from the CLI)
AIRFLOW_CONTEXT = {
    "airflow.dag_id": "AIRFLOW_CTX_DAG_ID",
    "airflow.run_id": "AIRFLOW_CTX_DAG_RUN_ID",
    "airflow.task_id": "AIRFLOW_CTX_TASK_ID",
    "airflow.try_number": "AIRFLOW_CTX_TRY_NUMBER",
}
LAUNCHED_BY_TAG = "rpcwatch.launched_by"  # airflow | cli
TRAINED_FOR_TAG = "rpcwatch.trained_for"  # the hour trained for, ISO
# run params of the decision: MLflow's page comparing registered versions lists params and
# metrics only (no tags, aliases or descriptions), so the decision is a param there too
DECISION_PARAM = "decision"  # champion | challenger: the alias the version got when registered
DECISION_REASON_PARAM = "decision_reason"


def signature() -> ModelSignature:
    """The pyfunc's signature: a pattern's series in long form as the warehouse holds it
    (`pattern_series`: counts BIGINT, latencies DOUBLE, NaN where unknown), one row per node of the
    next bucket out. MLflow checks inputs against it (int64 counts; extra columns are ignored)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    inputs = Schema(
        [
            ColSpec(DataType.datetime, "bucket_ts"),
            ColSpec(DataType.string, "node"),
            ColSpec(DataType.long, "calls"),
            ColSpec(DataType.long, "errors"),
            ColSpec(DataType.double, "rt_mean"),
            ColSpec(DataType.double, "rt_p95"),
        ]
    )
    outputs = Schema([ColSpec(DataType.string, "node"), *(ColSpec(DataType.double, f) for f in FEATURES)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(data: PatternData, window: int) -> pd.DataFrame:
    """The pattern's last `window` buckets in the signature's form (rows where a node had calls)."""
    import pandas as pd

    values = data.values[-window:]
    t, n = np.nonzero(values[:, :, CALLS] > 0)
    return pd.DataFrame(
        {
            "bucket_ts": pd.to_datetime(data.buckets[-window:][t]),
            "node": np.asarray(data.nodes, dtype=object)[n],
            "calls": values[t, n, CALLS].astype(np.int64),
            "errors": np.nan_to_num(values[t, n, ERRORS]).astype(np.int64),
            "rt_mean": values[t, n, RT_MEAN],
            "rt_p95": values[t, n, RT_P95],
        }
    )


def launch_tags(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Run tags naming the Airflow task instance that trained (`airflow.dag_id`, `.run_id`,
    `.task_id`, `.try_number`, from the `AIRFLOW_CTX_*` variables Airflow exports into a task's
    process), or `rpcwatch.launched_by=cli` when they are absent; and the process holding the run
    open (`rpcwatch.host`, `.pid_namespace`, `.pid`: a run its dead process left open is failed
    by the next one, `tasks.models.registry.close_orphaned_runs`)."""
    env = os.environ if env is None else env
    tags = {tag: env[var] for tag, var in AIRFLOW_CONTEXT.items() if env.get(var)}
    tags[LAUNCHED_BY_TAG] = "airflow" if "airflow.dag_id" in tags else "cli"
    return tags | process_tags()


def launched_by(tags: Mapping[str, str]) -> str:
    if tags.get(LAUNCHED_BY_TAG) != "airflow":
        return "the `rpcwatch` CLI"
    return (
        f"Airflow: DAG `{tags.get('airflow.dag_id')}`, run `{tags.get('airflow.run_id', '?')}`, "
        f"task `{tags.get('airflow.task_id', '?')}`, try {tags.get('airflow.try_number', '?')}"
    )


def model_description(data: PatternData, cfg: TrainConfig) -> str:
    """The registered model's description (Markdown): the pattern, its graph, what the model does.
    Rewritten by every training (a pattern's graph can change between versions)."""
    shown = ", ".join(f"`{n}`" for n in data.nodes[:4]) + (", …" if len(data.nodes) > 4 else "")
    return (
        f"**RPC-chain pattern {data.pattern_id}** (pattern version {data.version}, graph `{data.graph_hash[:12]}`): "
        f"{len(data.nodes)} RPCs (graph nodes), {len(data.edges)} call edges: {shown}.\n\n"
        f"Forecasts the next {data.bucket_seconds}-s bucket of calls, errors, mean and p95 latency of every RPC "
        f"of the chain from its last {cfg.window} buckets (STGCN: temporal convolutions around a GCN over the "
        "call graph), with per-RPC thresholds that flag irregular points; the same version holds the pattern's "
        "trace model, which scores each trace's structure and latencies.\n\n"
        f"Alias `{CHAMPION}`: the version scoring uses. Alias `{CHALLENGER}`: the newest version that did not "
        "beat it. Each version's description says why it was trained, how it validated and what was decided; "
        "its run (experiment `rpcwatch`) holds the metrics to compare."
    )


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def version_description(
    fitted: Fitted,
    trained_for: datetime,
    reason: str,
    decision: tuple[str, str],
    run_tags: Mapping[str, str],
    trace: TraceModel | None,
) -> str:
    """A version's description (Markdown): why it was trained, on what, how it validated, the decision."""
    data, m = fitted.data, fitted.scores
    val_start = data.buckets[fitted.prep.targets[fitted.prep.split]]
    lines = [
        f"**{decision[0]}**: {decision[1]}.",
        "",
        f"- Trained for hour {trained_for:%Y-%m-%d %H:%M} UTC; why: {reason or 'not given'}; "
        f"launched by {launched_by(run_tags)}.",
        f"- Data: {data.buckets[0]} – {data.buckets[-1]} ({len(data.buckets)} buckets of {data.bucket_seconds} s), "
        f"pattern version {data.version}, {len(data.nodes)} RPCs, graph `{data.graph_hash[:12]}`.",
        f"- Validation from {val_start}: calls MAPE {_fmt(m.get('model_mape_calls'))} "
        f"({_fmt(m.get('mape_calls_over_floor'), '.2f')} × the Poisson floor "
        f"{_fmt(m.get('poisson_floor_calls'))}, {_fmt(m.get('mape_calls_vs_seasonal_naive'), '.2f')} × seasonal "
        f"naive; without the graph {_fmt(m.get('no_graph_mape_calls'))}); p95 latency MAPE "
        f"{_fmt(m.get('model_mape_rt_p95'))}.",
        "- Trace model: "
        + (f"surprising-trace rate {_fmt(trace.rate)}." if trace is not None else "none (too few traces)."),
    ]
    return "\n".join(lines)


def version_tags(
    fitted: Fitted,
    trained_for: datetime,
    decision: tuple[str, str],
    run_id: str,
    reason: str,
    artifacts: dict[str, str],
) -> dict[str, str]:
    """The tags a version is registered with (the same registry write: never a version without them)."""
    return {
        "graph_hash": fitted.data.graph_hash,
        "pattern_version": str(fitted.data.version),
        "trained_for": trained_for.isoformat(),
        "decision": decision[0],
        "reason": decision[1],
        "stale_reason": reason,
        "run_id": run_id,
        "val_mape_calls": f"{fitted.scores['model_mape_calls']:.5f}",
        ARTIFACTS_TAG: json.dumps(file_digests(Path(p) for p in artifacts.values()), sort_keys=True),
    }


def describe_registered_model(client: MlflowClient, name: str, description: str) -> None:
    """Create the registered model with its description, or bring an existing one's up to date."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        client.update_registered_model(name, description=description)


def move_aliases(client: MlflowClient, name: str, version: int, decision: str) -> None:
    """Point the `decision` alias (champion | challenger) at the new version; the alias, not the
    tag, makes the champion. A new champion also ends an older `challenger` (it lost to a champion
    that no longer serves) and tags the champion it replaces `superseded_by`."""
    previous = registered_champion(client, name) if decision == CHAMPION else None
    client.set_registered_model_alias(name, decision, str(version))
    if decision != CHAMPION:
        return
    challenger = client.get_registered_model(name).aliases.get(CHALLENGER)
    if challenger is not None and int(challenger) < version:
        client.delete_registered_model_alias(name, CHALLENGER)
    if previous is not None and int(previous.version) != version:
        client.set_model_version_tag(name, previous.version, "superseded_by", str(version))


def record_decision(
    client: MlflowClient, run_id: str, pattern_id: int, version: int, trained_for: datetime, decision: tuple[str, str]
) -> None:
    """The decision on the run, in one write: as params (the registry's version compare lists only
    params and metrics) and tags (the runs compare and the run's page list them), with the version
    in the run's name (two runs of one hour tell apart in either compare)."""
    from mlflow.entities import Param, RunTag

    params = {DECISION_PARAM: decision[0], DECISION_REASON_PARAM: decision[1]}
    tags = {
        "decision": decision[0],
        "reason": decision[1],
        "registered_version": str(version),
        "mlflow.runName": f"pattern-{pattern_id}-v{version}-{trained_for:%Y%m%dT%H}",
    }
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )


# --- where to see it: MLflow's UI ------------------------------------------------------------------

# MLflow 3.17's UI opens an experiment in the view its URL's `workflowType` names, else in the one
# this browser last chose (the sidebar's GenAI | Model training switch, kept in localStorage as
# `mlflow.workflowType_v1`), else in GenAI's (Overview: traces, tokens, cost). It does not read the
# experiment's `mlflow.experimentKind` tag: the hook that would is behind a feature flag its bundle
# hard-codes on (server/js/build, the experiment-kind hook and the `workflowType` context). So
# every link rpcwatch prints names the view.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
# MLflow's REST call that finds an experiment by name (the UI's server answers it at the same origin)
GET_EXPERIMENT_BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment in MLflow's model-training view (it opens on the Runs tab)."""
    return f"{base.rstrip('/')}/#/experiments/{urllib.parse.quote(experiment_id, safe='')}?{MODEL_TRAINING_VIEW}"


def registered_model_url(base: str, name: str) -> str:
    """A registered model's page (its versions, aliases; tick two, Compare) in the model-training view."""
    return f"{base.rstrip('/')}/#/models/{urllib.parse.quote(name, safe='')}?{MODEL_TRAINING_VIEW}"


def ui_problem(url: str, experiment: Experiment, timeout_s: float = 3.0) -> str | None:
    """Why the MLflow server at `url` is not the UI of `experiment`'s store (None: it is). It is when
    its REST API finds an experiment of that name with the same id, creation time and artifact
    location: another home, or a copy of this one (its artifacts re-addressed), differs in these."""
    query = urllib.parse.urlencode({"experiment_name": experiment.name})
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}{GET_EXPERIMENT_BY_NAME}?{query}", timeout=timeout_s) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as err:  # a web server: MLflow without the experiment (404), a login, ...
        return f"it has no experiment '{experiment.name}'" if err.code == 404 else f"it answers HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return f"nothing answers there ({getattr(err, 'reason', err)})"
    except ValueError:  # not JSON: some other web server
        return "it is not an MLflow server"
    served = body.get("experiment", {}) if isinstance(body, dict) else {}
    ours = (experiment.experiment_id, experiment.creation_time, experiment.artifact_location)
    theirs = (served.get("experiment_id"), served.get("creation_time"), served.get("artifact_location"))
    if [str(v) for v in ours] != [str(v) for v in theirs]:
        return f"it serves another store (its experiment '{experiment.name}' is not this home's)"
    return None
