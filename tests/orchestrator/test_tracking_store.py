"""A new sqlite tracking store appears whole: a process that opens it while the sweep creates it (a
reader polling for results, `mlflow ui`, a second sweep) finds a fully migrated store, never a
half-migrated file whose migrations it would run again (both sides then failed with
"table _alembic_tmp_... already exists")."""

import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.tracking import create_sqlite_store, ensure_experiment

REPO = Path(__file__).resolve().parents[2]

# polls for the file and opens it the moment it exists, as the resume test's reader does
READER = """
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient
path = Path(sys.argv[1])
deadline = time.time() + 60
while not path.exists():
    if time.time() > deadline:
        sys.exit("the store never appeared")
    time.sleep(0.001)
MlflowClient(f"sqlite:///{path}").search_experiments()
print("read ok")
"""


def test_a_reader_polling_for_the_new_store_finds_it_complete(tmp_path):
    db = tmp_path / "runs" / "mlflow.db"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(db)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # the reader is polling before the store is created
    create_sqlite_store(f"sqlite:///{db}")
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0 and "read ok" in out, err[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    exp = ensure_experiment(client, "x", None)
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
    assert [p.name for p in db.parent.iterdir()] == ["mlflow.db"]  # no creating-file left behind


def test_an_existing_store_is_left_alone(tmp_path):
    db = tmp_path / "mlflow.db"
    create_sqlite_store(f"sqlite:///{db}")
    client = MlflowClient(f"sqlite:///{db}")
    exp = ensure_experiment(client, "kept", None)
    create_sqlite_store(f"sqlite:///{db}")
    assert MlflowClient(f"sqlite:///{db}").get_experiment(exp).name == "kept"
