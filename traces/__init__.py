"""Traces: the record of every step the agent takes, its store, export and scrubbing."""

from traces.otel import OtlpSink, export_otlp_json, otlp_json, otlp_sink_from_config
from traces.schemas import (
    SCHEMA_VERSION,
    Grade,
    LlmData,
    RetrievalData,
    Span,
    Task,
    ToolCall,
    ToolData,
    Trace,
    TraceQuery,
    TracesConfig,
    TraceStats,
)
from traces.scrub import scrub_text, scrub_trace
from traces.store import (
    TraceNotFoundError,
    TraceStore,
    TraceStoreError,
    TraceStoreFullError,
    export_jsonl,
)
from traces.tracer import (
    ActiveTrace,
    Tracer,
    current_span_id,
    current_trace_id,
    tracer_from_config,
)

__all__ = [
    "SCHEMA_VERSION",
    "ActiveTrace",
    "Grade",
    "LlmData",
    "OtlpSink",
    "RetrievalData",
    "Span",
    "Task",
    "ToolCall",
    "ToolData",
    "Trace",
    "TraceNotFoundError",
    "TraceQuery",
    "TraceStats",
    "TraceStore",
    "TraceStoreError",
    "TraceStoreFullError",
    "Tracer",
    "TracesConfig",
    "current_span_id",
    "current_trace_id",
    "export_jsonl",
    "export_otlp_json",
    "otlp_json",
    "otlp_sink_from_config",
    "scrub_text",
    "scrub_trace",
    "tracer_from_config",
]
