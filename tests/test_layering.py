"""The API server never imports torch (docs/design.md: who may import whom).

Checked in a fresh interpreter, since this test process may have imported torch already:
it builds the app, serves a schedule preview, queues a run (Celery message by name),
reads it back and asks for health, then asserts torch is still absent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent(
    """
    import json, sys
    from fastapi.testclient import TestClient
    from server.app import create_app

    app = create_app(database_url=sys.argv[1], broker_url=sys.argv[2])
    spec = {"model": "mlp", "dataset_size": 4000, "epochs": 2, "warmup_epochs": 1}
    with TestClient(app, base_url="http://localhost") as client:  # an allowed Host
        codes = [
            client.post("/api/schedule", json=spec).status_code,
            client.post("/api/runs", json={"spec": spec, "baseline": True}).status_code,
            client.get("/api/runs/1/metrics").status_code,
            client.get("/api/health").status_code,
            client.get("/api/workers").status_code,
        ]
    heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print(json.dumps({"codes": codes, "torch": heavy}))
    """
)


def test_server_does_not_import_torch(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            PROGRAM,
            f"sqlite:///{tmp_path / 'db.sqlite'}",
            f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        ],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "BATCHLAB_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [200, 201, 200, 200, 200]
    assert result["torch"] == []
