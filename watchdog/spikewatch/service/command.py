"""``spikewatch serve``: the monitor service for many runs."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from spikewatch.errors import ConfigError

TOKEN_ENV = "SPIKEWATCH_TOKEN"
#: The shortest service token accepted: a short one is guessed (``openssl rand -hex 24``
#: makes 48 characters).
MIN_TOKEN_CHARS = 16


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="run the monitor service (HTTP ingest, commands, /metrics, Slack, jobs)",
        description=(
            "Run the monitor service. Trainers send records with monitor_url= and token=; "
            f"the token comes from ${TOKEN_ENV} or --token-file."
        ),
    )
    p.add_argument("--config", help="TOML file with [service], [monitor] and [slack] sections")
    p.add_argument("--host", help="interface to bind (default from the config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default from the config: 9650)")
    p.add_argument("--db", help="SQLite event store path (default from the config)")
    p.add_argument("--token-file", help=f"file holding the bearer token (else ${TOKEN_ENV})")
    p.set_defaults(handler=run)


def read_token(token_file: str | None, environ: dict[str, str] | os._Environ[str]) -> str:
    """The bearer token from ``--token-file`` or the environment; never from the command line.

    Example:
        >>> read_token(None, {"SPIKEWATCH_TOKEN": " 5f0c2a9e41b7d3c8e6a1\\n"})
        '5f0c2a9e41b7d3c8e6a1'
        >>> read_token(None, {})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: no token: set SPIKEWATCH_TOKEN or pass --token-file ...
    """
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {token_file!r} cannot be read ({exc})") from exc
        if not token:
            raise ConfigError(f"--token-file {token_file!r} is empty: put the token in it")
        return _long_enough(token, f"the token in --token-file {token_file!r}")
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(
            f"no token: set {TOKEN_ENV} or pass --token-file "
            "(every write needs Authorization: Bearer)"
        )
    return _long_enough(token, f"${TOKEN_ENV}")


def _long_enough(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{where} has {len(token)} characters: use at least {MIN_TOKEN_CHARS} "
            "(e.g. export SPIKEWATCH_TOKEN=$(openssl rand -hex 24))"
        )
    return token


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    # Heavy imports (uvicorn, FastAPI, the store) only for this subcommand.
    import uvicorn  # noqa: PLC0415

    from spikewatch.service.app import create_app  # noqa: PLC0415
    from spikewatch.service.config import ServiceConfig  # noqa: PLC0415
    from spikewatch.service.core import Service  # noqa: PLC0415

    config = ServiceConfig.from_file(args.config) if args.config else ServiceConfig()
    overrides = {
        k: getattr(args, k) for k in ("host", "port", "db") if getattr(args, k) is not None
    }
    config = dataclasses.replace(config, **overrides)
    token = read_token(args.token_file, os.environ)
    # The port first: a busy one must fail before anything (the event store) is created.
    sock = bind(config.host, config.port)
    service = Service.from_config(config, token=token)
    app = create_app(service)

    @asynccontextmanager
    async def lifespan(_: object) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app.router.lifespan_context = lifespan
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # No access log: it costs time per request and the hot path is ingest.
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, log_level="info"))
    server.run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a `ConfigError` saying what to do.

    Example:
        >>> taken = bind("127.0.0.1", 0)
        >>> bind("127.0.0.1", taken.getsockname()[1])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        spikewatch.errors.ConfigError: port ... on 127.0.0.1 cannot be used (...): stop ...
        >>> taken.close()
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"port {port} on {host} cannot be used ({exc.strerror or exc}): stop what holds "
            "it, or pass another --port (or [service] port)"
        ) from exc
    sock.set_inheritable(True)
    return sock
