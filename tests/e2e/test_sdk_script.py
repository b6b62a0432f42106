"""A Determined-style SDK script on the real stack: log in, create the digits experiment, wait, download the best
checkpoint (``kiln.experimental.client``, as ``determined.experimental.client`` is used)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, Stack

pytestmark = pytest.mark.e2e

SCRIPT = textwrap.dedent("""\
    import json, os, sys
    from pathlib import Path

    from kiln.experimental import client

    client.login(master=os.environ["KILN_MASTER"], user="admin", password=os.environ["ADMIN_PASSWORD"])
    digits = Path(sys.argv[1])
    exp = client.create_experiment(config=str(digits / "const.yaml"), model_dir=digits)
    state = exp.wait(interval=1)
    best = exp.top_checkpoint()
    path = best.download(sys.argv[2])
    print(json.dumps({"id": exp.id, "state": state.name, "trials": [t.id for t in exp.list_trials()],
                      "uuid": best.uuid, "path": path, "resources": best.resources}))
""")


def test_sdk_script_creates_waits_and_downloads(kiln_stack: Stack, tmp_path: Path) -> None:
    env = {k: v for k, v in kiln_stack.env.items() if k != "KILN_TOKEN"}  # the script signs in itself
    env["ADMIN_PASSWORD"] = kiln_stack.creds.admin_password
    (tmp_path / "sdk.py").write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(tmp_path / "sdk.py"), str(REPO / "examples" / "digits"),
                           str(tmp_path / "best")], env=env, text=True, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["state"] == "COMPLETED" and out["trials"]
    downloaded = {str(p.relative_to(out["path"])) for p in Path(out["path"]).rglob("*") if p.is_file()}
    assert downloaded and set(out["resources"]) <= downloaded
