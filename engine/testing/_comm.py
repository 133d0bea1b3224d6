"""Checks of a platform's device communicator: every collective over 2 ranks
(two spawned processes, torch.distributed on 127.0.0.1) against the default
communicator on a gloo group of the same ranks.

Run as ``python -m engine.testing._comm RANK INIT_METHOD PLUGIN OUT_FILE`` (the
kit starts both ranks); each rank writes ``{collective: problem or null}`` to
OUT_FILE after every collective, so a collective that hangs is still named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.testing._core import Check, CheckFailed, KitContext

WORLD_SIZE = 2
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "gather", "broadcast",
               "send_recv", "destroy")
TIMEOUT_S = 180
TOLERANCE = 1e-5  # float32 sums of two values: rounding only


def communicator_checks(ctx: KitContext, name: str, prefix: str) -> list[Check]:
    """One check per collective of the platform's device communicator."""
    return [Check(f"{prefix}communicator[{c}]",
                  lambda c=c: check_collective(ctx, name, c),
                  f"the device communicator's {c} over {WORLD_SIZE} ranks vs gloo")
            for c in COLLECTIVES]


def check_collective(ctx: KitContext, name: str, collective: str) -> None:
    """Fail when either rank saw `collective` differ from gloo (or never got to it)."""
    from engine.testing._setup import platform_cls

    platform_cls(ctx, name)  # skipped when the detector failed
    ranks = ctx.memo(("communicator", name), lambda: run_ranks(name))
    for rank, results in enumerate(ranks):
        if collective not in results:
            raise CheckFailed(f"rank {rank} did not get to {collective}: "
                              f"{results.get('_error', 'no result')}")
        if results[collective]:
            raise CheckFailed(f"rank {rank}: {results[collective]}")


def run_ranks(name: str) -> list[dict[str, Any]]:
    """Start both ranks, wait for them (bounded), return each rank's results."""
    from engine.executor.multiproc import _free_port

    init_method = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ, ENGINE_PLATFORM=name, OMP_NUM_THREADS="1")
    # the child must import this very engine, wherever it came from
    engine_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (engine_root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="engine-kit-comm-") as tmp:
        outs = [Path(tmp, f"rank{r}.json") for r in range(WORLD_SIZE)]
        procs = [subprocess.Popen(
            [sys.executable, "-m", "engine.testing._comm", str(r), init_method, name, str(outs[r])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(WORLD_SIZE)]
        logs = []
        for proc in procs:
            try:
                logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                logs.append(proc.communicate()[0] + f"\n(timed out after {TIMEOUT_S} s)")
        results = []
        for rank, (proc, out, log) in enumerate(zip(procs, outs, logs, strict=True)):
            data = json.loads(out.read_text()) if out.exists() else {}
            if proc.returncode != 0 and "_error" not in data:
                tail = " | ".join(log.strip().splitlines()[-3:])
                data["_error"] = f"rank {rank} exited with code {proc.returncode}: {tail}"
            results.append(data)
    return results


# ---------------------------------------------------------------------------
# one rank


def _inputs(rank: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(100 + rank)
    return {name: torch.randn(4, 6, generator=gen) for name in COLLECTIVES}


def _diff(what: str, got: Any, expected: Any) -> str | None:
    if got is None or expected is None:
        return None if got is None and expected is None else (
            f"{what}: returned {'None' if got is None else 'a tensor'}, gloo "
            f"{'None' if expected is None else 'a tensor'}")
    got = got.detach().float().cpu()
    if tuple(got.shape) != tuple(expected.shape):
        return f"{what}: shape {tuple(got.shape)}, gloo {tuple(expected.shape)}"
    diff = float((got - expected.float()).abs().max()) if got.numel() else 0.0
    if not diff <= TOLERANCE:
        return f"{what}: max |diff| {diff:.3g} vs gloo (tolerance {TOLERANCE:g})"
    return None


def _rank_main(rank: int, init_method: str, name: str, out_file: str) -> None:
    import torch
    import torch.distributed as dist

    import registry
    from engine.distributed import DeviceCommunicatorBase, init_distributed_environment
    from engine.platforms import current_platform

    results: dict[str, Any] = {}
    out = Path(out_file)

    def save() -> None:
        out.write_text(json.dumps(results))

    try:
        registry.load_general_plugins()
        current_platform.import_kernels()
        init_distributed_environment(WORLD_SIZE, rank, init_method,
                                     backend=current_platform.get_default_dist_backend())
        device = current_platform.device_for_rank(rank)
        current_platform.set_device(device)
        comm_cls = registry.resolve_qualname(current_platform.get_device_communicator_cls())
        comm = comm_cls(group=dist.group.WORLD, device=device, unique_name="tp")
        reference = DeviceCommunicatorBase(group=dist.new_group(backend="gloo"),
                                           device=torch.device("cpu"), unique_name="reference")
    except Exception as exc:
        results["_error"] = f"rank {rank} setup failed: {type(exc).__name__}: {exc}"
        save()
        raise
    mine = _inputs(rank)
    peer = _inputs(1 - rank)

    def on_device(t: Any) -> Any:
        return t.to(device).clone()

    def run(collective: str, func: Any) -> None:
        try:
            results[collective] = func()
        except Exception as exc:
            results[collective] = f"{collective} raised {type(exc).__name__}: {exc}"
        save()

    x = mine["all_reduce"]
    run("all_reduce", lambda: _diff("all_reduce", comm.all_reduce(on_device(x)),
                                    reference.all_reduce(x.clone())))
    x = mine["all_gather"]
    run("all_gather", lambda: _diff("all_gather(dim=-1)", comm.all_gather(on_device(x), -1),
                                    reference.all_gather(x.clone(), -1))
        or _diff("all_gather(dim=0)", comm.all_gather(on_device(x), 0),
                 reference.all_gather(x.clone(), 0)))
    x = mine["reduce_scatter"]
    run("reduce_scatter", lambda: _diff("reduce_scatter(dim=-1)",
                                        comm.reduce_scatter(on_device(x), -1),
                                        reference.reduce_scatter(x.clone(), -1)))
    x = mine["gather"]
    run("gather", lambda: _diff("gather(dst=1)", comm.gather(on_device(x), 1, -1),
                                reference.gather(x.clone(), 1, -1)))
    x = mine["broadcast"]
    run("broadcast", lambda: _diff("broadcast(src=1)", comm.broadcast(on_device(x), 1),
                                   reference.broadcast(x.clone(), 1)))

    def send_recv() -> str | None:
        # rank 0 sends first, then receives; rank 1 the other way round
        x = mine["send_recv"]
        for turn in range(2):
            if turn == rank:
                comm.send(on_device(x), 1 - rank)
            else:
                got = comm.recv(x.shape, x.dtype, 1 - rank)
                problem = _diff(f"recv from rank {1 - rank}", got, peer["send_recv"])
                if problem:
                    return problem
        return None

    run("send_recv", send_recv)
    run("destroy", lambda: comm.destroy())
    dist.barrier(group=reference.group)
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
