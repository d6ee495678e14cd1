"""`make lab` starts JupyterLab on 127.0.0.1: start it headless, get 200 from /lab, stop it."""
import socket
import subprocess
import time
import urllib.request

from conftest import BIN, ROOT


def test_jupyterlab_serves_lab(tmp_path, env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    p = subprocess.Popen([str(BIN / "jupyter"), "lab", "--ip", "127.0.0.1", "--port", str(port), "--no-browser",
                          "--ServerApp.token=", "--ServerApp.password=", f"--notebook-dir={ROOT}", "--allow-root"],
                         env=dict(env, JUPYTER_RUNTIME_DIR=str(tmp_path)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, status = time.time() + 90, None
        while time.time() < deadline and status != 200:
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
            try: status = urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=5).status
            except OSError: time.sleep(0.5)
        assert status == 200
    finally:
        p.terminate(); p.wait(timeout=30)
