"""Quick start, operator path: a local Prefect server and a local kube-apiserver; the
operator runs a PrefectAgent resource; its run becomes a Job; the dev job runner (no
kubelet here) executes the Job's command; the run is COMPLETED; `kubectl get pfa` shows it.

Run through scripts/quickstart.sh, which installs Prefect and the API server and builds
the binary.
"""

import json
import os
import subprocess
import tempfile
from pathlib import Path

from qs_common import REPO, VENV, call, clean_env, deploy_hello, free_port, follow_run, print_logs, start_prefect_server, step, stop

BIN = Path(os.environ["PAO_AGENT_BIN"])
POOL = "quickstart-k8s"

AGENT_YAML = """\
apiVersion: prefect.io/v1alpha1
kind: PrefectAgent
metadata:
  name: quickstart
  namespace: default
spec:
  api:
    url: {api}
    workPool: {pool}
  pollInterval: 2s
  envVars:
    GREETING_SOURCE: operator
"""


def kubectl(kubeconfig: Path, *args: str, check: bool = True) -> str:
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def main() -> None:
    kube_dir = Path(tempfile.mkdtemp(prefix="pao-quickstart-kube-"))
    server, api, _ = start_prefect_server()
    operator = runner = None
    try:
        step(f"Starting kube-apiserver + etcd on loopback ({kube_dir})")
        subprocess.run(["bash", str(REPO / "scripts/kube-apiserver.sh"), "start", str(kube_dir)],
                       check=True, stdout=subprocess.DEVNULL)
        kubeconfig = kube_dir / "kubeconfig"
        env = dict(clean_env(), KUBECONFIG=str(kubeconfig), PATH=f"{VENV}/bin:" + os.environ.get("PATH", ""))

        template = json.loads((REPO / "src/deploy/kubernetes/default-base-job-template.json").read_text())
        dep = deploy_hello(api, POOL, "kubernetes", template)

        step("Starting the operator (it installs its CRD) and the dev job runner")
        health = f"127.0.0.1:{free_port()}"
        operator = subprocess.Popen([str(BIN), "operator", "--install-crd", "--health-address", health],
                                    env=env)
        runner = subprocess.Popen([str(BIN), "dev-runner"], env=env)
        for _ in range(100):
            if "prefectagents.prefect.io" in kubectl(kubeconfig, "get", "crd", check=False):
                break
            subprocess.run(["sleep", "0.2"])
        kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/prefectagents.prefect.io", "--timeout=60s")

        step("kubectl apply -f - <<EOF (a PrefectAgent)")
        manifest = AGENT_YAML.format(api=api, pool=POOL)
        print(manifest)
        subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "apply", "-f", "-"], input=manifest,
                       text=True, check=True)
        print(kubectl(kubeconfig, "wait", "--for=condition=Ready", "pfa/quickstart", "--timeout=90s"))

        run = call(api, "POST", f"/deployments/{dep}/create_flow_run", {})
        print(f"flow run {run['name']} ({run['id']}) is {run['state']['type']}")
        state = follow_run(api, run)
        subprocess.run(["sleep", "1"])  # the flow ships its last log lines just after its final state
        print_logs(api, run)
        step("kubectl get jobs,pfa")
        for _ in range(30):  # the dev runner writes the Job's status when the process exits
            jobs = kubectl(kubeconfig, "get", "jobs")
            if "1/1" in jobs:
                break
            subprocess.run(["sleep", "0.5"])
        print(jobs)
        for _ in range(30):  # the status is refreshed every few seconds
            out = kubectl(kubeconfig, "get", "pfa")
            if state != "COMPLETED" or out.split()[-2] != "0":
                break
            subprocess.run(["sleep", "1"])
        print(out)
        step(f"Result: flow run {run['name']} is {state}")
        if state != "COMPLETED":
            raise SystemExit(1)
    finally:
        stop(runner)
        stop(operator)
        subprocess.run(["bash", str(REPO / "scripts/kube-apiserver.sh"), "stop", str(kube_dir)])
        stop(server)


if __name__ == "__main__":
    main()
