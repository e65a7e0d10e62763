"""docker-compose.yml, Dockerfile and .env.example, checked without a Docker engine.

1. The compose files, interpolated the way Compose does it (with .env.example, and with
   no environment at all, as in a fresh clone) and merged the way `-f a -f b` merges
   them, validate against the Compose Specification schema (vendored:
   tests/data/compose-spec.json, see compose-spec.NOTICE), and have what the stack needs:
   healthchecks, env-only config, a CPU worker by default, the NVIDIA GPU reservation
   and a CUDA torch behind the GPU switch, a required password in production.
2. The Dockerfile installs at the pinned versions and copies every package; building a
   wheel from exactly what it copies gives a complete package.
3. Each batchlab service's command, run on this machine with the environment the compose
   file gives it (host names redis/postgres mapped to the local services), comes up: the
   API answers its healthcheck and queues the demo once, the worker trains a run
   submitted over HTTP, and a password full of URL syntax reaches PostgreSQL intact.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support import free_port, stop_process_groups

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
PROD_OVERRIDE = ROOT / "docker-compose.prod.yml"
COMPOSE_FILES = (COMPOSE, GPU_OVERRIDE, PROD_OVERRIDE)
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
VENV_BIN = Path(sys.executable).parent
BATCHLAB_SERVICES = ("api", "worker")
DEMO_PASSWORD = "batchlab-local-demo"
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"


# --- Compose variable interpolation (https://docs.docker.com/compose/how-tos/environment-variables/variable-interpolation/)
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Substitute ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$ recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg = m["op"], m["arg"] or ""
        present = name in env
        filled = present and env[name] != ""
        if op in (":-", "-"):
            use_default = not filled if op == ":-" else not present
            return arg if use_default else env[name]
        if op in (":?", "?"):
            if not (filled if op == ":?" else present):
                raise InterpolationError(f"{name}: {arg}")
            return env[name]
        if op in (":+", "+"):
            return arg if (filled if op == ":+" else present) else ""
        return env.get(name, "")

    return _VAR.sub(sub, value)


def merge(base: Any, override: Any) -> Any:
    """`docker compose -f base -f override`: mappings merge key by key, the rest is
    replaced (Compose appends some sequences, e.g. ports; the overrides here set none)."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in {**base, **override}.items()}
    return override


def load(*paths: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """The compose model of ``-f`` files, each interpolated with ``env``, then merged."""
    docs = [interpolate(yaml.safe_load(p.read_text()), env) for p in paths]
    out = docs[0]
    for doc in docs[1:]:
        out = merge(out, doc)
    return out


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments and blank lines skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ROOT / ".env.example")


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any], example_env: dict[str, str]) -> dict[str, Any]:
    return interpolate(raw_compose, example_env)


@pytest.fixture(scope="module")
def gpu_compose(example_env: dict[str, str]) -> dict[str, Any]:
    return load(COMPOSE, GPU_OVERRIDE, env=example_env)


def _validator() -> jsonschema.Draft201909Validator:
    schema = json.loads(SCHEMA.read_text())
    # The file names draft 2019-09 by an old URI jsonschema does not map; it is 2019-09.
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


# --- 1. the compose file ----------------------------------------------------------------
def test_compose_files_validate_against_the_compose_spec(example_env) -> None:
    validator = _validator()
    docs = [yaml.safe_load(p.read_text()) for p in COMPOSE_FILES]
    combos = [(COMPOSE,), (COMPOSE, GPU_OVERRIDE), (COMPOSE, PROD_OVERRIDE), COMPOSE_FILES]
    docs += [load(*files, env={**example_env, "POSTGRES_PASSWORD": "x"}) for files in combos]
    for doc in docs:
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert errors == []


def test_a_fresh_clone_needs_no_env_file() -> None:
    """`docker compose config` with no .env and nothing exported: no variable is
    required, the demo password is the documented default, and the result is valid."""
    validator = _validator()
    for files in ((COMPOSE,), (COMPOSE, GPU_OVERRIDE)):
        doc = load(*files, env={})
        assert list(validator.iter_errors(doc)) == []
        services = doc["services"]
        assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == DEMO_PASSWORD
        for name in BATCHLAB_SERVICES:
            assert services[name]["environment"]["PGPASSWORD"] == DEMO_PASSWORD
    assert (
        "LOCAL DEMO" in COMPOSE.read_text() and "LOCAL DEMO" in (ROOT / ".env.example").read_text()
    )


def test_schema_rejects_what_compose_rejects(gpu_compose) -> None:
    """The vendored schema is strict enough to catch the mistakes it is here for."""
    validator = _validator()
    broken = json.loads(json.dumps(gpu_compose))
    broken["services"]["api"]["healthcheck"]["intervall"] = "5s"
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capability"
    ] = ["gpu"]
    broken["services"]["redis"]["depends_on"] = {"postgres": {"condition": "healthy"}}
    paths = {"/".join(map(str, e.path)) for e in validator.iter_errors(broken)}
    assert paths == {
        "services/api/healthcheck",
        "services/worker/deploy/resources/reservations/devices/0",
        "services/redis/depends_on",
    }


def test_every_variable_is_documented_and_production_requires_the_password(example_env):
    used = {
        m["braced"] or m["named"]
        for path in COMPOSE_FILES
        for m in _VAR.finditer(path.read_text())
        if not m["escaped"]
    }
    assert used - set(example_env) == set(), "document every variable in .env.example"
    assert example_env["POSTGRES_PASSWORD"] == "", "the demo runs without choosing one"
    for files in ((COMPOSE, PROD_OVERRIDE), COMPOSE_FILES):
        with pytest.raises(InterpolationError, match="POSTGRES_PASSWORD"):
            load(*files, env=example_env)
    prod = load(*COMPOSE_FILES, env={**example_env, "POSTGRES_PASSWORD": "s3cret/@:#%"})
    services = prod["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret/@:#%"
    for name in BATCHLAB_SERVICES:
        assert services[name]["environment"]["PGPASSWORD"] == "s3cret/@:#%"
    # Production queues no demo runs.
    assert services["api"]["command"] == "batchlab api --host 0.0.0.0 --port 8000"


def test_services_and_healthchecks(compose) -> None:
    services = compose["services"]
    assert {"redis", "postgres", "api", "worker"} <= set(services)
    for name in ("redis", "postgres", "api"):
        assert services[name]["healthcheck"]["test"], name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["postgres"]["volumes"][0].split(":")[0] in compose["volumes"]
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "http://localhost:8000/api/health" in api_check
    # Services start once what they use answers, not merely once it was started.
    for name, deps in (("api", {"redis", "postgres"}), ("worker", {"api"})):
        conditions = services[name]["depends_on"]
        assert set(conditions) == deps
        assert all(c["condition"] == "service_healthy" for c in conditions.values())
        assert all("healthcheck" in services[d] for d in deps)


def test_batchlab_services_share_one_image_and_env_only_config(compose) -> None:
    services = compose["services"]
    assert services["api"]["command"] == (
        "batchlab up --host 0.0.0.0 --port 8000 --no-worker --demo"
    )
    images = {services[s]["image"] for s in BATCHLAB_SERVICES}
    builds = {json.dumps(services[s]["build"], sort_keys=True) for s in BATCHLAB_SERVICES}
    assert len(images) == 1 and len(builds) == 1
    for name in BATCHLAB_SERVICES:
        service = services[name]
        env = service["environment"]
        # No password in the URL (libpq reads PGPASSWORD): nothing for Compose to escape.
        assert (
            env["BATCHLAB_DATABASE_URL"] == "postgresql+psycopg://batchlab@postgres:5432/batchlab"
        )
        assert env["PGPASSWORD"] == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
        assert env["BATCHLAB_BROKER_URL"] == "redis://redis:6379/0"
        assert "BATCHLAB_TOKEN" in env
        # Configuration by environment only: no config files mounted; named volumes and
        # the read-only dataset folder.
        assert "configs" not in service and "env_file" not in service
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            assert source in compose["volumes"] or (target, mode) == ("/data", ["ro"]), volume


def test_the_default_stack_runs_on_the_cpu(compose, example_env) -> None:
    services = compose["services"]
    assert not [name for name, svc in services.items() if "deploy" in svc or "profiles" in svc]
    worker = services["worker"]
    assert worker["command"] == "batchlab worker --gpus none"
    assert worker["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert worker["shm_size"] == "2gb"
    assert f"{example_env['BATCHLAB_DATA_DIR']}:/data:ro" in worker["volumes"]


def test_the_gpu_switch_reserves_gpus_and_builds_cuda_torch(compose, gpu_compose) -> None:
    worker = gpu_compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["command"] == "batchlab worker --gpus all --queues cpu"
    assert worker["build"] == {"context": ".", "args": {"TORCH_INDEX_URL": CUDA_INDEX}}
    # Its own image: the CPU image of the API is not overwritten by the CUDA one.
    assert worker["image"] != gpu_compose["services"]["api"]["image"]
    assert gpu_compose["services"]["api"] == compose["services"]["api"]
    # Everything else of the worker (volumes, shm, env, dependencies) is kept.
    for key in ("volumes", "shm_size", "environment", "depends_on", "restart"):
        assert worker[key] == compose["services"]["worker"][key], key


# --- 2. the Dockerfile ------------------------------------------------------------------
def _dockerfile_lines() -> list[str]:
    """Instructions with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _packages() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"]["packages"]


def test_dockerfile_base_pins_and_build_arg() -> None:
    lines = _dockerfile_lines()
    assert lines[0] == "FROM python:3.11-slim"
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines
    installs = [ln for ln in lines if "pip install" in ln]
    assert installs and all("-c constraints.txt" in ln for ln in installs)
    assert any('--index-url "${TORCH_INDEX_URL}" torch' in ln for ln in installs)
    assert lines[-1].startswith("CMD ") and "batchlab" in lines[-1]


def test_dockerfile_requirement_step_yields_the_pinned_dependencies(tmp_path) -> None:
    """Run the Dockerfile's own pyproject -> requirements one-liner."""
    line = next(ln for ln in _dockerfile_lines() if "tomllib" in ln)
    code = shlex.split(line.removeprefix("RUN "))[2]  # python -c CODE > file ...
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert out == [d.replace(" ", "") for d in pyproject["project"]["dependencies"]]

    def name(req: str) -> str:  # PEP 503: case, '_', '.' and '-' do not matter
        return re.sub(r"[-_.]+", "-", re.split(r"[=<>\[]", req)[0]).lower()

    pinned = {
        name(ln)
        for ln in (ROOT / "constraints.txt").read_text().splitlines()
        if ln and not ln.startswith("#")
    }
    unpinned = [d for d in out if name(d) not in pinned]
    assert unpinned == [], "every image dependency is pinned by constraints.txt"


def _copied_paths() -> list[str]:
    """Sources of every COPY (all words between COPY and the destination)."""
    return [p for ln in _dockerfile_lines() if ln.startswith("COPY ") for p in ln.split()[1:-1]]


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them() -> None:
    copied = set(_copied_paths())
    top_level = {p.split(".")[0] for p in _packages()}
    assert top_level <= copied
    ignored = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert {".env", ".venv", ".git"} <= set(ignored)
    assert not set(ignored) & copied


@pytest.mark.slow
def test_wheel_built_from_the_docker_context_is_complete(tmp_path) -> None:
    """`pip install .` in the image sees only what the Dockerfile copied: build from that."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for rel in _copied_paths():
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, ctx / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, ctx / rel)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(ctx),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    wheel = next((tmp_path / "dist").glob("batchlab-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in _packages():
        src = ROOT / pkg.replace(".", "/")
        for py in src.glob("*.py"):
            assert f"{pkg.replace('.', '/')}/{py.name}" in names
    assert "store/alembic.ini" in names
    frontend = [n for n in names if n.startswith("frontend/") and not n.endswith(".py")]
    assert any(n.endswith(".html") for n in frontend), "the dashboard's files are in the image"


# --- 3. the services' commands, run here ----------------------------------------------------


def _local_env(service: Mapping[str, Any], pg_url: str, redis_url: str, home: Path) -> dict:
    """The service's compose environment with the compose host names mapped to local ones."""
    from sqlalchemy.engine import make_url

    env = dict(service["environment"])
    db = make_url(env["BATCHLAB_DATABASE_URL"])
    assert (db.drivername, db.host, db.port, db.password) == (
        "postgresql+psycopg",
        "postgres",
        5432,
        None,
    )
    local_db = make_url(pg_url)
    env["BATCHLAB_DATABASE_URL"] = db.set(
        host=local_db.host,
        port=local_db.port,
        username=local_db.username,
        database=local_db.database,
    ).render_as_string(hide_password=False)
    assert env["BATCHLAB_BROKER_URL"].startswith("redis://redis:6379/")
    env["BATCHLAB_BROKER_URL"] = redis_url
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHLAB_", "PG", "CUDA_"))}
    return {
        **base,
        **env,
        "BATCHLAB_HOME": str(home),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _command(service: Mapping[str, Any], port: int | None = None) -> list[str]:
    argv = shlex.split(service["command"])
    if port is not None:
        argv[argv.index("--port") + 1] = str(port)
    assert argv[0] == "batchlab"
    # `python -m batchlab.cli` from this checkout is the image's `batchlab`.
    return [sys.executable, "-m", "batchlab.cli", *argv[1:]]


@pytest.fixture()
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    stop_process_groups(started)


def _start(argv: list[str], env: dict, log: Path, procs: list) -> subprocess.Popen:
    with log.open("wb") as fh:  # the child keeps its own copy of the descriptor
        p = subprocess.Popen(
            argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )
    procs.append(p)
    return p


def _wait_healthy(check: list[str], port: int, api: subprocess.Popen, log: Path) -> None:
    """Run the compose healthcheck itself, pointed at this port, until it passes."""
    assert check[:2] == ["CMD", "python"]
    argv = [sys.executable, *[a.replace("localhost:8000", f"localhost:{port}") for a in check[2:]]]
    deadline = time.monotonic() + 60
    while subprocess.run(argv, capture_output=True).returncode != 0:
        assert api.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.mark.services
def test_a_password_full_of_url_syntax_reaches_postgres(compose, pg_url, tmp_path) -> None:
    """PGPASSWORD, not the URL, carries the password: no escaping, nothing mangled. (The
    local server trusts any password; libpq reports the one it sent.)"""
    password = "p@ss:w/rd?#%20&="
    env = _local_env(compose["services"]["worker"], pg_url, "redis://x:6379/0", tmp_path)
    env["PGPASSWORD"] = password
    code = (
        "import os, sqlalchemy as sa; "
        "e = sa.create_engine(os.environ['BATCHLAB_DATABASE_URL']); "
        "c = e.connect(); print(c.connection.dbapi_connection.info.password)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == password


@pytest.mark.services
@pytest.mark.slow
def test_service_commands_come_up_with_their_compose_environment(
    compose, pg_url, redis_url, tmp_path, procs
) -> None:
    import batchlab

    services = compose["services"]
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    api_env = _local_env(services["api"], pg_url, redis_url, home)
    worker_env = _local_env(services["worker"], pg_url, redis_url, home)
    api = _start(_command(services["api"], port), api_env, api_log, procs)
    _wait_healthy(services["api"]["healthcheck"]["test"], port, api, api_log)

    client = batchlab.Client(f"http://127.0.0.1:{port}", token="")
    health = client.health()
    assert (health["database"], health["broker"], health["auth"]) == ("ok", "ok", False)

    # First start on an empty database: the demo comparison is queued, without a click.
    demo = client.list_runs()
    assert len(demo) == len(list((ROOT / "examples" / "demo").glob("*.yaml"))) >= 2
    assert all(r["name"].startswith("demo ") and r["status"] == "queued" for r in demo)
    # A restart queues nothing more.
    api.terminate()
    # uvicorn shuts down gracefully, then re-raises the signal.
    assert api.wait(timeout=30) in (0, -signal.SIGTERM), api_log.read_text()[-3000:]
    api = _start(_command(services["api"], port), api_env, tmp_path / "api2.log", procs)
    _wait_healthy(services["api"]["healthcheck"]["test"], port, api, tmp_path / "api2.log")
    assert len(client.list_runs()) == len(demo)
    assert "not queueing the demo again" in (tmp_path / "api2.log").read_text()
    for run in demo:  # so the worker takes the smoke run next
        client.cancel(run["id"])

    worker = _start(_command(services["worker"]), worker_env, worker_log, procs)
    # BATCHLAB_TOKEN is empty by default: writes are open, so no token is needed.
    run = client.submit(
        {
            "model": "mlp",
            "dataset": "synthetic",
            "dataset_size": 320,
            "epochs": 2,
            "workers": 2,
            "batch_per_worker": 16,
            "ref_batch": 32,
            "warmup": "none",
            "milestones": [1],
            "checkpoint": False,
        },
        name="compose smoke",
    )
    try:
        final = client.wait(run, progress=False, timeout=90, poll=0.5)
    except TimeoutError:
        pytest.fail(f"worker did not finish the run:\n{worker_log.read_text()[-3000:]}")
    assert worker.poll() is None
    assert final["status"] == "succeeded", final
    assert final["host"] and final["worker"]
    points = client.metrics(run, keys=["loss", "val_err"], max_points=100_000)
    total_iters = run["derived"]["total_iters"]
    assert sorted(points[points.key == "loss"].step) == list(range(total_iters))
    assert len(points[points.key == "val_err"]) == 2  # one per epoch
