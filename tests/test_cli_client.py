"""`batchlab submit | ls | wait | cancel` against a real API served over HTTP.

The app runs under uvicorn in a thread on a fresh SQLite home; the commands run through
`batchlab.cli.main` as a shell would call them, and a worker's progress is played
through the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from support import serve_app

import batchlab
from batchlab.cli import main

SPEC = {
    "model": "mlp",
    "dataset": "synthetic",
    "dataset_size": 320,
    "epochs": 2,
    "workers": 2,
    "batch_per_worker": 16,
    "ref_batch": 16,
    "warmup": "gradual",
    "warmup_epochs": 1,
    "milestones": [1],
}


@pytest.fixture()
def server(batchlab_home: str) -> Iterator[SimpleNamespace]:
    yield from serve_app()


@pytest.fixture()
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `batchlab ARGV`; return (exit status, stdout, stderr)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _store(engine, fn, *args, **kwargs) -> None:
    from store import db

    with db.session(engine) as s:
        fn(s, *args, **kwargs)


# --- submit ------------------------------------------------------------------------------------
def test_submit_with_baseline_and_overrides(server, spec_file, capsys) -> None:
    code, out, _ = cli(
        capsys, "submit", str(spec_file), "--baseline", "--name", "big",
        "--set", "workers=4", "--set", "milestones=[1.5]", "--url", server.url,
    )  # fmt: skip
    assert code == 0
    base_line, run_line = out.strip().splitlines()
    assert base_line.startswith("baseline run 1 queued, kn=16 (1 x 16)")
    assert run_line.startswith("run 2 queued, kn=64 (4 x 16), peak lr 0.4, 8 iterations")
    assert run_line.endswith(f"{server.url}/#/run/2")
    run = batchlab.Client(server.url).run(2)
    assert run["name"] == "big" and run["spec"]["milestones"] == [1.5]
    assert run["baseline_id"] == 1


def test_submit_invalid_field_is_named_and_nothing_stored(server, spec_file, capsys) -> None:
    code, out, err = cli(
        capsys, "submit", str(spec_file), "--set", "batch_per_worker=4096", "--url", server.url
    )
    assert code == 2 and out == ""
    assert "batch_per_worker: total batch k*n = 2*4096" in err
    code, _, err = cli(capsys, "submit", str(spec_file), "--set", "lr=3", "--url", server.url)
    assert code == 2 and "lr: Extra inputs are not permitted" in err
    assert batchlab.Client(server.url).list_runs() == []


def test_submit_bad_arguments(server, spec_file, tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "submit", str(spec_file), "--set", "epochs", "--url", server.url)
    assert code == 2 and "expected FIELD=VALUE, got 'epochs'" in err
    code, _, err = cli(capsys, "submit", str(tmp_path / "nope.yaml"), "--url", server.url)
    assert code == 2 and "spec file not found" in err


def test_submit_json_and_wait(server, spec_file, capsys) -> None:
    """--wait blocks until the worker is done and exits by how the run ended."""
    from store import runs

    def worker() -> None:
        deadline = time.monotonic() + 10
        while not batchlab.Client(server.url).list_runs():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _store(server.engine, runs.mark_running, 1, host="box", gpus="", worker="w")
        _store(server.engine, runs.mark_finished, 1, "succeeded",
               summary={"final_val_err": 0.0625, "wall_time_s": 3.25})  # fmt: skip

    thread = threading.Thread(target=worker)
    thread.start()
    code, out, _ = cli(capsys, "submit", str(spec_file), "--json", "--wait", "--url", server.url)
    thread.join()
    assert code == 0
    answer, outcome = out.rsplit("}\n", 1)
    assert json.loads(answer + "}")["run"]["id"] == 1
    assert outcome.strip() == "run 1 succeeded: final val err 6.25% in 3.2 s"


# --- ls ----------------------------------------------------------------------------------------
def test_ls_prints_a_compact_table(server, spec_file, capsys) -> None:
    assert cli(capsys, "ls", "--url", server.url)[1].strip() == "no runs"
    cli(capsys, "submit", str(spec_file), "--baseline", "--set", "workers=8", "--url", server.url)
    cli(capsys, "cancel", "1", "--url", server.url)
    code, out, _ = cli(capsys, "ls", "--url", server.url)
    assert code == 0
    header, newest, oldest, note = out.strip().splitlines()
    assert header.split() == [
        "ID", "STATUS", "PROG", "KN", "K", "x", "N", "PEAK_LR", "EPOCHS", "VAL_ERR", "NAME"
    ]  # fmt: skip
    assert newest.split()[:8] == ["2", "queued", "0%", "128", "8", "x", "16", "0.8"]
    assert oldest.split()[:3] == ["1", "cancelled*", "0%"]
    assert note == "* baseline run"

    code, out, _ = cli(capsys, "ls", "--status", "queued", "--json", "--url", server.url)
    assert [r["id"] for r in json.loads(out)] == [2]
    code, _, err = cli(capsys, "ls", "--status", "bogus", "--url", server.url)
    assert code == 2 and "invalid choice" in err


# --- wait --------------------------------------------------------------------------------------
def test_wait_exit_status_follows_the_runs(server, spec_file, capsys) -> None:
    from store import runs

    client = batchlab.Client(server.url)
    ok, bad = client.submit(SPEC), client.submit({**SPEC, "seed": 1})
    for rid in (ok["id"], bad["id"]):
        _store(server.engine, runs.mark_running, rid, host="box", gpus="", worker="w")
    _store(server.engine, runs.set_progress, ok["id"], 0.25, 12.0)

    code, _, err = cli(capsys, "wait", str(ok["id"]), "--timeout", "0.3", "--poll", "0.05",
                       "--url", server.url)  # fmt: skip
    assert code == 124 and "still unfinished" in err and "running, eta 0:12" in err

    def finish() -> None:
        time.sleep(0.3)
        _store(server.engine, runs.mark_finished, ok["id"], "succeeded",
               summary={"final_val_err": 0.1})  # fmt: skip
        _store(server.engine, runs.mark_finished, bad["id"], "diverged", diverged_step=7)

    thread = threading.Thread(target=finish)
    thread.start()
    code, out, _ = cli(capsys, "wait", str(ok["id"]), str(bad["id"]), "--quiet", "--poll", "0.05",
                       "--url", server.url)  # fmt: skip
    thread.join()
    assert code == 1
    assert out.splitlines() == [
        f"run {ok['id']} succeeded: final val err 10.00%",
        f"run {bad['id']} diverged at iteration 7",
    ]
    assert cli(capsys, "wait", str(ok["id"]), "--quiet", "--url", server.url)[0] == 0
    code, _, err = cli(capsys, "wait", "99", "--url", server.url)
    assert code == 2 and "run 99 not found" in err


# --- cancel, tokens, environment -----------------------------------------------------------------
def test_cancel_needs_the_token_from_flag_or_environment(batchlab_home, monkeypatch, capsys):
    for server in serve_app(token="s3cret"):
        run = batchlab.Client(server.url, token="s3cret").submit(SPEC)
        monkeypatch.setenv("BATCHLAB_URL", server.url)  # no --url from here on
        code, _, err = cli(capsys, "cancel", str(run["id"]))
        assert code == 2 and "Authorization: Bearer" in err
        code, out, _ = cli(capsys, "cancel", str(run["id"]), "--token", "s3cret")
        assert code == 0 and out.strip() == f"run {run['id']}: cancelled"
        monkeypatch.setenv("BATCHLAB_TOKEN", "s3cret")
        code, out, err = cli(capsys, "cancel", "99", str(run["id"]))
        assert code == 2 and "run 99 not found" in err
        assert out.strip() == f"run {run['id']}: cancelled"


def test_unreachable_server_is_a_clear_error(capsys) -> None:
    code, _, err = cli(capsys, "ls", "--url", "http://127.0.0.1:9")
    assert code == 2 and "no batchlab server answered at http://127.0.0.1:9" in err


@pytest.mark.parametrize("command", ["submit", "ls", "wait", "cancel"])
def test_help_explains_with_an_example(command, capsys) -> None:
    code, out, _ = cli(capsys, command, "--help")
    assert code == 0
    assert "example:" in out and f"  batchlab {command} " in out
    assert "$BATCHLAB_URL" in out


def test_installed_entry_point(server) -> None:
    """The `batchlab` script itself, with the URL from the environment."""
    env = {**os.environ, "BATCHLAB_URL": server.url}
    exe = Path(sys.executable).parent / "batchlab"
    proc = subprocess.run([str(exe), "ls"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "no runs", proc.stderr
