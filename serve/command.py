"""Registers ``nst serve`` (through the ``nst.commands`` entry point, so ``engine`` never imports ``serve``)."""

from __future__ import annotations

import argparse
import contextvars
import ipaddress
import os
import sys
from pathlib import Path

from engine.errors import UserError

TOKEN_VARIABLE = "NST_SERVE_TOKEN"


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="an HTTP service with a web page: queue style-transfer jobs, follow them live, fetch the results",
        description="Serve the engine over HTTP (FastAPI + uvicorn; `pip install -e '.[serve]'`): a page at /, "
        "the API at /jobs, its OpenAPI page at /docs. Jobs, their images and checkpoints live in "
        "--state-dir; a stopped or killed server resumes them when started again on the same directory.",
    )
    add_arguments(p)
    add_engine_options(p)
    p.set_defaults(run=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path("nst-serve-state"),
        help="where jobs, their images and checkpoints are kept (default: ./nst-serve-state)",
    )
    p.add_argument(
        "--token",
        help=f"bearer token every request but /health must send (default: ${TOKEN_VARIABLE}); "
        "required when binding to anything but a loopback address",
    )
    p.add_argument("--max-upload-mb", type=_positive(float), default=50.0, help="request body limit (default: 50)")
    p.add_argument(
        "--max-input-pixels",
        type=_positive(int),
        default=50_000_000,
        help="refuse an uploaded image with more pixels, from its header before decoding (default: 50000000)",
    )
    p.add_argument(
        "--max-pixels",
        type=_positive(int),
        default=2048 * 2048,
        help="largest output a job may ask for, in pixels (default: 4194304, 2048x2048)",
    )
    p.add_argument(
        "--time-limit",
        type=_positive(float),
        default=600.0,
        help="seconds a job may run before it fails (default: 600)",
    )
    p.add_argument("--max-queued", type=_positive(int), default=32, help="jobs waiting; more get 429 (default: 32)")
    p.add_argument(
        "--memory-budget",
        type=_positive(float),
        default=None,
        help="GiB the jobs held (queued and running) may take together, by the engine's memory model; a job that "
        "needs more alone is refused, one that does not fit now gets 429 (default: 80 percent of the memory "
        "available at start-up)",
    )
    p.add_argument("--max-styles", type=_positive(int), default=8, help="style images one job may send (default: 8)")
    p.add_argument(
        "--max-step-pixels",
        type=_positive(float),
        default=1000.0,
        help="millions of pixel-steps a job may ask for: the sum over its scales of steps x pixels, a bound on "
        "its time (default: 1000)",
    )
    p.add_argument(
        "--header-timeout",
        type=_positive(float),
        default=10.0,
        help="seconds a connection may take to send a request's headers before it is closed (default: 10)",
    )
    p.add_argument(
        "--body-timeout",
        type=_positive(float),
        default=30.0,
        help="seconds a request body may stall before it is refused with 408; the whole body gets ten times "
        "this (default: 30)",
    )
    p.add_argument(
        "--max-connections",
        type=_positive(int),
        default=256,
        help="open connections at most; more are answered 503 and closed (default: 256)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive(int),
        default=20,
        help="steps between checkpoints of the running job: what a killed server can lose (default: 20)",
    )


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The settings the server's one Engine is built with (network, layers, device, precision); every job
    uses these, and chooses the rest per request."""
    from cli.options import add_config_options
    from engine.service import FIXED

    add_config_options(p, only=FIXED)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than zero")
        return value

    return parse


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def run(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    if not _loopback(args.host) and not token:
        raise UserError(
            f"binding to {args.host!r} lets other machines in: give a --token (or ${TOKEN_VARIABLE}), "
            "or bind to 127.0.0.1"
        )
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("nst serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    from engine import Config
    from engine.memory import HEADROOM, GiB, available_bytes

    from .app import create_app
    from .protocol import guarded_protocol
    from .service import Limits, Service
    from .uploads import UploadLimits

    budget = args.memory_budget * GiB if args.memory_budget else HEADROOM * available_bytes(torch_cpu())
    limits = Limits(
        upload=UploadLimits(max_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_input_pixels),
        max_pixels=args.max_pixels,
        time_limit=args.time_limit,
        max_queued=args.max_queued,
        checkpoint_every=args.checkpoint_every,
        memory_budget=int(budget),
        max_styles=args.max_styles,
        max_step_pixels=args.max_step_pixels * 1e6,
    )
    try:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--state-dir {str(args.state_dir)!r} cannot be created ({exc.strerror or exc})") from None
    from engine.service import FIXED

    base = Config(**{name: getattr(args, name) for name in FIXED if hasattr(args, name)})
    service = Service(args.state_dir, limits, base)
    _raise_open_files(args.max_connections)
    server = _server(
        uvicorn.Config(
            create_app(service, token, body_seconds=args.body_timeout),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            # Event streams end when the service stops; this bounds what a slow client can hold up.
            timeout_graceful_shutdown=5,
            # Slow or idle clients: the headers within --header-timeout (guarded_protocol), an idle keep-alive
            # connection closed after 5 s, a request line and headers of 64 KiB at most; the body's pace is
            # the app's (app.Guard). Connections beyond --max-connections get a JSON 503 and are closed.
            http=guarded_protocol(args.header_timeout, args.max_connections),
            timeout_keep_alive=5,
            h11_max_incomplete_event_size=64 * 1024,
        ),
        service,
    )
    _log_limits(limits, args)
    # Requests are answered in words for HTTP clients (``style_weight``, the form field), not the command
    # line's (``--style-weight``): a fresh context drops the CLI's wording that ``nst`` set around this call.
    contextvars.Context().run(server.run)
    return 0


def torch_cpu():
    import torch

    return torch.device("cpu")


def _raise_open_files(connections: int) -> None:
    """Room for --max-connections sockets beside the files a job uses (the soft limit up to the hard one)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def _log_limits(limits, args) -> None:
    from engine.memory import GiB

    print(
        f"nst serve: memory budget {limits.memory_budget / GiB:.1f} GiB for the jobs held, "
        f"{limits.max_queued} queued at most, headers within {args.header_timeout:g} s, "
        f"{args.max_connections} connections at most",
        file=sys.stderr,
        flush=True,
    )


def _server(config, service):
    """uvicorn's server, told about SIGTERM first so that the running job starts checkpointing at once (while
    uvicorn waits for open connections), and saying where it listens once it does (``--port 0``)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.begin_stop()
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    print(f"nst serve: listening on http://{host}:{port}", flush=True)

    return Server(config)


def main(argv=None) -> int:
    """``python -m serve``: the same as ``nst serve`` without the ``nst`` entry point installed."""
    from cli.main import EXIT_USER_ERROR
    from engine.errors import cli_wording

    parser = argparse.ArgumentParser(prog="nst serve")
    add_arguments(parser)
    add_engine_options(parser)
    args = parser.parse_args(argv)
    try:
        with cli_wording():
            return run(args)
    except UserError as exc:
        print(f"nst: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
