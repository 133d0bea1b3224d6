"""`RayExecutor`: one Ray actor per tensor-parallel rank, anywhere in a Ray cluster.

The executor joins the Ray cluster named by ``RAY_ADDRESS`` (or starts a private
local one), reserves one bundle per rank in a placement group (strategy SPREAD:
one rank per node while there are enough nodes, packed otherwise), and starts a
`RayWorkerWrapper` actor in each bundle. Rank 0's actor picks a free port on its
node; every rank then joins torch.distributed at ``tcp://<rank 0's node>:<port>``
(gloo on CPU, NCCL on CUDA), so tensors go between the actors directly and only
RPC arguments and rank 0's sampled tokens travel through Ray.

Each actor gets the driver's ``ENGINE_*`` variables (plugin dirs, plugin
settings, platform choice), runs the general plugins, and replays the driver's
model and load-format registrations before it builds its worker, so a model or
load format registered in the user's script, or by a plugin, is known to every rank.

A dead actor (killed, crashed, node lost) fails the engine at once with
`RayWorkerError` naming the rank and the node; the other actors are killed and
the placement group removed, also on `shutdown()` and at interpreter exit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from engine.executor import ExecutorBase, build_worker, call_worker, rpc_name
from engine.executor.multiproc import WorkerProcessError
from engine.step import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("engine.executor")

# how long the cluster gets to find room for the placement group
PLACEMENT_TIMEOUT_S = 120.0
# after one rank reports an error, how long the others get to answer
ERROR_GRACE_S = 10.0
# variables besides ENGINE_* that every actor gets from the driver: where
# Python finds modules, and the offline switches of the Hugging Face libraries
_FORWARDED_ENV = ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                  "TOKENIZERS_PARALLELISM", "HF_HOME")

RAY_MISSING = (
    "distributed_executor_backend='ray' needs Ray, which is not installed: "
    "pip install 'engine[ray]' (or pip install ray)"
)


class RayWorkerError(WorkerProcessError):
    """A rank's Ray actor died or could not start. `.rank` is the rank, `.node`
    the address of the node it ran on (None when it never got one)."""

    def __init__(self, message: str, rank: int, node: str | None = None,
                 remote_traceback: str | None = None) -> None:
        super().__init__(message, rank=rank, remote_traceback=remote_traceback)
        self.node = node


def import_ray() -> Any:
    """The `ray` module, or ImportError saying what to install."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(RAY_MISSING) from exc
    return ray


def forwarded_env() -> dict[str, str]:
    """The driver's environment variables every actor gets: ``ENGINE_*`` and the few
    in `_FORWARDED_ENV`."""
    return {k: v for k, v in os.environ.items()
            if k.startswith("ENGINE_") or k in _FORWARDED_ENV}


# --------------------------------------------------------------------------
# actor side


class RayWorkerWrapper:
    """Hosts one rank's worker inside a Ray actor; the executor calls it remotely."""

    def __init__(self) -> None:
        self.worker: Any = None
        self.rank: int | None = None

    def node_info(self) -> dict[str, Any]:
        """Where this actor runs: node address, node id, pid, accelerator ids."""
        import ray

        context = ray.get_runtime_context()
        return {
            "ip": ray.util.get_node_ip_address(),
            "node_id": context.get_node_id(),
            "pid": os.getpid(),
            "accelerator_ids": context.get_accelerator_ids(),
        }

    def free_port(self) -> int:
        """A TCP port free on this node, for the torch.distributed rendezvous."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def init_worker(self, config: Any, rank: int, local_rank: int, init_method: str,
                    registrations: dict[str, Any]) -> None:
        """Load the general plugins, replay the driver's model and load-format
        registrations (`engine.models.registry.registrations_for_workers`), then
        build the worker of `config.parallel_config.worker_cls` for `rank`."""
        import torch

        import registry
        from engine.models.registry import apply_worker_registrations

        torch.set_num_threads(1)
        missing = [d for d in registry.plugin_dirs() if not os.path.isdir(d)]
        if missing:
            raise FileNotFoundError(
                f"plugin dirs {missing} (from ENGINE_PLUGIN_DIRS) do not exist on node "
                f"{self.node_info()['ip']}: every node of the Ray cluster needs them at the "
                "same path"
            )
        # general plugins first (they may register what the worker class needs),
        # then what the user's script registered before building the engine
        registry.load_general_plugins()
        apply_worker_registrations(registrations)
        self.rank = rank
        self.worker = build_worker(config, rank=rank, local_rank=local_rank,
                                   distributed_init_method=init_method)

    def execute(self, method: str | Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                reply: bool) -> Any:
        """``worker.method(*args, **kwargs)`` (or ``method(worker, ...)`` for a
        function); the result when `reply`, else None."""
        result = call_worker(self.worker, method, args, kwargs)
        return result if reply else None

    def shutdown_worker(self) -> None:
        if self.worker is not None:
            worker, self.worker = self.worker, None
            worker.shutdown()


# --------------------------------------------------------------------------
# driver side


@dataclass
class _RankActor:
    rank: int
    actor: Any  # ray.actor.ActorHandle
    ip: str | None = None
    node_id: str | None = None
    pid: int | None = None

    @property
    def where(self) -> str:
        if self.ip is None:
            return "an unknown node"
        return f"node {self.ip}, node id {self.node_id[:12]}, pid {self.pid}"


# Ray connections of this process: several executors (data-parallel replicas)
# share one, and the last to stop leaves a Ray instance an executor started
_ray_lock = threading.Lock()
_ray_users = 0
_ray_started_here = False


def _join_ray(ray: Any, world_size: int) -> None:
    """Connect to ``RAY_ADDRESS``, or start a private local Ray instance, unless
    this process is connected already (then that connection is used)."""
    global _ray_users, _ray_started_here
    with _ray_lock:
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS") or None
            if address is None:
                # a CPU per rank even on small machines
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, world_size),
                         include_dashboard=False, log_to_driver=True)
            else:
                try:
                    ray.init(address=address, log_to_driver=True)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise ConnectionError(
                        f"cannot join the Ray cluster at RAY_ADDRESS={address!r}: {exc}. Start "
                        "one with `ray start --head`, or unset RAY_ADDRESS for a local one"
                    ) from exc
            _ray_started_here = True
        _ray_users += 1


def _leave_ray(ray: Any) -> None:
    global _ray_users, _ray_started_here
    with _ray_lock:
        _ray_users -= 1
        if _ray_users == 0 and _ray_started_here:
            _ray_started_here = False
            if ray.is_initialized():
                ray.shutdown()


def _stop_actors(ray: Any, actors: list[_RankActor], pg_holder: list[Any],
                 graceful: bool) -> None:
    """Shut the workers down (politely when `graceful`), kill every actor, remove
    the placement group, and leave Ray (see `_leave_ray`)."""
    if not ray.is_initialized():
        actors.clear()
        pg_holder.clear()
        _leave_ray(ray)
        return
    if graceful and actors:
        refs = [a.actor.shutdown_worker.remote() for a in actors]
        ray.wait(refs, num_returns=len(refs), timeout=5.0)
    for a in actors:
        try:
            ray.kill(a.actor, no_restart=True)
        except Exception:  # already gone
            pass
    actors.clear()
    for pg in pg_holder:
        try:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)
        except Exception:
            pass
    pg_holder.clear()
    _leave_ray(ray)


class RayExecutor(ExecutorBase):
    """Runs `config.parallel_config.tensor_parallel_size` workers as Ray actors,
    one per placement-group bundle, joined in one torch.distributed group."""

    def _init_executor(self) -> None:
        ray = import_ray()
        self._ray = ray
        config = self.config
        world_size = config.parallel_config.tensor_parallel_size
        self.world_size = world_size
        _join_ray(ray, world_size)
        self._actors: list[_RankActor] = []
        self._pg: list[Any] = []
        self._failure: str | None = None
        self._finalizer = weakref.finalize(self, _stop_actors, ray, self._actors, self._pg,
                                           False)
        try:
            self._start_actors()
        except BaseException:
            self._fail("startup did not complete")
            raise
        logger.info("started %d Ray worker actors: %s", world_size,
                    "; ".join(f"rank {a.rank} on {a.where}" for a in self._actors))

    def _bundle(self) -> dict[str, float]:
        from engine.platforms import current_platform

        key = getattr(current_platform, "ray_device_key", None)
        if key is None:
            key = "GPU" if current_platform.device_type == "cuda" else "CPU"
        return {key: 1.0}

    def _start_actors(self) -> None:
        ray = self._ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self._bundle()
        pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="SPREAD")
        self._pg.append(pg)
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise RuntimeError(
                f"the Ray cluster has no room for {self.world_size} workers of {bundle} each "
                f"after {PLACEMENT_TIMEOUT_S:.0f}s (cluster resources: "
                f"{ray.cluster_resources()}, available: {ray.available_resources()})"
            )
        num_gpus = bundle.get("GPU", 0.0)
        remote_cls = ray.remote(RayWorkerWrapper)
        env = forwarded_env()
        for rank in range(self.world_size):
            actor = remote_cls.options(
                name=None,
                num_cpus=bundle.get("CPU", 0.0),
                num_gpus=num_gpus,
                resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank),
                runtime_env={"env_vars": env},
            ).remote()
            self._actors.append(_RankActor(rank, actor))
        infos = self._gather([(a, a.actor.node_info.remote()) for a in self._actors], "startup")
        for a, info in zip(self._actors, infos, strict=True):
            a.ip, a.node_id, a.pid = info["ip"], info["node_id"], info["pid"]
        master = self._actors[0]
        port = self._gather([(master, master.actor.free_port.remote())], "startup")[0]
        init_method = f"tcp://{master.ip}:{port}"
        self.distributed_init_method = init_method
        # the rank among the actors of its node; with one accelerator per actor
        # Ray makes it device 0 of that actor
        seen: dict[str, int] = {}
        from engine.models.registry import registrations_for_workers

        # a class no rank could import fails here, naming it, before anything
        # starts; one from the user's script travels by value (an actor's
        # __main__ is Ray's program, not the script)
        registrations = ray.put(registrations_for_workers(
            self.config.model_config.hf_config.get("architectures"), script_classes_by_value=True))
        refs = []
        for a in self._actors:
            local_rank = seen.get(a.node_id, 0)
            seen[a.node_id] = local_rank + 1
            if num_gpus:
                local_rank = 0
            refs.append((a, a.actor.init_worker.remote(
                self.config, a.rank, local_rank, init_method, registrations)))
        self._gather(refs, "startup")

    # -- RPC --------------------------------------------------------------

    def collective_rpc(self, method: str | Callable[..., Any], args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Call `method` on the worker of every rank and return the results in
        rank order (see `ExecutorBase.collective_rpc`). A worker's exception is
        re-raised here; a dead actor raises `RayWorkerError` and stops the executor."""
        return self._rpc(method, args, kwargs or {}, reply_rank=None)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; only rank 0's output comes back."""
        return self._rpc("execute_model", (scheduler_output,), {}, reply_rank=0)[0]

    def _rpc(self, method: str | Callable[..., Any], args: tuple, kwargs: dict[str, Any],
             reply_rank: int | None) -> list[Any]:
        self._ensure_running()
        name = rpc_name(method)
        refs = [(a, a.actor.execute.remote(method, args, kwargs,
                                           reply_rank is None or a.rank == reply_rank))
                for a in self._actors]
        try:
            return self._gather(refs, name)
        except KeyboardInterrupt:
            self._fail(f"interrupted during {name!r}")
            raise

    def _gather(self, refs: list[tuple[_RankActor, Any]], what: str) -> list[Any]:
        """The results of `refs` in order. A dead actor fails the executor at once;
        after a worker error the other ranks get `ERROR_GRACE_S` to answer and
        the lowest failing rank's error is raised."""
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        by_ref = {ref: (i, a) for i, (a, ref) in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(by_ref)
        errors: dict[int, tuple[_RankActor, BaseException]] = {}
        deadline: float | None = None
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:
                stuck = ", ".join(str(by_ref[r][1].rank) for r in pending)
                first = min(errors)
                self._fail(f"ranks {stuck} did not answer after rank {first} failed")
                self._raise_remote(what, *errors[first])
            for ref in ready:
                i, a = by_ref[ref]
                try:
                    results[i] = ray.get(ref)
                except RayActorError as exc:
                    self._died(a, what, exc)
                except RayTaskError as exc:
                    errors[a.rank] = (a, exc)
                    if deadline is None:
                        deadline = time.monotonic() + ERROR_GRACE_S
        if errors:
            self._raise_remote(what, *errors[min(errors)])
        return results

    def _died(self, a: _RankActor, what: str, exc: BaseException) -> NoReturn:
        cause = str(exc).strip().splitlines()
        message = (
            f"engine worker rank {a.rank} (Ray actor on {a.where}) died during {what!r}; "
            f"the other ranks were stopped. Ray says: {cause[0] if cause else type(exc).__name__}"
        )
        self._fail(message)
        raise RayWorkerError(message, rank=a.rank, node=a.ip) from exc

    def _raise_remote(self, what: str, a: _RankActor, exc: BaseException) -> NoReturn:
        from ray.exceptions import RayTaskError

        text = str(exc)
        cause = exc.cause if isinstance(exc, RayTaskError) else None
        if what == "startup":
            self._fail(f"worker rank {a.rank} failed to start")
            raise RayWorkerError(
                f"engine worker rank {a.rank} (Ray actor on {a.where}) failed to start:\n{text}",
                rank=a.rank, node=a.ip, remote_traceback=text,
            )
        from engine.executor.multiproc import _RemoteTraceback

        if not isinstance(cause, Exception):
            cause = RuntimeError(f"worker rank {a.rank} raised in {what!r}")
        cause.add_note(f"(raised in engine worker rank {a.rank}, Ray actor on {a.where}, "
                       f"during {what!r})")
        raise cause from _RemoteTraceback(text)

    # -- lifecycle --------------------------------------------------------

    def _fail(self, reason: str) -> None:
        """Kill every actor at once: the survivors may be stuck in a collective
        waiting for the lost rank."""
        if self._failure is None:
            self._failure = reason
        self.shutdown()

    def _ensure_running(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"the executor's Ray workers are gone: {self._failure}")
        if not self._finalizer.alive:
            raise RuntimeError("the executor was shut down")

    def check_health(self) -> None:
        """Raise `RayWorkerError` when an actor is gone, or the worker's own error
        when its `check_health` raises."""
        self.collective_rpc("check_health")

    def shutdown(self) -> None:
        """Stop the workers, kill every actor and remove the placement group
        (idempotent; also runs at interpreter exit)."""
        if self._finalizer.alive and self._failure is None:
            # a healthy executor lets each worker release what it holds first
            self._finalizer.detach()
            _stop_actors(self._ray, self._actors, self._pg, True)
        else:
            self._finalizer()

    @property
    def actor_nodes(self) -> list[str | None]:
        """The node address of each rank's actor, in rank order."""
        return [a.ip for a in self._actors]

    @property
    def actor_pids(self) -> list[int | None]:
        """The process id of each rank's actor, in rank order."""
        return [a.pid for a in self._actors]
