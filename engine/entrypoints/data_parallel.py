"""Data-parallel serving: N engine replicas behind one API server.

``engine serve --data-parallel-size N [--data-parallel-backend mp|ray]`` builds N
engines, each with its own workers (``mp``: in this process or, with tensor
parallelism, local worker processes; ``ray``: Ray actors anywhere in the Ray
cluster). Each replica is an `AsyncEngine` with its own step thread;
`DataParallelEngine` puts them behind the `AsyncEngine` surface the routes use,
sending each request to the ready replica with the fewest requests in flight.

When a replica fails after start (a worker died), its in-flight requests end
with an error naming the replica, ``/health`` answers 503 naming it, and new
requests go to the replicas still serving; the server exits only when no
replica is left. `/metrics` labels every series with ``engine="i"``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from engine.entrypoints.async_engine import AsyncEngine, EngineUnavailableError

logger = logging.getLogger("engine.serve")

DATA_PARALLEL_BACKENDS = ("mp", "ray")


class _ReplicaStream:
    """A replica's `RequestStream` that keeps its replica's in-flight count and
    names the replica when the replica fails under it."""

    def __init__(self, stream: Any, replica: int, done: Callable[[int], None]) -> None:
        self._stream = stream
        self.replica = replica
        self.request_id = stream.request_id
        # counted out once: on finish, error, abort, or when dropped unfinished
        self._release = weakref.finalize(self, done, replica)

    @property
    def finished(self) -> bool:
        return self._stream.finished

    def __aiter__(self) -> _ReplicaStream:
        return self

    async def __anext__(self) -> Any:
        try:
            out = await self._stream.__anext__()
        except EngineUnavailableError as exc:
            self._release()
            raise self._named(exc) from exc
        except BaseException:
            self._release()
            raise
        if out.finished:
            self._release()
        return out

    def take_ready(self) -> list[Any]:
        try:
            ready = self._stream.take_ready()
        except EngineUnavailableError as exc:
            self._release()
            raise self._named(exc) from exc
        if self._stream.finished:
            self._release()
        return ready

    def abort(self) -> None:
        self._stream.abort()
        self._release()

    def _named(self, exc: EngineUnavailableError) -> EngineUnavailableError:
        return EngineUnavailableError(exc.state, f"data-parallel replica {self.replica}: {exc}")


class DataParallelEngine:
    """`AsyncEngine`'s surface over several `AsyncEngine` replicas.

    `replicas[i]` is replica i; `routed[i]` counts the requests (generation and
    embedding calls) sent to it; `in_flight[i]` is what it runs now.
    """

    def __init__(self, builds: list[Callable[[], Any]]) -> None:
        if len(builds) < 1:
            raise ValueError("a data-parallel engine needs at least one replica")
        # replicas build one after another: plugin loading and platform set-up
        # are process-wide and not meant to run twice at once
        build_lock = threading.Lock()

        def serialized(build: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                with build_lock:
                    return build()
            return run

        self.replicas = [AsyncEngine(serialized(b)) for b in builds]
        self.routed = [0] * len(builds)
        self.in_flight = [0] * len(builds)
        self._stopping = False
        self._on_state: Callable[[str], None] | None = None
        self._reported: str | None = None

    @classmethod
    def from_settings(cls, settings: Any, build_llm: Callable[[Any], Callable[[], Any]]
                      ) -> DataParallelEngine:
        """`settings.data_parallel_size` replicas of the engine `settings.engine_args`
        describes, each run by `settings.data_parallel_backend` (default: the
        engine's own ``distributed_executor_backend``); ``build_llm(s)``
        makes the factory of one replica from its settings."""
        backend = (settings.data_parallel_backend
                   or settings.engine_args.distributed_executor_backend)
        if backend not in DATA_PARALLEL_BACKENDS:
            raise ValueError(f"data_parallel_backend must be one of "
                             f"{', '.join(DATA_PARALLEL_BACKENDS)}, got {backend!r}")
        engine_args = dataclasses.replace(settings.engine_args,
                                          distributed_executor_backend=backend)
        replica_settings = dataclasses.replace(settings, engine_args=engine_args)
        return cls([build_llm(replica_settings) for _ in range(settings.data_parallel_size)])

    # ------------------------------------------------------------ lifecycle

    def start(self, on_state_change: Callable[[str], None] | None = None) -> None:
        """Start every replica (call from the event loop). `on_state_change` hears
        ``ready`` once all replicas are ready, ``failed`` when one fails to start
        or the last one serving fails, and ``stopped``."""
        self._on_state = on_state_change
        for i, replica in enumerate(self.replicas):
            replica.start(lambda state, i=i: self._replica_state_changed(i, state))

    async def shutdown(self) -> None:
        self._stopping = True
        await asyncio.gather(*(r.shutdown() for r in self.replicas))

    def _replica_state_changed(self, index: int, state: str) -> None:
        replica = self.replicas[index]
        if state == "failed":
            when = replica.failure_context or "while starting"
            logger.error("data-parallel replica %d failed %s: %s", index, when, replica.error)
        report = None
        if state == "ready" and all(r.ready for r in self.replicas):
            report = "ready"
        elif state == "failed" and (replica.ready_at is None or not self._serving()):
            report = "failed"  # a replica that cannot start, or none left serving
        elif state == "stopped" and all(r.state == "stopped" for r in self.replicas):
            report = "stopped"
        if report is not None and report != self._reported:
            self._reported = report
            if self._on_state is not None:
                self._on_state(report)

    def _serving(self) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if r.ready]

    # ------------------------------------------------------------ state

    @property
    def state(self) -> str:
        """``ready`` when every replica is; else ``failed`` when one has failed,
        ``starting`` while one starts, ``stopped`` after shutdown."""
        states = [r.state for r in self.replicas]
        if all(s == "ready" for s in states):
            return "ready"
        if "failed" in states:
            return "failed"
        if "starting" in states:
            return "starting"
        return "stopped"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def error(self) -> BaseException | None:
        """The first failed replica's error, naming the replica."""
        for i, r in enumerate(self.replicas):
            if r.state == "failed" and r.error is not None:
                return RuntimeError(f"data-parallel replica {i} failed: "
                                    f"{type(r.error).__name__}: {r.error}")
        return None

    @property
    def failure_context(self) -> str | None:
        for i, r in enumerate(self.replicas):
            if r.state == "failed" and r.failure_context is not None:
                return f"(replica {i}) {r.failure_context}"
        return None

    @property
    def ready_at(self) -> float | None:
        times = [r.ready_at for r in self.replicas]
        return None if None in times else max(times)

    def check_ready(self) -> None:
        """Raise `EngineUnavailableError` unless some replica can serve now."""
        if self._stopping:
            raise EngineUnavailableError("stopped", "the server is shutting down")
        if self._serving():
            return
        if any(r.state == "starting" for r in self.replicas):
            raise EngineUnavailableError("starting", "the server is starting; retry shortly")
        if any(r.state == "failed" for r in self.replicas):
            raise EngineUnavailableError("failed", f"every replica failed: {self.error}")
        raise EngineUnavailableError("stopped", "the server is shutting down")

    # ------------------------------------------------------------ routing

    def _pick(self) -> int:
        """The serving replica with the fewest requests in flight; on a tie the one
        that got the fewest so far, so sequential traffic alternates too."""
        self.check_ready()
        return min(self._serving(), key=lambda i: (self.in_flight[i], self.routed[i], i))

    def _done(self, replica: int) -> None:
        self.in_flight[replica] -= 1

    async def add_request(self, prompt: str | list[int], params: Any,
                          request_id: str | None = None) -> _ReplicaStream:
        """Queue a generation request on the least busy replica; returns its stream
        (see `AsyncEngine.add_request`)."""
        index = self._pick()
        self.routed[index] += 1
        self.in_flight[index] += 1
        try:
            stream = await self.replicas[index].add_request(prompt, params, request_id)
        except BaseException:
            self.in_flight[index] -= 1
            raise
        return _ReplicaStream(stream, index, self._done)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(llm)`` on the least busy replica (embeddings, pooling)."""
        index = self._pick()
        self.routed[index] += 1
        self.in_flight[index] += 1
        try:
            return await self.replicas[index].call(fn)
        finally:
            self.in_flight[index] -= 1

    async def call_all(self, fn: Callable[[Any], Any]) -> list[Any]:
        """Run ``fn(llm)`` on every replica (sleep mode); results in replica order."""
        return [await replica.call(fn) for replica in self.replicas]

    def abort(self, request_id: str) -> None:
        """Abort `request_id` wherever it runs (unknown ids are ignored)."""
        for replica in self.replicas:
            replica.abort(request_id)

    def abort_all(self, message: str) -> None:
        for replica in self.replicas:
            replica.abort_all(message)

    async def check_health(self) -> None:
        """Ask every serving replica's workers whether they are alive. Raises
        naming the first replica that failed (now or before)."""
        serving = self._serving()
        results = await asyncio.gather(*(self.replicas[i].check_health() for i in serving),
                                       return_exceptions=True)
        for i, result in zip(serving, results, strict=True):
            if isinstance(result, Exception) and not isinstance(result, EngineUnavailableError):
                raise RuntimeError(f"data-parallel replica {i} failed: "
                                   f"{type(result).__name__}: {result}") from result
        error = self.error
        if error is not None:
            raise error

    # ------------------------------------------------------------ introspection

    @property
    def _first(self) -> AsyncEngine:
        serving = self._serving()
        return self.replicas[serving[0] if serving else 0]

    @property
    def llm(self) -> Any:
        """A serving replica's `LLM` (every replica serves the same model)."""
        return self._first.llm

    @property
    def engine(self) -> Any:
        """A serving replica's `LLMEngine`; its read-only members (tokenizer,
        config, supported tasks) are the same in every replica."""
        return self._first.engine

    @property
    def kv_cache_usage(self) -> float:
        """The mean KV-cache usage of the serving replicas."""
        serving = self._serving()
        if not serving:
            return 0.0
        return sum(self.replicas[i].kv_cache_usage for i in serving) / len(serving)

    @property
    def num_unfinished_requests(self) -> int:
        return sum(r.num_unfinished_requests for r in self.replicas)

    @property
    def num_aborted(self) -> int:
        return sum(r.num_aborted for r in self.replicas)


# ---------------------------------------------------------------- /metrics


def render_data_parallel_metrics(engine: DataParallelEngine) -> tuple[bytes, str]:
    """Prometheus text of every replica (its stat loggers' series and the server
    gauges), each series labelled ``engine="i"``, plus per-replica routing counters."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(_ReplicaCollector(engine))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _ReplicaCollector:
    """Merges the replicas' metric families, setting the ``engine`` label to the
    replica index (each replica's own engine index is 0)."""

    def __init__(self, engine: DataParallelEngine) -> None:
        self.engine = engine

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        from engine.entrypoints.metrics import _ServerCollector

        merged: dict[str, Metric] = {}
        for i, replica in enumerate(self.engine.replicas):
            sources = [_ServerCollector(replica)]
            llm_engine = getattr(replica.llm, "llm_engine", None)
            own = getattr(getattr(llm_engine, "stat_loggers", None), "prometheus_registry", None)
            if own is not None:
                sources.append(own)
            for source in sources:
                for family in source.collect():
                    target = merged.get(family.name)
                    if target is None:
                        target = merged[family.name] = Metric(
                            family.name, family.documentation, family.type, family.unit)
                    for sample in family.samples:
                        labels = dict(sample.labels, engine=str(i))
                        target.add_sample(sample.name, labels, sample.value,
                                          sample.timestamp, sample.exemplar)
        yield from merged.values()
        routed = CounterMetricFamily(
            "engine_server_data_parallel_requests_routed",
            "Requests (generation and embedding) the server sent to each replica",
            labels=["engine"])
        in_flight = GaugeMetricFamily(
            "engine_server_data_parallel_requests_in_flight",
            "Requests each replica runs now, as the router counts them", labels=["engine"])
        for i in range(len(self.engine.replicas)):
            routed.add_metric([str(i)], self.engine.routed[i])
            in_flight.add_metric([str(i)], self.engine.in_flight[i])
        yield routed
        yield in_flight
