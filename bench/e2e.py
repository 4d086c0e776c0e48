#!/usr/bin/env python3
"""End to end on a real node: flow run scheduled -> pod Running -> flow RUNNING in Prefect.

Starts the one-node cluster (scripts/cluster.sh), a Prefect server on the address pods
reach, and a git daemon the pods clone the flow from, then runs the same deployment
(Prefect's standard Kubernetes template, the Prefect 3.9.1 image built here) one run at a
time through:
  - this operator (a PrefectAgent, events on);
  - Prefect's official worker (`prefect worker start --type kubernetes`, default settings);
  - the node's own floor: the same Job the operator builds, created directly through the
    API server for a run nobody else picks up (`prefect flow-run execute` in it).
For each run: scheduled (created) -> Job created -> pod Running (seen on a pod watch) ->
flow RUNNING (the state's own timestamp in Prefect). Prints a table and writes
bench/results/e2e.{json,md}. Run through bench/e2e.sh (bench/run.sh runs it too).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench import (REPO, Kube, Operator, Prefect, Worker, kubernetes_template, log, online,  # noqa: E402
                   percentile, wait_until)
from qs_common import serve_flows_repo  # noqa: E402


class Node(Kube):
    """scripts/cluster.sh start/stop; kubectl and namespaces as bench.py's Kube."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="pao-bench-node-"))
        subprocess.run(["bash", str(REPO / "scripts/cluster.sh"), "start", str(self.dir)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["bash", str(REPO / "scripts/cluster.sh"), "load", str(self.dir), "flow"], check=True)
        self.kubeconfig = str(self.dir / "kubeconfig")
        env = dict(line.split("=", 1) for line in (self.dir / "env").read_text().split())
        self.host_ip = env["PAO_NODE_HOST_IP"]

    def stop(self):
        subprocess.run(["bash", str(REPO / "scripts/cluster.sh"), "stop", str(self.dir)])


class PodWatch:
    """`kubectl get jobs,pods -w` on a namespace: when each run's Job appeared and its pod
    was first seen Running (local monotonic time of the watch event)."""

    def __init__(self, node, namespace):
        self.job_added, self.pod_running = {}, {}
        self.lock = threading.Lock()
        self.procs = []
        for kind, field in (("jobs", "{.type}"), ("pods", "{.object.status.phase}")):
            p = subprocess.Popen(
                ["kubectl", "--kubeconfig", node.kubeconfig, "get", kind, "-n", namespace, "-w",
                 "--output-watch-events", "-o",
                 f"jsonpath={field} {{.object.metadata.labels.prefect\\.io/flow-run-id}}{{\"\\n\"}}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.procs.append(p)
            threading.Thread(target=self._read, args=(p, kind), daemon=True).start()

    def _read(self, p, kind):
        for line in p.stdout:
            now = time.time()
            parts = line.split()
            if len(parts) != 2:
                continue
            what, run = parts
            with self.lock:
                if kind == "jobs" and what == "ADDED":
                    self.job_added.setdefault(run, now)
                elif kind == "pods" and what == "Running":
                    self.pod_running.setdefault(run, now)

    def times(self, run):
        with self.lock:
            return self.job_added.get(run), self.pod_running.get(run)

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


def running_at(prefect, run):
    """When Prefect recorded the run RUNNING (epoch seconds), or None."""
    for s in prefect.call("GET", f"/flow_run_states/?flow_run_id={run}"):
        if s["type"] == "RUNNING":
            return datetime.fromisoformat(s["timestamp"].replace("Z", "+00:00")).timestamp()
    return None


def one_run(prefect, watch, create, label, timeout=180):
    """One run created by `create()` (returns (run id, created at)), followed until final."""
    run, created = create()
    wait_until(f"{label} run {run} RUNNING", timeout, lambda: running_at(prefect, run), 0.2)
    wait_until(f"{label} run {run} pod seen Running", 30, lambda: watch.times(run)[1], 0.1)
    job, pod = watch.times(run)
    flow = running_at(prefect, run)
    row = {"run": run, "scheduled_to_job": job - created, "job_to_pod_running": pod - job,
           "job_to_flow_running": flow - job, "scheduled_to_flow_running": flow - created}
    log(f"{label}: Job {row['scheduled_to_job']:.2f} s after scheduled; pod Running "
        f"+{row['job_to_pod_running']:.2f} s; flow RUNNING +{row['job_to_flow_running']:.2f} s")
    # The run ends before the next starts, so that runs never share the node.
    wait_until(f"{label} run {run} final", timeout, lambda: prefect.call("GET", f"/flow_runs/{run}")[
        "state_type"] in ("COMPLETED", "FAILED", "CRASHED"), 0.3)
    return row


KEYS = ("scheduled_to_job", "job_to_pod_running", "scheduled_to_pod_running", "job_to_flow_running",
        "scheduled_to_flow_running")


def summary(rows):
    out = {}
    for key in KEYS:
        values = [r[key] for r in rows]
        out[key] = {"p50": round(percentile(values, 50), 3), "p90": round(percentile(values, 90), 3),
                    "mean": round(statistics.mean(values), 3)}
    return out


def report(results, out):
    """Summaries, the table and the files, from the runs' rows."""
    rows = results["rows"]
    for name in ("operator", "floor", "worker"):
        for r in rows[name]:
            r["scheduled_to_pod_running"] = r["scheduled_to_job"] + r["job_to_pod_running"]
            if name == "floor":  # its Job is created at the moment it is scheduled
                r["scheduled_to_pod_running"] = r["job_to_pod_running"]
                r["scheduled_to_flow_running"] = r["job_to_flow_running"]
        results[name] = summary(rows[name])
    p50 = {name: {k: results[name][k]["p50"] for k in results[name]} for name in ("operator", "floor")}
    to_pod = p50["operator"]["scheduled_to_pod_running"] - p50["floor"]["scheduled_to_pod_running"]
    to_flow = p50["operator"]["scheduled_to_flow_running"] - p50["floor"]["scheduled_to_flow_running"]
    results["operator_over_floor_p50"] = {"pod_running": round(to_pod, 3), "flow_running": round(to_flow, 3)}
    lines = [
        "| runner | scheduled → Job | scheduled → pod Running | Job → flow RUNNING | scheduled → flow RUNNING |",
        "|---|---|---|---|---|",
    ]

    def cell(r, key):
        return f"{r[key]['p50']:.3f} / {r[key]['p90']:.3f} s"

    events = "events" if results.get("events", True) else "polling only"
    for name, label in (("floor", "the node's floor (the Job created directly)"),
                        ("operator", f"this operator ({events})"), ("worker", "official worker (defaults)")):
        r = results[name]
        first = "0 (by hand)" if name == "floor" else cell(r, "scheduled_to_job")
        lines.append(f"| {label} | {first} | {cell(r, 'scheduled_to_pod_running')} | "
                     f"{cell(r, 'job_to_flow_running')} | {cell(r, 'scheduled_to_flow_running')} |")
    n = len(rows["operator"])
    lines.append(f"\np50 / p90 of {n} runs each, one at a time, taking turns. This operator over the floor, "
                 f"p50: {to_pod * 1000:+.0f} ms to pod Running, {to_flow * 1000:+.0f} ms to flow RUNNING "
                 f"(target ≤ +100 ms).")
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(results, indent=1))
    (out / "e2e.md").write_text(text + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(REPO / "target/release/prefect-agent-operator"))
    ap.add_argument("--venv", required=True)
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--runs", type=int, default=12, help="runs per runner, one at a time")
    ap.add_argument("--report", metavar="JSON", help="only print the table of an earlier e2e.json")
    ap.add_argument("--no-events", action="store_true",
                    help="the PrefectAgent polls only (api.events: false), to see what the stream costs")
    args = ap.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()), Path(args.out))
        return

    node = Node()
    prefect = daemon = operator = worker = None
    watches = []
    try:
        prefect = Prefect(args.venv, host=node.host_ip)
        daemon, repo = serve_flows_repo(node.host_ip)
        image = subprocess.run(["bash", str(REPO / "scripts/images.sh"), "ref", "flow"], check=True,
                               capture_output=True, text=True).stdout.strip()
        template = kubernetes_template(args.venv)
        results = {"runs": args.runs, "image": image, "machine": os.uname().nodename}

        def deployment(pool, ns):
            flow = prefect.call("POST", "/flows/", {"name": "hello"})
            return prefect.call("POST", "/deployments/", {
                "name": f"e2e-{pool}", "flow_id": flow["id"], "work_pool_name": pool,
                "entrypoint": "hello.py:hello",
                "pull_steps": [{"prefect.deployments.steps.git_clone": {"repository": repo}}],
                "job_variables": {"image": image, "namespace": ns}})["id"]

        def created_run(dep):
            return lambda: (prefect.run(dep), time.time())

        # This operator and the official worker, each on a pool and namespace of its own;
        # the floor: the operator's own Job for a run of a pool nobody serves, created
        # directly. Runs go one at a time, taking turns, so that drift hits all three alike.
        ns = node.namespace("e2e-op")
        wns = node.namespace("e2e-worker")
        watch, wwatch = PodWatch(node, ns), PodWatch(node, wns)
        watches += [watch, wwatch]
        pool = prefect.pool(f"e2e-op-{uuid.uuid4().hex[:6]}", template=template)
        floor_pool = prefect.pool(f"e2e-floor-{uuid.uuid4().hex[:6]}", template=template)
        wpool = prefect.pool(f"e2e-worker-{uuid.uuid4().hex[:6]}", template=template)
        dep, floor_dep, wdep = deployment(pool, ns), deployment(floor_pool, ns), deployment(wpool, wns)
        operator = Operator(args.binary, node, ns)
        operator.agents(prefect.url, pool, ["e2e"], events=not args.no_events)
        wait_until("the PrefectAgent registered", 60, lambda: operator.ready_agents() == 1, 0.3)
        worker = Worker(args.venv, node, prefect.url, wpool)
        online(prefect, wpool)
        # One warm-up run: the first pod start pays for the image's first unpack.
        first = one_run(prefect, watch, created_run(dep), "warm-up")
        sample = json.loads(node.kubectl("get", "job", f"prefect-run-{first['run']}", "-n", ns, "-o", "json"))

        def floor_run():
            run = prefect.run(floor_dep)
            spec = json.loads(json.dumps(sample["spec"]))
            spec.pop("selector", None)
            spec["template"]["metadata"] = {"labels": {"prefect.io/flow-run-id": run}}
            for c in spec["template"]["spec"]["containers"]:
                for e in c.get("env", []):
                    if e["name"] == "PREFECT__FLOW_RUN_ID":
                        e["value"] = run
            job = {"apiVersion": "batch/v1", "kind": "Job", "spec": spec,
                   "metadata": {"name": f"floor-{run}", "namespace": ns, "labels": {"prefect.io/flow-run-id": run}}}
            created = time.time()
            node.kubectl("create", "-f", "-", input=json.dumps(job))
            return run, created

        op_rows, floor_rows, worker_rows = [], [], []
        for i in range(args.runs):
            log(f"round {i + 1}/{args.runs}")
            op_rows.append(one_run(prefect, watch, created_run(dep), "operator"))
            floor_rows.append(one_run(prefect, watch, floor_run, "floor"))
            worker_rows.append(one_run(prefect, wwatch, created_run(wdep), "worker"))

        results["rows"] = {"operator": op_rows, "floor": floor_rows, "worker": worker_rows}
        results["events"] = not args.no_events
        report(results, Path(args.out))
    finally:
        for w in watches:
            w.stop()
        for p in (operator, worker):
            if p:
                p.stop()
        if daemon:
            daemon.kill()
        if prefect:
            prefect.proc.stop()
        node.stop()


if __name__ == "__main__":
    main()
