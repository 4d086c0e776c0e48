#!/usr/bin/env python3
"""Side-by-side benchmark: this operator against Prefect's official Kubernetes worker.

Starts the real test API server (scripts/kube-apiserver.sh) and, for each database
(--databases, default both), a real Prefect server on it: SQLite (Prefect's default) and
PostgreSQL (production's; a server of the benchmark's own, scripts/postgres.sh). On each
it measures:
  - submission latency (run created, due now -> its Job exists): operator with events,
    operator polling only, official worker;
  - burst drain: 500 runs due at once -> all have Jobs, next to a claim-only client (3
    rounds taking turns, the median reported), and what the server (and its database)
    spends in CPU per launched run;
  - idle RSS and CPU of the operator with 1, 100, 1000 PrefectAgents, and of one worker;
  - cancellation latency (CANCELLING -> Job deleted) of a run whose pod never started,
    for both (the worker with PREFECT_WORKER_ENABLE_CANCELLATION=true, off by default).
Prints a table, writes JSON and a PNG plot. Run through bench/run.sh.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(what, timeout, cond, every=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# ---------------------------------------------------------------- processes


class Proc:
    """A child process in its own group, with its output in a file."""

    def __init__(self, args, env=None, log_path=None, cpus=None):
        self.log_path = log_path or tempfile.mktemp(prefix="pao-bench-", suffix=".log")
        self.out = open(self.log_path, "wb")
        self.p = subprocess.Popen(
            args, env=env, stdout=self.out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.started = time.monotonic()

    @property
    def pid(self):
        return self.p.pid

    def pids(self):
        """The process and its descendants."""
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
        children = {}
        for line in out.split("\n"):
            if line.strip():
                pid, ppid = map(int, line.split())
                children.setdefault(ppid, []).append(pid)
        todo, seen = [self.pid], []
        while todo:
            pid = todo.pop()
            seen.append(pid)
            todo.extend(children.get(pid, []))
        return seen

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait()
        self.out.close()


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def cpu_ticks(pid, reaped=False):
    """A process's CPU ticks; with `reaped`, also those of its children that ended and
    were waited for (short-lived PostgreSQL backends, say)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)
    except FileNotFoundError:
        return 0


def idle_cost(proc, settle, window):
    """RSS (MiB, whole process tree) and CPU (% of one core) over `window` seconds."""
    time.sleep(settle)
    pids = proc.pids()
    t0, c0 = time.monotonic(), sum(cpu_ticks(p) for p in pids)
    time.sleep(window)
    pids = proc.pids()
    t1, c1 = time.monotonic(), sum(cpu_ticks(p) for p in pids)
    rss = sum(rss_kib(p) for p in pids) / 1024
    return {"rss_mib": round(rss, 1), "cpu_percent": round(100 * (c1 - c0) / TICK / (t1 - t0), 2)}


class ServerCpu:
    """The Prefect server's CPU use from now until `percent()` (% of one core): its
    processes, and its PostgreSQL server's where it has one. The process trees are read
    again at each reading and ended children count through their parents: a PostgreSQL
    backend lives only as long as its connection, and a Prefect server opens and closes
    connections beyond its pool's five as its load asks."""

    def __init__(self, prefect):
        self.procs = [prefect.proc] + ([prefect.db.proc] if prefect.db else [])
        self.t0, self.c0 = time.monotonic(), self.ticks()

    def ticks(self):
        return sum(cpu_ticks(p, reaped=True) for proc in self.procs for p in proc.pids())

    def seconds(self):
        """CPU-seconds used since the start."""
        return (self.ticks() - self.c0) / TICK

    def percent(self):
        return round(100 * self.seconds() / (time.monotonic() - self.t0), 1)


class ServerProfile:
    """py-spy's samples of the Prefect server from now until `stop()` (collapsed stacks in
    `--profile-server DIR`, one file per part): where the server's time goes. Nothing
    unless asked."""

    def __init__(self, prefect, label):
        self.p = None
        if PROFILE:
            pyspy, out = PROFILE
            path = Path(out) / f"server-{prefect.database}-{label.replace(' ', '-')}.txt"
            self.p = subprocess.Popen([pyspy, "record", "--pid", str(prefect.proc.pid), "--subprocesses", "--format", "raw",
                                       "--rate", "200", "--output", str(path), "--nonblocking"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        if self.p:
            self.p.send_signal(signal.SIGINT)
            self.p.wait(timeout=30)


# ---------------------------------------------------------------- the servers


class Postgres:
    """A PostgreSQL server of the benchmark's own (scripts/postgres.sh run), on loopback."""

    def __init__(self):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pao-bench-postgres-"))
        data = self.dir / "data"
        self.proc = Proc(["bash", str(REPO / "scripts/postgres.sh"), "run", str(data), str(self.port)],
                         log_path=str(self.dir / "postgres.log"), cpus=SERVER_CPUS)
        wait_until("the PostgreSQL server", 120, lambda: (data / "ready").exists(), 0.2)
        self.url = f"postgresql+asyncpg://prefect@127.0.0.1:{self.port}/prefect"

    def stop(self):
        self.proc.stop()


class Prefect:
    """A Prefect server on SQLite (its default), or on PostgreSQL (`database="postgres"`,
    a server of its own started here)."""

    def __init__(self, venv, host="127.0.0.1", database="sqlite"):
        self.port = free_port()
        self.home = Path(tempfile.mkdtemp(prefix="pao-bench-prefect-"))
        self.database = database
        self.db = Postgres() if database == "postgres" else None
        # The late-runs service off: it rewrites every waiting run of a burst as Late and
        # fights the runners for SQLite's lock; the runners are measured, not it.
        env = dict(os.environ, PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_ENABLED="false", PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false")
        env.pop("PREFECT_API_URL", None)
        if self.db:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.db.url
        self.proc = Proc([f"{venv}/bin/prefect", "server", "start", "--host", host,
                          "--port", str(self.port)], env=env, log_path=str(self.home / "server.log"),
                         cpus=SERVER_CPUS)
        self.url = f"http://{host}:{self.port}/api"
        self.http = httpx.Client(base_url=self.url, timeout=60)

        def healthy():
            try:
                return self.http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("the Prefect server", 120, healthy, 0.3)

    def stop(self):
        self.proc.stop()
        if self.db:
            self.db.stop()

    def call(self, method, path, body=None):
        for attempt in range(20):
            try:
                r = self.http.request(method, path, json=body)
            except httpx.HTTPError:
                time.sleep(0.2 * (attempt + 1))
                continue
            if r.status_code in (429, 500, 502, 503):
                time.sleep(0.2 * (attempt + 1))
                continue
            r.raise_for_status()
            return r.json() if r.content else None
        raise RuntimeError(f"{method} {path}: the server kept failing")

    def pool(self, name, kind="kubernetes", template=None):
        self.call("POST", "/work_pools/", {"name": name, "type": kind, "base_job_template": template or {}})
        return name

    def deployment(self, pool, job_variables=None):
        flow = self.call("POST", "/flows/", {"name": "bench"})
        dep = self.call("POST", "/deployments/", {
            "name": f"bench-{pool}", "flow_id": flow["id"], "work_pool_name": pool,
            "entrypoint": "hello.py:hello", "job_variables": job_variables or {}})
        return dep["id"]

    def run(self, deployment):
        return self.call("POST", f"/deployments/{deployment}/create_flow_run", {})["id"]

    def runs(self, deployment, n):
        """`n` runs, created 8 at a time."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: self.run_via(deployment), range(n)))

    def run_via(self, deployment):
        last = None
        with httpx.Client(base_url=self.url, timeout=60) as http:
            for attempt in range(30):
                try:
                    r = http.post(f"/deployments/{deployment}/create_flow_run", json={})
                    if r.status_code < 300:
                        return r.json()["id"]
                    last = f"HTTP {r.status_code}: {r.text[:300]}"
                    if r.status_code not in (429, 500, 502, 503, 504):
                        break
                except httpx.HTTPError as e:
                    last = repr(e)
                time.sleep(min(0.2 * (attempt + 1), 3))
        raise RuntimeError(f"could not create a run: {last}")

    def final_without(self, runs):
        """Of `runs`, those already in a final state (given up on)."""
        done = set()
        for i in range(0, len(runs), 200):
            chunk = runs[i:i + 200]
            found = self.call("POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": chunk}}, "limit": 200})
            done |= {r["id"] for r in found if r["state_type"] in ("CRASHED", "FAILED", "CANCELLED", "COMPLETED")}
        return done

    def with_infrastructure(self, runs):
        """How many of `runs` have their infrastructure id recorded."""
        count = 0
        for i in range(0, len(runs), 200):
            chunk = runs[i:i + 200]
            found = self.call("POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": chunk}}, "limit": 200})
            count += sum(1 for r in found if r.get("infrastructure_pid"))
        return count

    def set_state(self, run, kind):
        return self.call("POST", f"/flow_runs/{run}/set_state", {"state": {"type": kind}, "force": True})


class Kube:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="pao-bench-kube-"))
        subprocess.run(["bash", str(REPO / "scripts/kube-apiserver.sh"), "start", str(self.dir)],
                       check=True, stdout=subprocess.DEVNULL)
        self.kubeconfig = str(self.dir / "kubeconfig")

    def kubectl(self, *args, input=None):
        r = subprocess.run(["kubectl", "--kubeconfig", self.kubeconfig, *args], input=input,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr}")
        return r.stdout

    def namespace(self, prefix):
        ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", ns)
        return ns

    def stop(self):
        subprocess.run(["bash", str(REPO / "scripts/kube-apiserver.sh"), "stop", str(self.dir)])


class JobWatch:
    """`kubectl get jobs -w` on a namespace: when each run's Job appeared and vanished."""

    def __init__(self, kube, namespace):
        self.added, self.deleted = {}, {}
        self.lock = threading.Lock()
        self.p = subprocess.Popen(
            ["kubectl", "--kubeconfig", kube.kubeconfig, "get", "jobs", "-n", namespace, "-w",
             "--output-watch-events", "-o",
             "jsonpath={.type} {.object.metadata.labels.prefect\\.io/flow-run-id}{\"\\n\"}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            now = time.monotonic()
            parts = line.split()
            if len(parts) != 2:
                continue
            kind, run = parts
            with self.lock:
                if kind == "ADDED":
                    self.added.setdefault(run, now)
                elif kind == "DELETED":
                    self.deleted.setdefault(run, now)

    def added_at(self, run):
        with self.lock:
            return self.added.get(run)

    def count(self):
        with self.lock:
            return len(self.added)

    def stop(self):
        self.p.kill()
        self.p.wait()


# ---------------------------------------------------------------- what runs the runs


class Operator:
    def __init__(self, binary, kube, namespace):
        self.kube, self.ns = kube, namespace
        self.health = free_port()
        env = dict(os.environ, KUBECONFIG=kube.kubeconfig, PAO_HEALTH_ADDRESS=f"127.0.0.1:{self.health}")
        self.proc = Proc([*WRAP, binary, "operator", "--install-crd", "--namespace", namespace], env=env)

        def ready():
            try:
                return httpx.get(f"http://127.0.0.1:{self.health}/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("the operator ready", 60, ready, 0.2)

    def metric(self, name):
        """The sum of a metric's series on the operator's /metrics."""
        text = httpx.get(f"http://127.0.0.1:{self.health}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def agents(self, prefect_url, pool, names, events=True, poll_interval="10s"):
        items = [{
            "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {"api": {"url": prefect_url, "workPool": pool, "events": events},
                     "pollInterval": poll_interval,
                     "job": {"image": "prefecthq/prefect:3-latest"}},
        } for name in names]
        self.kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def ready_agents(self):
        out = self.kube.kubectl("get", "pfa", "-n", self.ns, "-o",
                                "jsonpath={range .items[*]}{.status.agentId}{\"\\n\"}{end}")
        return sum(1 for line in out.split("\n") if line.strip())

    def stop(self):
        self.proc.stop()


class Worker:
    """`prefect worker start --type kubernetes`, as its docs say, against the same servers."""

    def __init__(self, venv, kube, prefect_url, pool, extra_env=None):
        env = dict(os.environ, KUBECONFIG=kube.kubeconfig, PREFECT_API_URL=prefect_url,
                   PREFECT_HOME=tempfile.mkdtemp(prefix="pao-bench-worker-"), **(extra_env or {}))
        self.proc = Proc([f"{venv}/bin/prefect", "worker", "start", "--pool", pool, "--type",
                          "kubernetes", "--name", f"official-{pool}"], env=env)

    def stop(self):
        self.proc.stop()


def online(prefect, pool):
    """Until the pool has a worker that heartbeats: what runs it is up, as in production."""
    wait_until(f"a worker of {pool} online", 120, lambda: any(
        w.get("status") == "ONLINE" for w in prefect.call("POST", f"/work_pools/{pool}/workers/filter", {})), 0.3)


def kubernetes_template(venv):
    """The official worker's default base job template (what `prefect work-pool create
    --type kubernetes` stores)."""
    code = ("import json; from prefect_kubernetes.worker import KubernetesWorker; "
            "print(json.dumps(KubernetesWorker.get_default_base_job_template()))")
    return json.loads(subprocess.run([f"{venv}/bin/python", "-c", code], check=True,
                                     capture_output=True, text=True).stdout)


# ---------------------------------------------------------------- scenarios


def claim_only(prefect, n, concurrency=8):
    """The server's own ceiling: poll and claim (PENDING) with nothing else to do,
    `concurrency` claims at a time."""
    pool = prefect.pool(f"claim-{uuid.uuid4().hex[:6]}", kind="process")
    dep = prefect.deployment(pool)
    runs = set(prefect.runs(dep, n))

    async def go():
        claimed = set()
        async with httpx.AsyncClient(base_url=prefect.url, timeout=60) as http:
            sem = asyncio.Semaphore(concurrency)

            async def claim(run_id):
                async with sem:
                    for attempt in range(20):
                        r = await http.post(f"/flow_runs/{run_id}/set_state", json={"state": {
                            "type": "PENDING", "state_details": {"transition_id": str(uuid.uuid4())}}})
                        if r.status_code < 300:
                            if r.json().get("status") == "ACCEPT":
                                claimed.add(run_id)
                            return
                        await asyncio.sleep(0.1 * (attempt + 1))

            while len(claimed) < n:
                r = await http.post(f"/work_pools/{pool}/get_scheduled_flow_runs", json={
                    "scheduled_before": "2100-01-01T00:00:00Z", "limit": 200})
                batch = [x["flow_run"]["id"] for x in r.json() if x["flow_run"]["id"] not in claimed]
                await asyncio.gather(*(claim(rid) for rid in batch))
        return claimed

    t0 = time.monotonic()
    server = ServerCpu(prefect)
    profile = ServerProfile(prefect, f"claim-only-{concurrency}")
    claimed = asyncio.run(go())
    profile.stop()
    seconds = time.monotonic() - t0
    assert claimed == runs
    result = {"runs": n, "concurrency": concurrency, "seconds": seconds, "runs_per_second": n / seconds,
              "server_cpu_percent": server.percent(),
              "server_cpu_ms_per_run": round(1000 * server.seconds() / n, 1)}
    log(f"claim-only, {concurrency} at a time: {seconds:.1f}s ({result['runs_per_second']:.1f} runs/s, "
        f"Prefect server {result['server_cpu_percent']} % of a core)")
    return result


def call_costs(prefect, n=200):
    """The Prefect server's CPU per call, for each call a burst's runs cost this operator
    (and the claim-only client), `n` runs' worth each, 8 at a time as in a burst: what each
    call costs the server is what leaving it out would buy."""
    pool = prefect.pool(f"calls-{uuid.uuid4().hex[:6]}", kind="process")
    runs = prefect.runs(prefect.deployment(pool), n)
    costs = {}

    def measure(label, calls, batch, make):
        async def go():
            async with httpx.AsyncClient(base_url=prefect.url, timeout=60) as http:
                sem = asyncio.Semaphore(8)

                async def one(i):
                    async with sem:
                        method, path, body = make(i)
                        r = await http.request(method, path, json=body)
                        assert r.status_code < 300, f"{label}: HTTP {r.status_code} {r.text[:200]}"
                await asyncio.gather(*(one(i) for i in range(calls)))

        server = ServerCpu(prefect)
        asyncio.run(go())
        ms = 1000 * server.seconds() / calls
        costs[label] = {"ms_per_call": round(ms, 1), "runs_per_call": batch,
                        "ms_per_run": round(ms / batch, 2)}

    chunks = [runs[i:i + 100] for i in range(0, n, 100)]
    measure("poll (get_scheduled_flow_runs, 200 runs)", max(1, n // 100), 200,
            lambda i: ("POST", f"/work_pools/{pool}/get_scheduled_flow_runs",
                       {"scheduled_before": "2100-01-01T00:00:00Z", "limit": 200}))
    measure("runs re-read before their claims (filter, 100 ids)", len(chunks), 100,
            lambda i: ("POST", "/flow_runs/filter", {"flow_runs": {"id": {"any_": chunks[i]}}, "limit": 100}))
    measure("claim (set_state PENDING)", n, 1,
            lambda i: ("POST", f"/flow_runs/{runs[i]}/set_state", {"state": {
                "type": "PENDING", "name": "Pending", "message": "Claimed by agent bench (bench)",
                "state_details": {"transition_id": str(uuid.uuid4())}}}))
    measure("state history (claim verified)", n, 1,
            lambda i: ("GET", f"/flow_run_states/?flow_run_id={runs[i]}", None))
    measure("infrastructure id (PATCH)", n, 1,
            lambda i: ("PATCH", f"/flow_runs/{runs[i]}", {"infrastructure_pid": f"ns:prefect-job-{i}"}))
    measure("log lines (POST /logs/, 100 lines)", len(chunks), 100,
            lambda i: ("POST", "/logs/", [{"name": "prefect-agent-operator", "level": 20,
                                           "message": "Submitted flow run as Job ns/prefect-job",
                                           "timestamp": "2026-12-07T10:00:00+00:00", "flow_run_id": r}
                                          for r in chunks[i]]))
    for label, c in costs.items():
        log(f"server CPU: {label}: {c['ms_per_call']} ms per call, {c['ms_per_run']} ms per run")
    return costs


def scene(prefect, kube, prefix, job_ns):
    """A fresh pool with the Kubernetes template and a deployment whose Jobs land in
    `job_ns` (the operator's namespace) or in a fresh namespace (the worker's)."""
    ns = job_ns or kube.namespace(prefix)
    pool = prefect.pool(f"{prefix}-{uuid.uuid4().hex[:6]}", template=TEMPLATE)
    return ns, pool, prefect.deployment(pool, {"namespace": ns})


def cancellation(prefect, kube, runs, start_runner, label, job_ns, patience=120):
    """A run whose Job exists (its pod never starts: no kubelet, so the run stays PENDING)
    is set CANCELLING: seconds until the Job is deleted, or None when it still exists
    `patience` seconds later."""
    ns, pool, dep = scene(prefect, kube, "cancel", job_ns)
    watch = JobWatch(kube, ns)
    runner = start_runner(ns, pool)
    lat = []
    try:
        for _ in range(runs):
            run = prefect.run(dep)
            wait_until(f"{label}: the Job", 120, lambda: watch.added_at(run))
            # The infrastructure id is written after the Job is created; cancelling
            # before it is there would measure a different path.
            wait_until(f"{label}: infrastructure id", 60,
                       lambda: prefect.call("GET", f"/flow_runs/{run}").get("infrastructure_pid"))
            t0 = time.monotonic()
            prefect.set_state(run, "CANCELLING")
            try:
                wait_until(f"{label}: the Job deleted", patience, lambda: watch.deleted.get(run))
                lat.append(watch.deleted[run] - t0)
            except TimeoutError:
                lat.append(None)
    finally:
        runner.stop()
        watch.stop()
    done = [x for x in lat if x is not None]
    result = {"runs": runs, "deleted": len(done), "patience_seconds": patience,
              "p50": percentile(done, 50) if done else None, "max": max(done) if done else None}
    log(f"cancellation {label}: {len(done)} of {runs} Jobs deleted" +
        (f", p50 {result['p50']:.2f}s max {result['max']:.2f}s" if done else f" within {patience} s"))
    return result


def idle(prefect, kube, binary, counts, settle, window, poll_interval):
    """The operator's cost with `n` idle PrefectAgents (all registered, or as many as the
    one Prefect server let register within five minutes: the count is reported)."""
    out = {}
    pool = prefect.pool(f"idle-{uuid.uuid4().hex[:6]}", template=TEMPLATE)
    for n in counts:
        ns = kube.namespace(f"idle{n}")
        op = Operator(binary, kube, ns)
        try:
            op.agents(prefect.url, pool, [f"agent-{i}" for i in range(n)], poll_interval=poll_interval)
            try:
                wait_until(f"{n} agents registered", 300, lambda: op.ready_agents() >= n, 2)
            except TimeoutError:
                pass
            registered = op.ready_agents()
            requests = op.metric("prefect_api_request_duration_seconds_count")
            started = time.monotonic()
            cost = idle_cost(op.proc, settle, window)
            rate = (op.metric("prefect_api_request_duration_seconds_count") - requests) / (time.monotonic() - started)
            out[n] = dict(cost, registered=registered, prefect_requests_per_s=round(rate, 1))
        finally:
            op.stop()
            kube.kubectl("delete", "namespace", ns, "--wait=false")
        log(f"idle with {n} agents: {out[n]}")
    return out


def churn(prefect, kube, binary, n, settle, rounds=10, batch=500):
    """The operator's memory before, with `n` PrefectAgents (each registers, makes no poll
    and finishes: maxPolls 0), and after all of them are deleted, `rounds` times: what it
    keeps per resource must go with the resource, and the operator hands freed memory back
    every 30 s, so RSS after a round is measured once that has happened (`settle`, at
    least 40 s after the last deletion)."""
    pool = prefect.pool(f"churn-{uuid.uuid4().hex[:6]}", template=TEMPLATE)
    ns = kube.namespace("churn")
    op = Operator(binary, kube, ns)
    out = {"agents": n, "rounds": []}
    try:
        time.sleep(settle)
        out["rss_mib_baseline"] = round(rss_kib(op.proc.pid) / 1024, 1)
        for r in range(rounds):
            names = [f"c{r}-{i}" for i in range(n)]
            started = time.monotonic()
            for i in range(0, n, batch):
                items = [{
                    "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"api": {"url": prefect.url, "workPool": pool, "events": False},
                             "maxPolls": 0, "job": {"image": "prefecthq/prefect:3-latest"}},
                } for name in names[i:i + batch]]
                kube.kubectl("apply", "-f", "-",
                             input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
            try:
                wait_until(f"{n} agents registered", 60 + n * 0.5, lambda: op.ready_agents() >= n, 2)
            except TimeoutError:
                pass
            registered = op.ready_agents()
            loaded = rss_kib(op.proc.pid)
            created_s = time.monotonic() - started
            started = time.monotonic()
            kube.kubectl("delete", "pfa", "--all", "-n", ns, "--wait=false")

            def remaining():
                listed = kube.kubectl("get", "pfa", "-n", ns, "-o", "name")
                return len([line for line in listed.split("\n") if line.strip()])

            wait_until("every PrefectAgent deleted", 60 + n * 0.2, lambda: remaining() == 0, 2)
            deleted_s = time.monotonic() - started
            time.sleep(max(settle, 40))
            out["rounds"].append({
                "registered": registered, "rss_mib_loaded": round(loaded / 1024, 1),
                "rss_mib_after_delete": round(rss_kib(op.proc.pid) / 1024, 1),
                "create_and_register_s": round(created_s, 1), "delete_s": round(deleted_s, 1)})
            log(f"churn round {r + 1}: {out['rounds'][-1]}")
    finally:
        op.stop()
        kube.kubectl("delete", "namespace", ns, "--wait=false")
    return out


# What a hostile server's poll answer is, by name: (bytes or a generator of chunks, whether
# the length is declared). The operator reads at most 16 MiB of an answer.
def hostile_bodies():
    def runs(n, name_len=8):
        one = lambda: {"id": str(uuid.uuid4()), "name": "x" * name_len, "flow_id": str(uuid.uuid4()),
                       "state": {"type": "SCHEDULED", "name": "Scheduled"},
                       "expected_start_time": "2026-01-01T00:00:00Z", "parameters": {}}
        return json.dumps([one() for _ in range(n)]).encode()

    def endless():
        chunk = b"[" + b"0," * (2**20 // 2 - 1)
        for _ in range(200):  # 200 MiB, if nobody stops reading
            yield chunk
            time.sleep(0.01)

    return {
        "15 MiB of runs (under the cap)": (runs(46_000), True),
        "one run named with 15 MiB": (runs(1, 15 * 2**20), True),
        "50 MiB declared (over the cap)": (b"[" + b"0," * (25 * 2**20) + b"0]", True),
        "endless chunked body": (endless, False),
        "15 MiB of nesting": (b"[" * (15 * 2**20), True),
    }


def hostile(prefect, binary, polls=5):
    """Peak RSS (VmHWM) of a standalone agent whose server answers each poll with a hostile
    body (all other calls go to the real Prefect server through a proxy), next to the same
    agent with honest answers: memory stays bounded whatever the server sends."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    pool = prefect.pool(f"hostile-{uuid.uuid4().hex[:6]}", kind="process")
    state = {"mode": None, "polls": 0}
    bodies = hostile_bodies()

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _handle(self):
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else None
            mode = state["mode"]
            if mode and self.path.endswith("/get_scheduled_flow_runs"):
                state["polls"] += 1
                data, declared = bodies[mode]
                self.send_response(200)
                self.send_header("content-type", "application/json")
                if declared:
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    try:
                        self.wfile.write(data)
                    except OSError:
                        pass
                else:
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    try:
                        for chunk in data():
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.write(b"0\r\n\r\n")
                    except OSError:
                        pass
                return
            if self.path.endswith("/get_scheduled_flow_runs"):
                state["polls"] += 1
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "content-length", "connection")}
            path = self.path.removeprefix("/api")
            try:
                r = prefect.http.request(self.command, path, content=body, headers=headers)
                status, content, ctype = r.status_code, r.content, r.headers.get("content-type", "application/json")
            except httpx.HTTPError as e:
                status, content, ctype = 502, str(e).encode(), "text/plain"
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    out = {}
    try:
        for mode in [None, *bodies]:
            state.update(mode=mode, polls=0)
            agent = Proc([*WRAP, binary, "agent", "--api-url", url, "--pool", pool, "--no-events",
                          "--deployer", "process", "--poll-interval", "1s",
                          "--name", f"hostile-{uuid.uuid4().hex[:6]}"],
                         env=dict(os.environ, PAO_LOG_LEVEL="warn"))
            try:
                wait_until(f"{polls} polls ({mode})", 240,
                           lambda: state["polls"] >= polls or agent.p.poll() is not None, 0.2)
                peak = 0
                for line in open(f"/proc/{agent.pid}/status"):
                    if line.startswith("VmHWM:"):
                        peak = int(line.split()[1])
                label = mode or "honest answers"
                out[label] = {"peak_rss_mib": round(peak / 1024, 1), "polls": state["polls"],
                              "alive": agent.p.poll() is None}
                log(f"hostile bodies, {label}: {out[label]}")
            finally:
                agent.stop()
    finally:
        server.shutdown()
    return out


def idle_worker(prefect, kube, venv, settle, window):
    pool = prefect.pool(f"idlew-{uuid.uuid4().hex[:6]}", template=TEMPLATE)
    w = Worker(venv, kube, prefect.url, pool)
    try:
        result = idle_cost(w.proc, settle, window)
    finally:
        w.stop()
    log(f"idle official worker: {result}")
    return result


# ---------------------------------------------------------------- report


def ratio(a, b):
    return None if not a or not b else b / a


def times(x):
    """A ratio for the table; a worker that never did it is infinitely slower."""
    return "∞" if x is None else f"{x:.0f}×"


def table(r):
    lat, bur, idl = r["latency"], r["burst"], r["idle"]
    w = lat["official worker"]
    rows = ["| measure | this operator | official worker | ratio | target |", "|---|---|---|---|---|"]
    for label in ("operator, events", "operator, polling"):
        x = lat[label]
        rows.append(f"| submission latency p50/p90/p99, {label.split(', ')[1]} | "
                    f"{x['p50']:.3f} / {x['p90']:.3f} / {x['p99']:.3f} s | "
                    f"{w['p50']:.3f} / {w['p90']:.3f} / {w['p99']:.3f} s | "
                    f"{ratio(x['p50'], w['p50']):.0f}× (p50) | p50 ≤ 0.2 s, ≥ 20× |")
    o, ow, c = bur["operator"], bur["official worker"], bur["claim-only"]
    rows.append(f"| burst of {o['runs']}: all Jobs | {o['seconds']:.1f} s ({o['runs_per_second']:.1f}/s, "
                f"{100 * o['runs_per_second'] / c['runs_per_second']:.0f} % of claim-only "
                f"{c['runs_per_second']:.1f}/s, {c.get('concurrency', 8)} at once), {o['lost']} lost | {ow['seconds']:.1f} s "
                f"({ow['runs_per_second']:.1f}/s), {ow['lost']} lost | "
                f"{ratio(ow['runs_per_second'], o['runs_per_second']):.1f}× | ≥ 90 % of ceiling, ≥ 5× |")
    if r.get("burst rounds"):
        shares = ", ".join(f"{x['share_percent']:.0f} %" for x in r["burst rounds"])
        rows.append(f"| burst: operator / ceiling in each round (the median one above) | {shares} | | | |")
    rows.append(f"| burst: from the first Job to the last | {o['runs'] / o['first_to_last']:.1f}/s | "
                f"{ow['runs'] / ow['first_to_last']:.1f}/s | | |")
    rows.append(f"| Prefect server's CPU per launched run (burst) | {o.get('server_cpu_ms_per_run', '?')} ms | "
                f"{ow.get('server_cpu_ms_per_run', '?')} ms | "
                f"claim-only {c.get('server_cpu_ms_per_run', '?')} ms | |")
    for label, x in r.get("calls", {}).items():
        rows.append(f"| server CPU: {label} | {x['ms_per_call']} ms a call, {x['ms_per_run']} ms a run | | | |")
    iw = r["idle official worker"]
    for n, x in idl.items():
        rows.append(f"| idle, {n} PrefectAgent{'s' if int(n) > 1 else ''} ({x['registered']} registered): RSS / CPU | "
                    f"{x['rss_mib']} MiB / {x['cpu_percent']} % | "
                    f"{iw['rss_mib']} MiB / {iw['cpu_percent']} % (one worker, one pool) | | "
                    f"{'≤ 30 MiB' if int(n) == 1 else '≤ 100 MiB, CPU ≤ 3 %' if int(n) == 1000 else ''} |")
    cx, cw = r["cancellation"]["operator"], r["cancellation"]["official worker"]

    def cancelled(c):
        if not c["deleted"]:
            return f"never: 0 of {c['runs']} Jobs deleted within {c['patience_seconds']} s"
        return f"{c['p50']:.2f} / {c['max']:.2f} s ({c['deleted']} of {c['runs']} deleted)"

    rows.append(f"| cancellation of a run whose pod never started (CANCELLING → Job deleted), "
                f"p50 / max | {cancelled(cx)} | {cancelled(cw)} (with PREFECT_WORKER_ENABLE_"
                f"CANCELLATION=true) | {times(ratio(cx['p50'], cw['p50']))} | |")
    return "\n".join(rows)


def plot(r, path, database):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels = list(r["latency"])
    for i, p in enumerate(("p50", "p90", "p99")):
        axes[0].bar([x + i * 0.27 for x in range(len(labels))], [r["latency"][l][p] for l in labels],
                    width=0.27, label=p)
    axes[0].set_xticks([x + 0.27 for x in range(len(labels))], labels, fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds (log)")
    axes[0].set_title("submission latency")
    axes[0].legend()
    names = [n for n, x in r["burst"].items() if isinstance(x, dict)]
    axes[1].bar(names, [r["burst"][n]["runs_per_second"] for n in names], color="tab:green")
    axes[1].set_ylabel("runs per second")
    axes[1].set_title(f"burst of {r['burst']['operator']['runs']} runs")
    axes[1].tick_params(axis="x", labelsize=8)
    counts = list(r["idle"])
    axes[2].bar([f"{n} agents" for n in counts] + ["official worker"],
                [r["idle"][n]["rss_mib"] for n in counts] + [r["idle official worker"]["rss_mib"]],
                color="tab:purple")
    axes[2].set_ylabel("RSS, MiB")
    axes[2].set_title("idle memory")
    axes[2].tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Prefect on {database}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


TEMPLATE = None
WRAP = []
PROFILE = None
# Pinned (the default; --no-pin-server): the CPUs of the Prefect server and its PostgreSQL (the rest run elsewhere).
SERVER_CPUS = None


def main():
    global TEMPLATE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(REPO / "target/release/prefect-agent-operator"))
    ap.add_argument("--venv", required=True)
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--latency-runs", type=int, default=30)
    ap.add_argument("--spacing", type=float, default=1.5,
                    help="mean seconds between runs in the latency test (uniform, ±1 s)")
    ap.add_argument("--burst", type=int, default=500)
    ap.add_argument("--burst-rounds", type=int, default=3,
                    help="operator and claim-only bursts taking turns; the median round is reported")
    ap.add_argument("--idle", default="1,100,1000")
    ap.add_argument("--idle-poll-interval", default="60s",
                    help="pollInterval of the idle PrefectAgents (events wake them for new runs)")
    ap.add_argument("--settle", type=float, default=20)
    ap.add_argument("--window", type=float, default=30)
    ap.add_argument("--cancellations", type=int, default=5)
    ap.add_argument("--churn", type=int, default=1000,
                    help="PrefectAgents created and deleted per round in the churn part (--only churn)")
    ap.add_argument("--churn-rounds", type=int, default=10,
                    help="rounds of the churn part (10 × 1000: 10,000 PrefectAgents in all)")
    ap.add_argument("--databases", default="sqlite,postgres",
                    help="what the Prefect server runs on, each in turn (a server of its own on each)")
    ap.add_argument("--only", default="latency,burst,cancellation,idle",
                    help="the parts to run, comma-separated (a partial run writes partial results)")
    ap.add_argument("--without-worker", action="store_true",
                    help="leave Prefect's official worker out of the burst (quicker runs while working on the operator)")
    ap.add_argument("--profile-server", default="", metavar="PY_SPY,DIR",
                    help="sample the Prefect server with py-spy during each burst (collapsed stacks in DIR)")
    ap.add_argument("--no-pin-server", dest="pin_server", action="store_false",
                    help="share every CPU among all processes; by default the Prefect server and its "
                         "database run on CPU 0 and everything else (API server, etcd, the runners, this "
                         "script) on the other CPUs, as when they run on machines of their own")
    ap.add_argument("--wrap", default="",
                    help="a command the operator runs under, e.g. 'heaptrack -o /tmp/op' (profiling)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    global WRAP, PROFILE
    WRAP = args.wrap.split()
    PROFILE = args.profile_server.split(",") if args.profile_server else None
    global SERVER_CPUS
    if args.pin_server:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            sys.exit("pinning the Prefect server needs two CPUs or more (--no-pin-server)")
        SERVER_CPUS = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    TEMPLATE = kubernetes_template(args.venv)
    databases = [d for d in args.databases.split(",") if d]
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}}
    log("starting the API server")
    kube = Kube()
    try:
        for database in databases:
            results[database] = scenarios(args, only, kube, database)
    finally:
        kube.stop()
    if only != {"latency", "burst", "cancellation", "idle"} or set(databases) != set(DATABASES):
        (out / "partial.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))
        return
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = "\n\n".join(f"Prefect on {DATABASES[d]}:\n\n{table(results[d])}" for d in databases)
    (out / "results.md").write_text(text + "\n")
    for d in databases:
        plot(results[d], out / ("results.png" if d == "sqlite" else f"results-{d}.png"), DATABASES[d])
    print(text)
    print(f"\n{out / 'results.json'}, {out / 'results.png'}, {out / 'results-postgres.png'}")


# The databases a Prefect server runs on here, and how the report names them.
DATABASES = {"sqlite": "SQLite (its default)", "postgres": "PostgreSQL 15 (production's)"}


def scenarios(args, only, kube, database):
    """Every part `only` names, on a Prefect server of its own on `database`."""
    log(f"starting the Prefect server on {database}")
    prefect = Prefect(args.venv, database=database)
    ops = []
    results = {"database": database}
    try:
        ns = kube.namespace("ops")
        op = Operator(args.binary, kube, ns)
        ops.append(op)

        def operator_runner(events):
            def start(_job_ns, pool):
                name = f"a-{uuid.uuid4().hex[:6]}"
                op.agents(prefect.url, pool, [name], events=events)
                online(prefect, pool)

                class Stop:
                    def stop(self_):
                        kube.kubectl("delete", "pfa", name, "-n", ns, "--wait=false")

                    def counts(self_):
                        """The operator's Prefect requests so far, and its claims that
                        needed a history read."""
                        return {"cpu_s": cpu_ticks(op.proc.pid) / TICK,
                                "requests": op.metric("prefect_api_request_duration_seconds_count"),
                                "claims_checked_by_history":
                                    op.metric("prefect_agent_claims_checked_by_history_total")}
                return Stop()
            return start

        def worker_runner(_job_ns, pool, **env):
            w = Worker(args.venv, kube, prefect.url, pool, env)
            online(prefect, pool)
            return w

        def worker_runner_cancelling(job_ns, pool):
            return worker_runner(job_ns, pool, PREFECT_WORKER_ENABLE_CANCELLATION="true")

        # Operator Jobs land in the operator's namespace; so the watches look there.
        def lat(label, runner, job_ns_is_ops):
            return latency(prefect, kube, args.latency_runs, runner, label, args.spacing,
                              ns if job_ns_is_ops else None)

        if "latency" in only:
            results["latency"] = {
                "operator, events": lat("operator, events", operator_runner(True), True),
                "operator, polling": lat("operator, polling", operator_runner(False), True),
                "official worker": lat("official worker", worker_runner, False),
            }
        if "burst" in only:
            # The ceiling: a client that only polls and claims, at the operator's default
            # claims at once (4) and at 8; the better of the two. Rounds take turns with the
            # operator (a single pair moved by a third between runs on these machines); the
            # round with the median share of its ceiling is reported, every round listed.
            rounds = []
            for _ in range(max(1, args.burst_rounds)):
                ceilings = [claim_only(prefect, args.burst, c) for c in (4, 8)]
                rounds.append({
                    "operator": burst(prefect, kube, args.burst, operator_runner(True), "operator", ns),
                    "claim-only": max(ceilings, key=lambda x: x["runs_per_second"]),
                    "claim-only, each": ceilings,
                })
            def share(r):
                return r["operator"]["runs_per_second"] / r["claim-only"]["runs_per_second"]

            results["burst"] = sorted(rounds, key=share)[len(rounds) // 2]
            results["burst rounds"] = [
                {"operator_runs_per_second": round(r["operator"]["runs_per_second"], 1),
                 "claim_only_runs_per_second": round(r["claim-only"]["runs_per_second"], 1),
                 "share_percent": round(100 * share(r), 1)} for r in rounds]
            log("burst rounds (operator / ceiling): " + ", ".join(
                f"{x['operator_runs_per_second']}/{x['claim_only_runs_per_second']} ({x['share_percent']} %)"
                for x in results["burst rounds"]))
            if not args.without_worker:
                results["burst"]["official worker"] = burst(prefect, kube, args.burst, worker_runner,
                                                            "official worker", None)
            results["calls"] = call_costs(prefect)
        if "concurrency" in only:
            # How the server's claim rate depends on how many claims it is sent at once
            # (what --submit-concurrency is set from): each level twice, taking turns.
            levels = (4, 8, 16, 32)
            rounds = {str(c): [] for c in levels}
            for _ in range(2):
                for c in levels:
                    rounds[str(c)].append(claim_only(prefect, args.burst, c))
            results["claim concurrency"] = rounds
        if "cancellation" in only:
            results["cancellation"] = {
                "operator": cancellation(prefect, kube, args.cancellations, operator_runner(True),
                                         "operator", ns),
                # Off by default in Prefect 3.9 (PREFECT_WORKER_ENABLE_CANCELLATION): the
                # runner inside the Job handles cancellation once it runs.
                "official worker": cancellation(prefect, kube, args.cancellations,
                                                worker_runner_cancelling, "official worker", None),
            }
        op.stop()
        ops.clear()
        if "hostile" in only:
            results["hostile"] = hostile(prefect, args.binary)
        if "churn" in only:
            results["churn"] = churn(prefect, kube, args.binary, args.churn, args.settle,
                                     rounds=args.churn_rounds)
        if "idle" in only:
            counts = [int(c) for c in args.idle.split(",") if c]
            results["idle"] = idle(prefect, kube, args.binary, counts, args.settle, args.window,
                                   args.idle_poll_interval)
            results["idle official worker"] = idle_worker(prefect, kube, args.venv, args.settle,
                                                          args.window)
    finally:
        for o in ops:
            o.stop()
        prefect.stop()
    return results


def latency(prefect, kube, runs, start_runner, label, spacing, job_ns):
    """Runs created about every `spacing` s (at random, so that no poll rhythm is
    favoured), due now: seconds until each has a Job. Jobs land
    in `job_ns` (the operator's namespace) or a fresh one (the worker's, by job variable)."""
    ns, pool, dep = scene(prefect, kube, "lat", job_ns)
    watch = JobWatch(kube, ns)
    runner = start_runner(ns, pool)
    created = {}
    try:
        for _ in range(runs):
            run = prefect.run(dep)
            created[run] = time.monotonic()
            time.sleep(max(0.05, random.uniform(spacing - 1, spacing + 1)))
        wait_until(f"{label}: all Jobs", 180, lambda: all(watch.added_at(r) for r in created), 0.2)
    finally:
        runner.stop()
        watch.stop()
    lat = [watch.added_at(r) - t for r, t in created.items()]
    result = {"runs": runs, "p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99)}
    log(f"latency {label}: p50 {result['p50']:.3f}s p90 {result['p90']:.3f}s p99 {result['p99']:.3f}s")
    return result


STRANDED_AFTER = 120


def burst(prefect, kube, n, start_runner, label, job_ns):
    """`n` runs due before the runner starts: from its start until each has a Job (or was
    given up on: a run the runner ended CRASHED without a Job counts as lost)."""
    ns, pool, dep = scene(prefect, kube, "burst", job_ns)
    runs = prefect.runs(dep, n)
    watch = JobWatch(kube, ns)
    t0 = time.monotonic()
    server = ServerCpu(prefect)
    profile = ServerProfile(prefect, f"burst-{label}")
    runner = start_runner(ns, pool)
    counts = getattr(runner, "counts", None)
    counts0 = counts() if counts else None
    lost, stranded = set(), set()
    progress = {"count": 0, "at": time.monotonic()}
    try:
        def settled():
            waiting = [r for r in runs if r not in watch.added and r not in lost]
            if waiting and len(waiting) < n // 5:
                lost.update(prefect.final_without(waiting))
                waiting = [r for r in waiting if r not in lost]
            # Runs the runner left neither launched nor ended (claimed, then its
            # submission and its crash report both failed) stay so for good: after
            # STRANDED_AFTER seconds without progress they count as lost, stranded.
            done = n - len(waiting)
            if done != progress["count"]:
                progress.update(count=done, at=time.monotonic())
            elif waiting and time.monotonic() - progress["at"] > STRANDED_AFTER:
                stranded.update(waiting)
                lost.update(waiting)
                waiting = []
            return not waiting

        wait_until(f"{label}: {n} Jobs", 1200, settled, 1)
        jobs_cpu, jobs_percent = server.seconds(), server.percent()
        profile.stop()
        # The server's bill is not paid when the last Job exists: each runner also records
        # each run's infrastructure id (the operator after the burst). Counted until every
        # launched run carries one, or a minute without progress.
        launched = [r for r in runs if r in watch.added]
        recorded = {"count": -1, "at": time.monotonic()}

        def all_recorded():
            count = prefect.with_infrastructure(launched)
            if count != recorded["count"]:
                recorded.update(count=count, at=time.monotonic())
            return count == len(launched) or time.monotonic() - recorded["at"] > 60

        wait_until(f"{label}: infrastructure ids recorded", 600, all_recorded, 1)
        records_seconds = time.monotonic() - t0
        bill_cpu = server.seconds()
        counts1 = counts() if counts else None
    finally:
        runner.stop()
        watch.stop()
    times = sorted(watch.added[r] for r in runs if r in watch.added)
    seconds = times[-1] - t0
    result = {"runs": n, "seconds": seconds, "first_to_last": times[-1] - times[0],
              "runs_per_second": len(times) / seconds, "lost": len(lost), "stranded": len(stranded),
              "server_cpu_percent": jobs_percent,
              "server_cpu_ms_per_run_to_last_job": round(1000 * jobs_cpu / max(1, len(times)), 1),
              # What the server pays per launched run (its database's processes included),
              # the infrastructure ids' records included.
              "server_cpu_ms_per_run": round(1000 * bill_cpu / max(1, len(times)), 1),
              "infrastructure_ids_recorded": recorded["count"],
              "infrastructure_ids_recorded_after_s": round(records_seconds, 1)}
    if counts0 and counts1:
        # Heartbeats and polls included: Prefect requests per launched run.
        result["requests_per_run"] = round((counts1["requests"] - counts0["requests"]) / max(1, len(times)), 2)
        result["claims_checked_by_history"] = int(counts1["claims_checked_by_history"]
                                                  - counts0["claims_checked_by_history"])
        # The operator's own CPU over the burst, its records included (it shares the
        # machine with the Prefect server and the API server).
        result["operator_cpu_ms_per_run"] = round(1000 * (counts1["cpu_s"] - counts0["cpu_s"])
                                                  / max(1, len(times)), 1)
        log(f"burst {label}: {result['requests_per_run']} Prefect requests per run, "
            f"{result['operator_cpu_ms_per_run']} ms of the operator's CPU per run, "
            f"{result['claims_checked_by_history']} claims checked by the history")
    log(f"burst {label}: {seconds:.1f}s ({result['runs_per_second']:.1f} runs/s, {len(lost)} lost, "
        f"Prefect server {result['server_cpu_percent']} % of a core, "
        f"{result['server_cpu_ms_per_run']} ms of CPU per run with the "
        f"{recorded['count']} infrastructure ids recorded after {records_seconds:.1f}s)")
    return result


if __name__ == "__main__":
    main()
