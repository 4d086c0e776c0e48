"""Quick start: a local Prefect server, the example flow deployed to a work pool, the
agent with the process deployer, and one flow run followed until it is COMPLETED.

Run through scripts/quickstart.sh, which installs Prefect and builds the agent first.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AGENT = Path(os.environ["PAO_AGENT_BIN"])
VENV = Path(sys.prefix)
POOL = "quickstart"


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


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="pao-quickstart-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT")}
    server_env = dict(env, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_SERVER_UI_ENABLED="false")

    step(f"Starting a local Prefect server at {api} (log: {home}/server.log)")
    log = open(home / "server.log", "w")
    server = subprocess.Popen([str(VENV / "bin/prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=server_env, stdout=log, stderr=log)
    agent = None
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(api + "/health", timeout=2) as r:
                    if r.read().strip() == b"true":
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit(f"the Prefect server did not start; see {home}/server.log")
            time.sleep(0.3)

        step(f"Deploying examples/flows/hello.py:hello to work pool '{POOL}'")
        call(api, "POST", "/work_pools/", {"name": POOL, "type": "process", "base_job_template": {}})
        flow = call(api, "POST", "/flows/", {"name": "hello"})
        flows_dir = str(REPO / "examples/flows")
        dep = call(api, "POST", "/deployments/", {
            "name": "hello-quickstart", "flow_id": flow["id"], "work_pool_name": POOL,
            "entrypoint": "hello.py:hello", "path": flows_dir,
            "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": flows_dir}}],
            "parameters": {"name": "prefect-agent-operator"},
        })
        run = call(api, "POST", f"/deployments/{dep['id']}/create_flow_run", {})
        print(f"flow run {run['name']} ({run['id']}) is {run['state']['type']}")

        step("Starting the agent (process deployer)")
        cmd = [str(AGENT), "agent", "--api-url", api, "--pool", POOL, "--name", "quickstart-agent",
               "--command", f"{VENV}/bin/prefect flow-run execute", "--env", "GREETING_SOURCE=agent"]
        print("$ " + " ".join(cmd), flush=True)
        agent = subprocess.Popen(cmd, env=dict(env, PATH=f"{VENV}/bin:" + env.get("PATH", "")))

        deadline = time.time() + 180
        state = None
        while time.time() < deadline:
            current = call(api, "GET", f"/flow_runs/{run['id']}")["state"]
            if current["type"] != state:
                state = current["type"]
                print(f"flow run {run['name']}: {state}", flush=True)
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(0.5)
        # The flow process ships its last logs after its final state; let it exit first.
        infra = call(api, "GET", f"/flow_runs/{run['id']}").get("infrastructure_pid") or ""
        pid = int(infra.rsplit(":", 1)[-1]) if infra.rsplit(":", 1)[-1].isdigit() else None
        deadline = time.time() + 30
        while pid and time.time() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
        logs = call(api, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC"})
        step("The run's logs in Prefect")
        for line in logs:
            print(f"  [{line['name']}] {line['message']}")
        step(f"Result: flow run {run['name']} is {state}")
        if state != "COMPLETED":
            raise SystemExit(1)
    finally:
        if agent and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
