"""`make lab` the way the README says: JupyterLab on 127.0.0.1 with token auth, as root or as a user."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from conftest import ROOT


def _get(url):
    try: return urllib.request.urlopen(url, timeout=5).status
    except urllib.error.HTTPError as e: return e.code


def test_make_lab_serves_lab_with_token_auth(tmp_path, env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    runtime = tmp_path / "runtime"
    p = subprocess.Popen(["make", "lab", f"LAB_ARGS=--port {port}"], cwd=ROOT, start_new_session=True,
                         env=dict(env, JUPYTER_RUNTIME_DIR=str(runtime)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, info = time.time() + 120, None
        while time.time() < deadline and info is None:
            assert p.poll() is None, p.stderr.read().decode()[-2000:]  # e.g. "Running as root is not recommended"
            files = sorted(runtime.glob("jpserver-*.json")) if runtime.exists() else []
            info = json.loads(files[0].read_text()) if files else None
            time.sleep(0.5)
        assert info is not None, "no server info file written"
        assert info["port"] == port and info["hostname"] in ("127.0.0.1", "localhost") and info["token"]
        status = None
        while time.time() < deadline and status != 200:
            try: status = _get(f"http://127.0.0.1:{port}/lab?token={info['token']}")
            except OSError: time.sleep(0.5)
        assert status == 200
        assert _get(f"http://127.0.0.1:{port}/api/contents") == 403  # no token, no access
    finally:
        os.killpg(p.pid, signal.SIGTERM); p.wait(timeout=60)
