"""Quick start, process path: a local Prefect server, the example flow deployed to a
process work pool, the agent launching its run as a local process, run COMPLETED.

Run through scripts/quickstart-process.sh, which installs Prefect and builds the agent.
"""

import os
import subprocess
import time
from pathlib import Path

from qs_common import VENV, call, clean_env, deploy_hello, follow_run, print_logs, start_prefect_server, step, stop

AGENT = Path(os.environ["PAO_AGENT_BIN"])
POOL = "quickstart"


def main() -> None:
    server, api, _ = start_prefect_server()
    agent = None
    try:
        dep = deploy_hello(api, POOL, "process", {})
        run = call(api, "POST", f"/deployments/{dep}/create_flow_run", {})
        print(f"flow run {run['name']} ({run['id']}) is {run['state']['type']}")

        step("Starting the agent (process deployer)")
        cmd = [str(AGENT), "agent", "--api-url", api, "--pool", POOL, "--name", "quickstart-agent",
               "--command", f"{VENV}/bin/prefect flow-run execute", "--env", "GREETING_SOURCE=agent"]
        print("$ " + " ".join(cmd), flush=True)
        env = clean_env()
        agent = subprocess.Popen(cmd, env=dict(env, PATH=f"{VENV}/bin:" + env.get("PATH", "")))
        state = follow_run(api, run)
        # The flow process ships its last logs after its final state; let it exit first.
        infra = call(api, "GET", f"/flow_runs/{run['id']}").get("infrastructure_pid") or ""
        pid = infra.rsplit(":", 1)[-1]
        deadline = time.time() + 30
        while pid.isdigit() and time.time() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
        print_logs(api, run)
        step(f"Result: flow run {run['name']} is {state}")
        if state != "COMPLETED":
            raise SystemExit(1)
    finally:
        stop(agent)
        stop(server)


if __name__ == "__main__":
    main()
