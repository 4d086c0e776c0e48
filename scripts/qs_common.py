"""Shared by the quick starts: a local Prefect server and a retrying JSON client."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(api: str, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(30):
        req = urllib.request.Request(api + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            if e.code != 503:  # SQLite busy: retry
                raise SystemExit(f"{method} {path}: HTTP {e.code}: {e.read().decode()[:300]}")
        except urllib.error.URLError:
            pass
        time.sleep(0.2 * (attempt + 1))
    raise SystemExit(f"{method} {path}: no answer")


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}


def start_prefect_server(host: str = "127.0.0.1"):
    """Starts `prefect server` on a free port of `host`; returns (process, api url, home dir)."""
    home = Path(tempfile.mkdtemp(prefix="pao-quickstart-"))
    port = free_port()
    api = f"http://{host}:{port}/api"
    env = dict(clean_env(), PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false")
    step(f"Starting a local Prefect server at {api} (log: {home}/server.log)")
    log = open(home / "server.log", "w")
    server = subprocess.Popen([str(VENV / "bin/prefect"), "server", "start", "--host", host,
                               "--port", str(port)], env=env, stdout=log, stderr=log)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(api + "/health", timeout=2) as r:
                if r.read().strip() == b"true":
                    return server, api, home
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.time() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit(f"the Prefect server did not start; see {home}/server.log")
        time.sleep(0.3)


def deploy_hello(api: str, pool: str, pool_type: str, template: dict, pull_steps=None,
                 job_variables=None) -> str:
    """Creates `pool` and a deployment of examples/flows/hello.py:hello; returns its id.
    By default the code is pulled from this checkout (a local process can read it)."""
    step(f"Deploying examples/flows/hello.py:hello to work pool '{pool}' ({pool_type})")
    call(api, "POST", "/work_pools/", {"name": pool, "type": pool_type, "base_job_template": template})
    flow = call(api, "POST", "/flows/", {"name": "hello"})
    flows_dir = str(REPO / "examples/flows")
    dep = call(api, "POST", "/deployments/", {
        "name": f"hello-{pool}", "flow_id": flow["id"], "work_pool_name": pool,
        "entrypoint": "hello.py:hello",
        "pull_steps": pull_steps or [{"prefect.deployments.steps.set_working_directory": {"directory": flows_dir}}],
        "parameters": {"name": "prefect-agent-operator"},
        "job_variables": job_variables or {},
    })
    return dep["id"]


def serve_flows_repo(host: str):
    """examples/flows as a git repository served by `git daemon` on `host` (what pods reach),
    so that a deployment pulls it with Prefect's git_clone step; returns (process, url)."""
    base = Path(tempfile.mkdtemp(prefix="pao-quickstart-flows-"))
    work = base / "work"
    work.mkdir()
    (work / "hello.py").write_text((REPO / "examples/flows/hello.py").read_text())
    git = ["git", "-c", "user.name=quickstart", "-c", "user.email=quickstart@localhost"]
    for args, cwd in ((["init", "-q", "-b", "main"], work), (["add", "."], work),
                      (["commit", "-q", "-m", "flows"], work), (["clone", "-q", "--bare", "work", "flows.git"], base)):
        subprocess.run(git + args, cwd=cwd, check=True)
    port = free_port()
    daemon = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--listen={host}",
                               f"--port={port}", f"--base-path={base}", str(base)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return daemon, f"git://{host}:{port}/flows.git"
        except OSError:
            time.sleep(0.1)
    daemon.kill()
    raise SystemExit("git daemon did not start")


def follow_run(api: str, run: dict, timeout: float = 180) -> str:
    """Prints the run's state changes until it is final; returns the final state."""
    deadline = time.time() + timeout
    state = None
    while time.time() < deadline:
        current = call(api, "GET", f"/flow_runs/{run['id']}")["state"]
        if current["type"] != state:
            state = current["type"]
            print(f"flow run {run['name']}: {state}", flush=True)
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return state
        time.sleep(0.5)
    return state or "UNKNOWN"


def print_logs(api: str, run: dict) -> None:
    logs = call(api, "POST", "/logs/filter",
                {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC"})
    step("The run's logs in Prefect")
    for line in logs:
        print(f"  [{line['name']}] {line['message']}")


def stop(proc) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
