"""How long the operator takes to sync PrefectDeployments, at 10 and at 100 in one
namespace: from `kubectl apply` of N resources to all of them Ready (deployment created
in Prefect, its runs scheduled), against a real Prefect server and kube-apiserver.
Prints a table and writes bench/results/sync.json.

  bash scripts/kube-apiserver.sh install && cargo build --release
  $(bash scripts/setup-prefect.sh)/bin/python bench/sync.py [--sizes 10,100]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from qs_common import REPO, call, clean_env, free_port, start_prefect_server, stop  # noqa: E402

BIN = REPO / "target/release/prefect-agent-operator"


def kubectl(kubeconfig, *args, stdin=None):
    out = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), *args], input=stdin,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {out.stderr}")
    return out.stdout


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ready_count(kubeconfig, ns: str) -> int:
    items = json.loads(kubectl(kubeconfig, "get", "pfd", "-n", ns, "-o", "json"))["items"]
    n = 0
    for d in items:
        for c in (d.get("status") or {}).get("conditions", []):
            if c["type"] == "Ready" and c["status"] == "True":
                n += 1
    return n


def one_size(kubeconfig, api: str, n: int) -> dict:
    ns = f"sync-{n}-{int(time.time())}"
    kubectl(kubeconfig, "create", "namespace", ns)
    pool = f"bench-{ns}"
    call(api, "POST", "/work_pools/", {"name": pool, "type": "kubernetes"})
    health = f"127.0.0.1:{free_port()}"
    env = dict(clean_env(), KUBECONFIG=str(kubeconfig))
    operator = subprocess.Popen([str(BIN), "operator", "--namespace", ns, "--health-address", health],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)  # not measured: the operator's start-up
        docs = []
        for i in range(n):
            docs.append(({
                "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectDeployment",
                "metadata": {"name": f"d{i}", "namespace": ns},
                "spec": {"api": {"url": api}, "flowName": f"flow-{i % 10}", "workPool": pool,
                         "parameters": {"i": i}, "schedules": [{"interval": 3600}]},
            }))
        start = time.time()
        kubectl(kubeconfig, "apply", "-f", "-",
                stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        while ready_count(kubeconfig, ns) < n:
            if time.time() - start > 600:
                raise SystemExit(f"{n} PrefectDeployments not Ready within 600 s")
            time.sleep(0.25)
        took = time.time() - start
        rss = rss_mib(operator.pid)
        made = call(api, "POST", "/deployments/count",
                    {"work_pools": {"name": {"any_": [pool]}}})
        runs = call(api, "POST", "/flow_runs/count", {"work_pools": {"name": {"any_": [pool]}}})
        return {"resources": n, "seconds": round(took, 2), "per_resource_ms": round(took / n * 1000, 1),
                "deployments_in_prefect": made, "scheduled_runs_in_prefect": runs,
                "operator_rss_mib": round(rss, 1)}
    finally:
        stop(operator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,100")
    args = parser.parse_args()
    if not BIN.exists():
        raise SystemExit("build first: cargo build --release")
    kube_dir = Path(tempfile.mkdtemp(prefix="pao-bench-sync-"))
    subprocess.run(["bash", str(REPO / "scripts/kube-apiserver.sh"), "start", str(kube_dir)],
                   check=True, stdout=subprocess.DEVNULL)
    kubeconfig = kube_dir / "kubeconfig"
    server = None
    try:
        server, api, _ = start_prefect_server()
        env = dict(clean_env(), KUBECONFIG=str(kubeconfig))
        # Install the CRDs the way a user does.
        crds = subprocess.run([str(BIN), "crdgen"], capture_output=True, text=True, check=True, env=env).stdout
        kubectl(kubeconfig, "apply", "--server-side", "-f", "-", stdin=crds)
        kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/prefectdeployments.prefect.io",
                "--timeout=60s")
        rows = [one_size(kubeconfig, api, int(n)) for n in args.sizes.split(",")]
    finally:
        stop(server)
        subprocess.run(["bash", str(REPO / "scripts/kube-apiserver.sh"), "stop", str(kube_dir)],
                       stdout=subprocess.DEVNULL)
    print("| PrefectDeployments | apply → all Ready | per resource | in Prefect | their runs | operator RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resources']} | {r['seconds']} s | {r['per_resource_ms']} ms | "
              f"{r['deployments_in_prefect']} | {r['scheduled_runs_in_prefect']} | {r['operator_rss_mib']} MiB |")
    out = REPO / "bench/results/sync.json"
    out.write_text(json.dumps({"setup": "one SQLite Prefect 3.9.1 server, kube-apiserver 1.20 on loopback, "
                               "release build, sync controllers at their defaults", "rows": rows}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
