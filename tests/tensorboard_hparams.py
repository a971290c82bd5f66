"""What TensorBoard's HPARAMS dashboard shows for a log dir, read back from the event files with its own backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def sessions(logdir: Path) -> list[Any]:
    """The session groups the dashboard lists by default (every status allowed, every value ticked)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    ctx = backend_context.Context(base_plugin.TBContext(data_provider=provider, logdir=str(logdir), multiplexer=mux))
    request_context = context.RequestContext()
    experiment = get_experiment.Handler(request_context, ctx, "", api_pb2.GetExperimentRequest()).run()
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=1000, allowed_statuses=[
        api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING])
    for info in experiment.hparam_infos:  # the dashboard's default filter: every discrete value ticked
        col = request.col_params.add(hparam=info.name)
        if info.HasField("domain_discrete"):
            col.filter_discrete.CopyFrom(info.domain_discrete)
    return list(list_session_groups.Handler(request_context, ctx, "", request).run().session_groups)
