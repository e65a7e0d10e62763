"""batchlab's settings: every ``BATCHLAB_*`` variable read in one place, with one meaning.

``get_settings()`` is what the store, the worker, the server, the trainer's data cache and
the client read. ``Settings.from_env(env)`` parses a given mapping (tests, child
processes). An empty variable means the same as an unset one, and ``~`` is expanded, so
``BATCHLAB_HOME=""`` or ``~/bl`` name the same folder to every reader.

torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` and ``CUDA_VISIBLE_DEVICES`` describe
the process, not the deployment: they are read where they are used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
# The largest request body the API reads (BATCHLAB_MAX_BODY_BYTES): a RunSpec within its
# limits (docs/runspec.md) is a few kB, so 1 MiB leaves room without letting one anonymous
# request fill the server's memory.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Host headers the API answers without BATCHLAB_ALLOWED_HOSTS (a DNS-rebinding page
# sends its own name); the host `batchlab api --host` binds is added by the server.
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")
# A run queued this long with no message in the broker is sent again
# (BATCHLAB_RESEND_AFTER_S; worker.recovery.reconcile_queued).
DEFAULT_RESEND_AFTER_S = 60.0
# The generated-data cache keeps at most this many bytes, least recently used files
# evicted first (BATCHLAB_DATA_CACHE_MAX_BYTES; 0: no bound).
DEFAULT_DATA_CACHE_MAX_BYTES = 2 << 30
# Live streams (SSE) the API keeps open at once (BATCHLAB_MAX_STREAMS; 0: no bound): past
# it a new stream answers 503 with Retry-After, so readers cannot exhaust the server.
DEFAULT_MAX_STREAMS = 200
# torch's intra-op threads in a worker's training process (BATCHLAB_TORCH_THREADS; 0:
# every usable CPU but one). The spare core keeps the worker's sink thread, the API and
# its readers off the training's threads: measured on 2 vCPUs, 100 live readers cost a
# two-thread training 34% of its speed, as one stalled thread stalls both (issue 10).
DEFAULT_TORCH_THREADS = 0
# An external run (registered by its own client: batchlab train --server, a notebook)
# whose client has not called for this long is failed "lost contact with the client"; its
# client heartbeats every second, and one that comes back later revives it.
DEFAULT_EXTERNAL_SILENT_S = 120.0
# Multi-node runs (spec.nodes > 1; worker/gang.py, docs/deploy.md):
# a gang whose nodes have not all joined within this long releases its claims and tries
# again later (BATCHLAB_GANG_TIMEOUT_S), so two runs never each hold part of the nodes.
DEFAULT_GANG_TIMEOUT_S = 60.0
# A node of a gang not heard from for this long is lost: the gang fails at once and the
# run resumes on a new gang from its checkpoint (BATCHLAB_NODE_SILENT_S).
DEFAULT_NODE_SILENT_S = 15.0
# The longest a collective may wait for a peer before the process fails
# (BATCHLAB_COLLECTIVE_TIMEOUT_S): it covers the slowest rank's data loading.
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0
# SQLAlchemy picks psycopg2 for a bare "postgresql://"; the project ships psycopg 3.
_PG_PREFIXES = ("postgresql://", "postgres://")
_PG_DRIVER = "postgresql+psycopg://"


@dataclass(frozen=True)
class Settings:
    """Where batchlab keeps its data, which broker it uses, whom it lets write."""

    home: Path  # SQLite files, run folders (checkpoints), dataset cache
    database_url: str  # SQLAlchemy URL, PostgreSQL mapped to psycopg 3
    broker_url: str  # Celery broker
    token: str | None  # writes need it when set (server); sent with writes (client)
    data_cache: Path  # downloaded / generated datasets
    url: str  # the server the client and the CLI talk to
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies answer 413
    # Host headers the server accepts (the defaults plus BATCHLAB_ALLOWED_HOSTS; "*": any)
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    resend_after_s: float = DEFAULT_RESEND_AFTER_S  # queued with no message: sent again
    data_cache_max_bytes: int = DEFAULT_DATA_CACHE_MAX_BYTES  # 0: the cache is not bounded
    max_streams: int = DEFAULT_MAX_STREAMS  # open SSE streams; 0: no bound
    torch_threads: int = DEFAULT_TORCH_THREADS  # a worker's training threads; 0: auto
    external_silent_s: float = DEFAULT_EXTERNAL_SILENT_S  # external run's client silent
    # The address other nodes reach this worker at (the rendezvous endpoint it publishes,
    # torchrun's --local-addr); None: the address this host's name resolves to.
    node_addr: str | None = None
    rdzv_port: int = 0  # the rendezvous port a gang's first node opens; 0: any free port
    gang_timeout_s: float = DEFAULT_GANG_TIMEOUT_S
    node_silent_s: float = DEFAULT_NODE_SILENT_S
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse ``env`` (default ``os.environ``); relative paths are kept relative."""
        env = os.environ if env is None else env

        def var(name: str) -> str | None:
            return env.get(name, "").strip() or None

        home = Path(var("BATCHLAB_HOME") or ".batchlab").expanduser()
        database = var("BATCHLAB_DATABASE_URL")
        cache = var("BATCHLAB_DATA_CACHE")
        return cls(
            home=home,
            database_url=(
                normalize_database_url(database)
                if database
                else f"sqlite:///{(home / 'batchlab.db').resolve()}"
            ),
            broker_url=var("BATCHLAB_BROKER_URL")
            or f"sqla+sqlite:///{(home / 'broker.db').resolve()}",
            token=var("BATCHLAB_TOKEN"),
            data_cache=Path(cache).expanduser() if cache else home / "data",
            url=(var("BATCHLAB_URL") or DEFAULT_URL).rstrip("/"),
            max_body_bytes=int(var("BATCHLAB_MAX_BODY_BYTES") or DEFAULT_MAX_BODY_BYTES),
            allowed_hosts=DEFAULT_ALLOWED_HOSTS + split_hosts(var("BATCHLAB_ALLOWED_HOSTS")),
            resend_after_s=float(var("BATCHLAB_RESEND_AFTER_S") or DEFAULT_RESEND_AFTER_S),
            data_cache_max_bytes=int(
                var("BATCHLAB_DATA_CACHE_MAX_BYTES") or DEFAULT_DATA_CACHE_MAX_BYTES
            ),
            max_streams=int(var("BATCHLAB_MAX_STREAMS") or DEFAULT_MAX_STREAMS),
            torch_threads=int(var("BATCHLAB_TORCH_THREADS") or DEFAULT_TORCH_THREADS),
            external_silent_s=float(var("BATCHLAB_EXTERNAL_SILENT_S") or DEFAULT_EXTERNAL_SILENT_S),
            node_addr=var("BATCHLAB_NODE_ADDR"),
            rdzv_port=int(var("BATCHLAB_RDZV_PORT") or 0),
            gang_timeout_s=float(var("BATCHLAB_GANG_TIMEOUT_S") or DEFAULT_GANG_TIMEOUT_S),
            node_silent_s=float(var("BATCHLAB_NODE_SILENT_S") or DEFAULT_NODE_SILENT_S),
            collective_timeout_s=float(
                var("BATCHLAB_COLLECTIVE_TIMEOUT_S") or DEFAULT_COLLECTIVE_TIMEOUT_S
            ),
        )

    def override(self, **values: Any) -> Settings:
        """A copy with the given fields replaced; None leaves a field as it is."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @property
    def broker_url_safe(self) -> str:
        """The broker URL with any password masked, for messages and logs."""
        return mask_password(self.broker_url)


def get_settings() -> Settings:
    """The settings of the current environment, parsed once per distinct environment.

    Keyed on the ``BATCHLAB_*`` variables (and the working directory, which relative paths
    depend on), so a test's ``monkeypatch.setenv`` or ``batchlab up`` exporting an
    absolute home is seen at once, while every caller still shares one parsed object.
    """
    ours = frozenset((k, v) for k, v in os.environ.items() if k.startswith("BATCHLAB_"))
    return _parse(ours, os.getcwd())


@lru_cache(maxsize=8)
def _parse(env: frozenset[tuple[str, str]], _cwd: str) -> Settings:
    return Settings.from_env(dict(env))


def training_threads(setting: int, usable_cpus: int) -> int:
    """torch's intra-op threads for a worker's run: ``setting`` when positive, else every
    usable CPU but one (at least one)."""
    return setting if setting > 0 else max(1, usable_cpus - 1)


def split_hosts(text: str | None) -> tuple[str, ...]:
    """``"a.example, b:8000"`` -> ``("a.example", "b")``: host names, ports dropped."""
    out = []
    for item in (text or "").split(","):
        host = item.strip().lower()
        if host.startswith("["):  # [::1]:8000
            host = host[1:].partition("]")[0]
        elif host.count(":") == 1:
            host = host.partition(":")[0]
        if host:
            out.append(host)
    return tuple(out)


def normalize_database_url(url: str) -> str:
    """Map plain PostgreSQL URLs (``postgresql://``, ``postgres://``) to psycopg 3."""
    for prefix in _PG_PREFIXES:
        if url.startswith(prefix):
            return _PG_DRIVER + url[len(prefix) :]
    return url


def mask_password(url: str) -> str:
    """``url`` with its password, if any, shown as ``***``."""
    return re.sub(r"(://[^:/@]*:)[^/]*@", r"\1***@", url, count=1)
