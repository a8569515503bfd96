"""Recording: the `Tracer` that the agent and users' own code call to record episodes.

    tracer = Tracer(TraceStore(path))
    async with tracer.trace(env="calculator", task_id="t1", model="smollm2", adapter="v2") as t:
        with tracer.span("llm", "chat", llm=LlmData(messages=msgs, tools=schemas)) as s:
            s.llm.completion = await model(msgs)        # mutate the span; it is written on exit
        t.finish(status="ok", answer="42")              # or t.answer = ...; t.status = ...

The current trace and span live in contextvars, so they follow `await`s and are copied into
asyncio tasks created inside them: many episodes can run at once in one event loop, each span
getting the right parent. `with` works the same in threads and plain code.

Writes are cheap for the episode: finished spans go on a queue that a background thread writes
in batches (one transaction each). The end of a trace waits until everything of that trace is
committed (without blocking the event loop), so a trace that has ended is on disk. `flush()`
waits for the queue; an atexit hook flushes too. `Tracer(None)` (or `Tracer.disabled()`)
records nothing and costs next to nothing.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import functools
import inspect
import json
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from traces.schemas import (
    LlmData,
    RetrievalData,
    Span,
    SpanKind,
    ToolData,
    Trace,
    TracesConfig,
    TraceStatus,
    new_id,
    now,
)
from traces.store import TraceStore, TraceStoreError

log = logging.getLogger("selftune.traces")

_BATCH_MAX = 2000  # items per write transaction

_current_trace: contextvars.ContextVar[ActiveTrace | None] = contextvars.ContextVar(
    "selftune_trace", default=None
)
_current_span: contextvars.ContextVar[Span | None] = contextvars.ContextVar(
    "selftune_span", default=None
)


def current_trace_id() -> str | None:
    """The id of the trace being recorded in this context, None outside one."""
    t = _current_trace.get()
    return None if t is None else t.trace.id


def current_span_id() -> str | None:
    """The id of the innermost open span in this context, None outside one."""
    s = _current_span.get()
    return None if s is None else s.id


class SpanSink(Protocol):
    """Something that also receives what is written (the OTLP exporter). Called on the writer
    thread after each batch is stored, so a slow sink never slows an episode."""

    def on_write(self, traces: Sequence[Trace], spans: Sequence[Span]) -> None: ...

    def shutdown(self) -> None: ...


# --- the background writer -------------------------------------------------------------------


class _Writer:
    """One thread that writes queued traces and spans in batches and then feeds the sinks."""

    def __init__(self, store: TraceStore | None, sinks: Sequence[SpanSink]):
        self.store = store
        self.sinks = list(sinks)
        self.queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.error: TraceStoreError | None = None
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self._run, name="selftune-trace-writer", daemon=True)
        self.thread.start()
        _writers.add(self)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            batch = [item]
            while len(batch) < _BATCH_MAX:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            traces = [x for k, x in batch if k == "trace"]
            spans = [x for k, x in batch if k == "span"]
            err = None
            if (traces or spans) and self.store is not None:
                try:
                    self.store.write(traces, spans)
                except TraceStoreError as e:
                    err = self.error = e
                    log.error("trace write failed, %d spans lost: %s", len(spans), e)
                except Exception as e:  # noqa: BLE001 - the writer thread must survive anything
                    err = self.error = TraceStoreError(f"trace write failed: {e!r}")
                    log.exception("trace write failed")
            if traces or spans:
                for sink in self.sinks:
                    try:
                        sink.on_write(traces, spans)
                    except Exception:  # noqa: BLE001 - a broken exporter must not stop storage
                        log.exception("trace sink %r failed", sink)
            for kind, x in batch:
                if kind == "flush":
                    x(err)
            if any(k == "stop" for k, _ in batch):
                return

    def put(self, kind: str, item: Any) -> None:
        self.queue.put((kind, item))

    def flush(self, timeout: float | None = None) -> TraceStoreError | None:
        """Wait until everything queued so far is written; the error of the last batch, if any."""
        if not self.thread.is_alive():
            return self.error
        done = threading.Event()
        box: list[TraceStoreError | None] = [None]

        def release(err: TraceStoreError | None) -> None:
            box[0] = err
            done.set()

        self.put("flush", release)
        done.wait(timeout)
        return box[0]

    async def aflush(self) -> TraceStoreError | None:
        """`flush` for coroutines: the event loop keeps running while the batch is written."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[TraceStoreError | None] = loop.create_future()

        def release(err: TraceStoreError | None) -> None:
            def settle() -> None:
                if not fut.done():
                    fut.set_result(err)

            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop closed meanwhile; nobody is waiting
                pass

        self.put("flush", release)
        return await fut

    def stop(self) -> None:
        if self.thread.is_alive():
            self.put("stop", None)
            self.thread.join()
        for sink in self.sinks:
            try:
                sink.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("trace sink %r failed to shut down", sink)


_writers: weakref.WeakSet[_Writer] = weakref.WeakSet()


@atexit.register
def _flush_all_at_exit() -> None:
    for w in list(_writers):
        w.stop()


# --- recording handles -----------------------------------------------------------------------


class ActiveTrace:
    """The trace being recorded: read and set its fields (`t.answer = "42"`, `t.status`,
    `t.metadata[...]`, `t.tags`) or call `finish`. The underlying schema is `t.trace`."""

    __slots__ = ("trace",)

    def __init__(self, trace: Trace):
        object.__setattr__(self, "trace", trace)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trace, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.trace, name, value)

    def finish(
        self, status: TraceStatus = "ok", answer: str | None = None, error: str | None = None
    ) -> None:
        """Set the outcome; the trace is written when its `with` block ends."""
        self.trace.status = status
        if answer is not None:
            self.trace.answer = answer
        if error is not None:
            self.trace.error = error

    def __repr__(self) -> str:
        return f"ActiveTrace({self.trace.id}, status={self.trace.status})"


def _describe(exc: BaseException) -> str:
    msg = str(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class _TraceScope:
    """`with`/`async with` of `Tracer.trace`."""

    def __init__(self, tracer: Tracer, trace: Trace):
        self.tracer = tracer
        self.active = ActiveTrace(trace)
        self._tokens: tuple[contextvars.Token, contextvars.Token] | None = None

    def _enter(self) -> ActiveTrace:
        self._tokens = (_current_trace.set(self.active), _current_span.set(None))
        self.tracer._put("trace", self.active.trace.model_copy())
        return self.active

    def _exit(self, exc: BaseException | None) -> None:
        t = self.active.trace
        t.end = now()
        if exc is not None:
            if t.status in ("running", "ok"):
                t.status = "error"
            t.error = t.error or _describe(exc)
        elif t.status == "running":
            t.status = "ok"
        assert self._tokens is not None
        _current_span.reset(self._tokens[1])
        _current_trace.reset(self._tokens[0])
        self.tracer._put("trace", t.model_copy())

    def __enter__(self) -> ActiveTrace:
        return self._enter()

    def __exit__(self, et: type | None, exc: BaseException | None, tb: Any) -> None:
        self._exit(exc)
        err = self.tracer._wait_written()
        if err is not None and exc is None:
            raise err

    async def __aenter__(self) -> ActiveTrace:
        return self._enter()

    async def __aexit__(self, et: type | None, exc: BaseException | None, tb: Any) -> None:
        self._exit(exc)
        err = await self.tracer._await_written()
        if err is not None and exc is None:
            raise err


class _SpanScope:
    """`with`/`async with` of `Tracer.span`; yields the `Span` itself, to be mutated."""

    def __init__(self, tracer: Tracer, span: Span, recorded: bool):
        self.tracer = tracer
        self.span = span
        self.recorded = recorded
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Span:
        self._token = _current_span.set(self.span)
        return self.span

    def __exit__(self, et: type | None, exc: BaseException | None, tb: Any) -> None:
        s = self.span
        s.end = now()
        if exc is not None:
            s.status = "error"
            s.error = s.error or _describe(exc)
            if s.tool is not None and s.tool.error is None:
                s.tool.error = s.error
        elif s.status == "running":
            s.status = "ok"
        assert self._token is not None
        _current_span.reset(self._token)
        if self.recorded:
            self.tracer._put("span", s)

    async def __aenter__(self) -> Span:
        return self.__enter__()

    async def __aexit__(self, et: type | None, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(et, exc, tb)


def _jsonable(v: Any, limit: int = 4000) -> Any:
    """`v` if it is JSON-serialisable, else its (trimmed) repr."""
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        r = repr(v)
        return r if len(r) <= limit else r[:limit] + "..."


# --- the tracer ------------------------------------------------------------------------------


class Tracer:
    """Records episodes (traces) and their steps (spans) into a TraceStore and any sinks.

    `Tracer(None)` with no sinks is the no-op tracer: the same API, nothing recorded.
    The writer thread is started on first use; call `close()` (or rely on atexit) at the end.
    """

    def __init__(self, store: TraceStore | None, sinks: Sequence[SpanSink] = ()):
        self.store = store
        self.sinks = list(sinks)
        self.enabled = store is not None or bool(self.sinks)
        self._writer: _Writer | None = None
        self._writer_lock = threading.Lock()

    @classmethod
    def disabled(cls) -> Tracer:
        """A tracer that records nothing (tracing off)."""
        return cls(None)

    # -- plumbing ----------------------------------------------------------------------------

    def _get_writer(self) -> _Writer:
        w = self._writer
        if w is None or w.pid != os.getpid():  # a forked child needs its own thread
            with self._writer_lock:
                if self._writer is None or self._writer.pid != os.getpid():
                    self._writer = _Writer(self.store, self.sinks)
                w = self._writer
        return w

    def _put(self, kind: str, item: Any) -> None:
        if self.enabled:
            self._get_writer().put(kind, item)

    def _wait_written(self) -> TraceStoreError | None:
        return self._get_writer().flush() if self.enabled else None

    async def _await_written(self) -> TraceStoreError | None:
        return await self._get_writer().aflush() if self.enabled else None

    # -- public API --------------------------------------------------------------------------

    def trace(
        self,
        env: str | None = None,
        task_id: str | None = None,
        model: str | None = None,
        adapter: str | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
        trace_id: str | None = None,
    ) -> _TraceScope:
        """Record one episode: `with`/`async with tracer.trace(...) as t:`.

        The trace row is written (status running) on entry. On exit it ends `ok` unless a status
        was set; an exception leaving the block makes it `error` (keeping a status such as
        `timeout` set before) with the exception as its error. Exit returns once the trace and
        its spans are committed; a failed write (e.g. a full disk) raises TraceStoreError then.
        """
        t = Trace(
            env=env, task_id=task_id, model=model, adapter=adapter, tags=list(tags),
            metadata=dict(metadata or {}),
        )  # fmt: skip
        if trace_id is not None:
            t.id = trace_id
        return _TraceScope(self, t)

    def span(
        self,
        kind: SpanKind,
        name: str,
        *,
        llm: LlmData | None = None,
        tool: ToolData | None = None,
        retrieval: RetrievalData | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> _SpanScope:
        """Record one step inside the current trace: `with tracer.span("tool", "add") as s:`.

        Its parent is the innermost open span of this context. The block gets the `Span`;
        change it freely (`s.llm.completion = ...`); it is queued for writing on exit, `error`
        with the exception's message if one leaves the block, else `ok`. Outside any trace the
        span is not recorded (so traced helpers also work outside episodes).
        """
        t = _current_trace.get()
        parent = _current_span.get()
        s = Span.model_construct(
            id=new_id(),
            trace_id=t.trace.id if t is not None else "",
            parent_id=parent.id if parent is not None else None,
            kind=kind, name=name, start=now(), end=None, status="running", error=None,
            attributes=dict(attributes or {}), llm=llm, tool=tool, retrieval=retrieval,
        )  # fmt: skip
        return _SpanScope(self, s, recorded=t is not None and self.enabled)

    def traced(
        self, kind: SpanKind = "tool", name: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator recording each call of a sync or async function as a span.

        For `kind="tool"` the span's ToolData holds the arguments and the result (as text) or
        the error; for other kinds they go to `attributes["arguments"]` / `["result"]`.
        """

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            span_name = name or fn.__name__
            sig = inspect.signature(fn)

            def open_span(args: tuple, kwargs: dict) -> _SpanScope:
                try:
                    bound = sig.bind_partial(*args, **kwargs).arguments
                except TypeError:
                    bound = {"args": list(args), **kwargs}
                arguments = {k: _jsonable(v) for k, v in bound.items() if k not in ("self", "cls")}
                if kind == "tool":
                    return self.span(
                        kind, span_name, tool=ToolData(name=span_name, arguments=arguments)
                    )
                return self.span(kind, span_name, attributes={"arguments": arguments})

            def record(s: Span, result: Any) -> None:
                if s.tool is not None:
                    s.tool.result = (
                        result
                        if isinstance(result, str)
                        else json.dumps(_jsonable(result), ensure_ascii=False)
                    )
                else:
                    s.attributes["result"] = _jsonable(result)

            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    with open_span(args, kwargs) as s:
                        result = await fn(*args, **kwargs)
                        record(s, result)
                        return result

                return async_wrapper

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with open_span(args, kwargs) as s:
                    result = fn(*args, **kwargs)
                    record(s, result)
                    return result

            return wrapper

        return decorate

    def current_trace_id(self) -> str | None:
        """The id of the trace being recorded in this context, None outside one."""
        return current_trace_id()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything recorded so far is written; raise the last write error."""
        if self.enabled and self._writer is not None:
            err = self._writer.flush(timeout)
            if err is not None:
                raise err

    def close(self) -> None:
        """Write what is queued, stop the writer thread and shut the sinks down."""
        if self._writer is not None:
            self._writer.stop()
            self._writer = None

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tracer_from_config(cfg: TracesConfig, default_db: str | Path) -> Tracer:
    """A Tracer writing to `[traces] db` (else `default_db`), also exporting over OTLP/HTTP when
    `[traces] otlp_endpoint` or OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    from traces.otel import otlp_sink_from_config

    store = TraceStore(cfg.db or default_db)
    sink = otlp_sink_from_config(cfg)
    return Tracer(store, [sink] if sink is not None else [])
