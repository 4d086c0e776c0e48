"""Quick start, operator path: a one-node cluster on this machine (scripts/cluster.sh:
kube-apiserver, scheduler, kubelet, containerd) and a local Prefect server; one YAML
declares the work pool, the deployment and the agent (PrefectWorkPool, PrefectDeployment,
PrefectAgent), as a Git folder synced by Argo CD would; the operator creates the pool and
the deployment in Prefect and runs the agent; a flow run becomes a Job whose pod pulls the
flow's code with Prefect's git_clone step and runs it in the Prefect image built here; the
run is COMPLETED; `kubectl get pods`, the pod's logs and `kubectl get pfwp,pfd,pfa` show it.

Where this machine cannot run a node (scripts/cluster.sh check says why), the API server
runs alone and the dev job runner executes each Job's command as a local process instead.

Run through scripts/quickstart.sh, which installs Prefect, the cluster and the images and
builds the binary.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from qs_common import (REPO, VENV, call, clean_env, follow_run, free_port, print_logs,
                       serve_flows_repo, start_prefect_server, step, stop)

BIN = Path(os.environ["PAO_AGENT_BIN"])
REAL_NODE = os.environ.get("PAO_QUICKSTART_NODE") == "1"
POOL = "quickstart-k8s"

# What a Git folder synced by Argo CD would hold: the pool, the deployment, the agent.
RESOURCES_YAML = """\
apiVersion: prefect.io/v1alpha1
kind: PrefectWorkPool
metadata:
  name: {pool}
  namespace: default
spec:
  api:
    url: {api}
  type: kubernetes                  # Prefect's standard Kubernetes job template
---
apiVersion: prefect.io/v1alpha1
kind: PrefectDeployment
metadata:
  name: hello
  namespace: default
spec:
  api:
    url: {api}
  flowName: hello
  workPoolRef: {{name: {pool}}}
  entrypoint: hello.py:hello
  pullSteps: {pull_steps}
  parameters: {{name: prefect-agent-operator}}
  jobVariables: {job_variables}
---
apiVersion: prefect.io/v1alpha1
kind: PrefectAgent
metadata:
  name: quickstart
  namespace: default
spec:
  api:
    url: {api}
    workPoolRef: {{name: {pool}}}
  pollInterval: 2s
  envVars:
    GREETING_SOURCE: operator
  job:
    ttlSecondsAfterFinished: 3600   # Prefect's standard template keeps finished Jobs
"""


def kubectl(kubeconfig: Path, *args: str, check: bool = True) -> str:
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def wait(what: str, cond, timeout: float = 60) -> None:
    import time
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.3)


def main() -> None:
    kube_dir = Path(tempfile.mkdtemp(prefix="pao-quickstart-kube-"))
    server = operator = runner = daemon = None
    cluster = ["bash", str(REPO / "scripts/cluster.sh")]
    try:
        if REAL_NODE:
            step(f"Starting a one-node cluster: API server, scheduler, containerd, kubelet ({kube_dir})")
            subprocess.run(cluster + ["start", str(kube_dir)], check=True, stdout=subprocess.DEVNULL)
            step("Importing the Prefect 3 image built here into the node")
            subprocess.run(cluster + ["load", str(kube_dir), "flow"], check=True)
            env_file = dict(line.split("=", 1) for line in (kube_dir / "env").read_text().split())
            host = env_file["PAO_NODE_HOST_IP"]  # the host as pods see it
            image = subprocess.run(["bash", str(REPO / "scripts/images.sh"), "ref", "flow"],
                                   capture_output=True, text=True, check=True).stdout.strip()
        else:
            step(f"Starting kube-apiserver + etcd on loopback ({kube_dir}); no node can run here")
            subprocess.run(["bash", str(REPO / "scripts/kube-apiserver.sh"), "start", str(kube_dir)],
                           check=True, stdout=subprocess.DEVNULL)
            host = "127.0.0.1"
        server, api, _ = start_prefect_server(host)
        kubeconfig = kube_dir / "kubeconfig"
        env = dict(clean_env(), KUBECONFIG=str(kubeconfig), PATH=f"{VENV}/bin:" + os.environ.get("PATH", ""))

        if REAL_NODE:
            daemon, repo = serve_flows_repo(host)
            print(f"examples/flows is served at {repo}; the pod clones it (Prefect's git_clone step)")
            pull_steps = [{"prefect.deployments.steps.git_clone": {"repository": repo}}]
            job_variables = {"image": image}
        else:
            # The dev job runner's processes read this checkout.
            flows_dir = str(REPO / "examples/flows")
            pull_steps = [{"prefect.deployments.steps.set_working_directory": {"directory": flows_dir}}]
            job_variables = {}

        step("Starting the operator (it installs its CRDs)" + ("" if REAL_NODE else " and the dev job runner"))
        health = f"127.0.0.1:{free_port()}"
        operator = subprocess.Popen([str(BIN), "operator", "--install-crd", "--health-address", health], env=env)
        if not REAL_NODE:
            print("(the dev job runner plays the kubelet: it runs each Job's command as a local process)")
            runner = subprocess.Popen([str(BIN), "dev-runner"], env=env)
        wait("the CRDs", lambda: "prefectdeployments.prefect.io" in kubectl(kubeconfig, "get", "crd", check=False))
        for crd in ["prefectagents", "prefectworkpools", "prefectdeployments"]:
            kubectl(kubeconfig, "wait", "--for=condition=Established", f"crd/{crd}.prefect.io", "--timeout=60s")

        step("kubectl apply -f - <<EOF (a PrefectWorkPool, a PrefectDeployment, a PrefectAgent)")
        manifest = RESOURCES_YAML.format(api=api, pool=POOL, pull_steps=json.dumps(pull_steps),
                                         job_variables=json.dumps(job_variables))
        print(manifest)
        subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", "apply", "-f", "-"], input=manifest,
                       text=True, check=True)
        print(kubectl(kubeconfig, "wait", "--for=condition=Ready", f"pfwp/{POOL}", "pfd/hello",
                      "pfa/quickstart", "--timeout=120s"))
        print(kubectl(kubeconfig, "get", "pfwp,pfd"))
        dep = kubectl(kubeconfig, "get", "pfd", "hello", "-o", "jsonpath={.status.deploymentId}")
        print(f"the operator created work pool '{POOL}' and deployment hello/hello ({dep}) in Prefect")

        run = call(api, "POST", f"/deployments/{dep}/create_flow_run", {})
        print(f"flow run {run['name']} ({run['id']}) is {run['state']['type']}")
        state = follow_run(api, run)
        # The flow ships its last log lines just after its final state.
        wait("the flow's greeting in Prefect", lambda: state != "COMPLETED" or any(
            "Hello" in line["message"] for line in call(api, "POST", "/logs/filter", {
                "logs": {"flow_run_id": {"any_": [run["id"]]}}})), timeout=20)
        print_logs(api, run)
        job = f"prefect-run-{run['id']}"
        step("kubectl get jobs,pods")
        wait("the Job to finish", lambda: "1/1" in kubectl(kubeconfig, "get", "job", job, check=False)
             or state != "COMPLETED", timeout=30)
        print(kubectl(kubeconfig, "get", "jobs,pods", "-o", "wide"))
        if REAL_NODE:
            step(f"kubectl logs job/{job}")
            print(kubectl(kubeconfig, "logs", f"job/{job}", check=False))
        step("kubectl get pfa")
        # The status is refreshed every few seconds.
        wait("the PrefectAgent's count", lambda: state != "COMPLETED" or kubectl(
            kubeconfig, "get", "pfa", "quickstart", "-o", "jsonpath={.status.runsSubmitted}/{.status.activeJobs}")
            == "1/0", timeout=60)
        print(kubectl(kubeconfig, "get", "pfa"))
        step(f"Result: flow run {run['name']} is {state}" + (" (in a real pod)" if REAL_NODE else " (dev job runner)"))
        if state != "COMPLETED":
            sys.exit(1)
    finally:
        stop(runner)
        stop(operator)
        stop(daemon)
        stop(server)
        if REAL_NODE:
            subprocess.run(cluster + ["stop", str(kube_dir)])
        else:
            subprocess.run(["bash", str(REPO / "scripts/kube-apiserver.sh"), "stop", str(kube_dir)])


if __name__ == "__main__":
    main()
