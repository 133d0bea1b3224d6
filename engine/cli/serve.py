"""`engine serve`: the OpenAI-compatible HTTP server (see docs/serving.md)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from engine.cli.common import (
    add_model_argument,
    announce_loading,
    announce_out_of_tree_plugins,
    resolve_model_argument,
)
from engine.engine_args import EngineArgs


def add_parser(subparsers: argparse._SubParsersAction, parents: list) -> None:
    """Add the `serve` subcommand to the `engine` parser."""
    p = subparsers.add_parser(
        "serve",
        parents=parents,
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, "
                    "/v1/embeddings, /v1/models, /pooling, /health, /metrics, /v1/plugins.",
    )
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", metavar="KEY", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $ENGINE_API_KEY)")
    p.add_argument("--served-model-name", metavar="NAME", default=None,
                   help="the model name clients send (default: the --model value)")
    p.add_argument("--max-request-bytes", type=int, default=16 * 2**20,
                   metavar="N", help="larger request bodies get 413 (default: 16 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                   help="on SIGTERM, seconds in-flight requests may take to finish before "
                        "they are aborted (default: 10)")
    p.add_argument("--disable-log-stats", action="store_true",
                   help="no stat loggers (and no engine metrics on /metrics)")
    p.add_argument("--enable-route-plugin", action="append", default=[], metavar="NAME",
                   help="mount the api_route plugin NAME under /plugins/NAME/ (repeatable); "
                        "route plugins are off unless named here or in ENGINE_PLUGINS")
    p.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                   help="engine replicas, each with its own workers; each request goes to "
                        "the replica with the fewest in flight (default: 1)")
    p.add_argument("--data-parallel-backend", choices=("mp", "ray"), default=None,
                   help="what runs each replica's workers: 'mp' (this machine) or 'ray' "
                        "(Ray actors; default: --distributed-executor-backend)")
    p.add_argument("--enable-dev-mode", action="store_true",
                   default=os.environ.get("ENGINE_SERVER_DEV_MODE", "") == "1",
                   help="add the development routes POST /sleep, POST /wake_up and GET "
                        "/is_sleeping (sleep mode needs --enable-sleep-mode; default: "
                        "$ENGINE_SERVER_DEV_MODE=1)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="LoRA adapters to serve (with --enable-lora): NAME=PATH or a JSON "
                        "object with 'name' and 'path'; a request's 'model' picks one")
    p.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="mount POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                        "(with --enable-lora; behind --api-key like every route)")
    EngineArgs.add_cli_args(p.add_argument_group("engine options"), exclude=("seed",))
    # many clients sending at once: short prompts get their first tokens first
    p.set_defaults(scheduling_policy="short-prompt-first")
    # a server's cache is paged in while it waits, as vLLM zeroes its own at start: a
    # burst's steps then take no first-touch faults (up to 27 µs a page in a VM whose
    # host took freed memory back; docs/serving.md)
    p.set_defaults(kv_prefault="all")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="sampling seed for requests that send no 'seed' of their own: the "
                        "server started with the same seed answers the same requests in the "
                        "same order the same way (default 0)")
    p.set_defaults(func=run)


# `engine.ops.weight_memory.ENV` (not imported here: it imports torch)
WEIGHT_HUGE_PAGES_ENV = "ENGINE_WEIGHT_HUGE_PAGES"


def server_environment() -> None:
    """What a server sets before it loads the model, where the user has not: model
    weights in transparent huge pages (`engine.ops.weight_memory`). A server lives
    long and decodes small batches at times: a single request's decode took
    0.83-0.89x the time with the weights in huge pages, batched throughput the
    same, for 0-3 s more at load (docs/serving.md, "Weights in huge pages")."""
    os.environ.setdefault(WEIGHT_HUGE_PAGES_ENV, "1")


def run(args: argparse.Namespace) -> int:
    """Load the plugins, check the model and settings, then serve until stopped."""
    server_environment()
    try:
        resolve_model_argument(args, "serve")
        values = _setting_values(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError, TypeError) as exc:
        print(f"engine serve: error: {exc}", file=sys.stderr)
        return 1
    # the port next: a taken one is reported before torch and the model load
    from engine.entrypoints.sockets import listen_or_report

    sock = listen_or_report(args.host, args.port)
    if sock is None:
        return 1
    from engine.entrypoints.api_server import ServerSettings

    settings = ServerSettings(**values)
    try:
        announce_out_of_tree_plugins("serve")
        announce_loading("serve", args.model)
        _load_plugins(args.io_processor_plugin)
        # a broken model or a bad setting fails now, before the server starts (after
        # the plugins, which may add model architectures and load formats)
        settings.engine_args.create_engine_config()
    except (ValueError, FileNotFoundError, OSError, RuntimeError, TypeError) as exc:
        sock.close()
        print(f"engine serve: error: {exc}", file=sys.stderr)
        return 1
    from engine.entrypoints.api_server import run_server

    return run_server(settings, sock)


def _setting_values(args: argparse.Namespace) -> dict[str, Any]:
    """The `ServerSettings` fields from the flags: each flag and the model's
    location are checked without importing the server's modules (and torch), so a
    mistake is reported at once."""
    api_key = _api_key(args.api_key)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    engine_args = EngineArgs.from_cli_args(args, log_stats=not args.disable_log_stats)
    replica_backend = args.data_parallel_backend or engine_args.distributed_executor_backend
    if args.data_parallel_size > 1 and replica_backend not in ("mp", "ray"):
        raise ValueError(f"--data-parallel-size runs each replica's workers with "
                         f"--data-parallel-backend mp or ray, not {replica_backend!r}")
    model_dir = str(engine_args.model_dir())
    lora_modules = _lora_modules(args, engine_args.enable_lora)
    name = args.served_model_name or args.model or "default"
    aliases = tuple({model_dir, os.path.abspath(model_dir)} - {name})
    return dict(
        model_name=name, model_aliases=aliases, api_key=api_key,
        max_request_bytes=args.max_request_bytes, host=args.host, port=args.port,
        shutdown_timeout=args.shutdown_timeout, engine_args=engine_args,
        data_parallel_size=args.data_parallel_size,
        data_parallel_backend=args.data_parallel_backend,
        route_plugins=tuple(args.enable_route_plugin), dev_mode=args.enable_dev_mode,
        lora_modules=lora_modules,
        allow_runtime_lora_updating=args.allow_runtime_lora_updating,
    )


def _lora_modules(args: argparse.Namespace, enable_lora: bool) -> tuple[tuple[str, str], ...]:
    if (args.lora_modules or args.allow_runtime_lora_updating) and not enable_lora:
        flag = "--lora-modules" if args.lora_modules else "--allow-runtime-lora-updating"
        raise ValueError(f"{flag} needs --enable-lora")
    from engine.lora.serving import parse_lora_module

    return tuple(parse_lora_module(text) for text in args.lora_modules)


def _api_key(flag: str | None) -> str | None:
    """The key from --api-key, else $ENGINE_API_KEY; None when neither is set. An
    empty or whitespace-only key is refused: it would silently turn auth off."""
    source, key = "--api-key", flag
    if key is None:
        source, key = "ENGINE_API_KEY", os.environ.get("ENGINE_API_KEY")
    if key is None:
        return None
    if not key.strip():
        raise ValueError(f"{source} is empty: give a non-blank key, or leave {source} unset "
                         "to serve without authentication")
    if key != key.strip():
        raise ValueError(f"{source} starts or ends with whitespace, which clients cannot send "
                         "in a bearer token; remove it")
    return key


def _load_plugins(io_processor_plugin: str | None) -> None:
    """Plugins load before the app starts: general plugins run, the platform is
    resolved, and a named IO-processor plugin must exist."""
    import registry
    from engine.platforms import current_platform

    registry.load_general_plugins()
    current_platform.device_type  # noqa: B018 - resolves the platform (errors surface here)
    if io_processor_plugin:
        available = registry.load_plugins_by_group(registry.IO_PROCESSOR_PLUGINS)
        if io_processor_plugin not in available:
            listing = ", ".join(repr(n) for n in sorted(available)) or "none"
            raise ValueError(f"IO processor plugin {io_processor_plugin!r} "
                             f"(--io-processor-plugin) is not available. Available "
                             f"io_processor plugins: {listing}")
