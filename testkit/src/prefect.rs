//! A real `prefect server` (shared, with an auth string, or restartable) and the calls
//! tests make on its API.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prefect_agent_operator::backend::http::{ApiClient, Auth, HttpError, RetryPolicy};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    free_port, http_get_ok_at, prefect_venv, prefect2_venv, repo, spawn_tied_to_test_process,
    unique, wait_for,
};

/// A `prefect server` on a free loopback port with a private SQLite database.
pub struct PrefectServer {
    pub url: String,
    pub home: PathBuf,
    /// Its PostgreSQL database, when not SQLite.
    pub postgres: Option<Postgres>,
}

impl PrefectServer {
    /// One server per test binary, shared by its tests (each uses its own pool).
    pub fn shared() -> &'static PrefectServer {
        static SERVER: OnceLock<PrefectServer> = OnceLock::new();
        SERVER.get_or_init(|| Self::start(&[]))
    }

    /// A server that requires HTTP basic auth with `auth_string`.
    pub fn with_auth(auth_string: &str) -> &'static PrefectServer {
        static SERVER: OnceLock<PrefectServer> = OnceLock::new();
        SERVER.get_or_init(|| Self::start(&[("PREFECT_SERVER_API_AUTH_STRING", auth_string)]))
    }

    fn start(extra_env: &[(&str, &str)]) -> PrefectServer {
        Self::start_on("127.0.0.1", extra_env)
    }

    /// A server of its own listening on `host` (e.g. the address pods reach the host at).
    pub fn start_on(host: &str, extra_env: &[(&str, &str)]) -> PrefectServer {
        Self::start_from(&prefect_venv(), host, extra_env)
    }

    /// One server per test binary on a PostgreSQL database of its own (Prefect's
    /// production database; `scripts/postgres.sh`), shared by its tests.
    pub fn on_postgres() -> &'static PrefectServer {
        static SERVER: OnceLock<PrefectServer> = OnceLock::new();
        SERVER.get_or_init(|| {
            let db = Postgres::start();
            let mut server = Self::start(&[("PREFECT_API_DATABASE_CONNECTION_URL", &db.url)]);
            server.postgres = Some(db);
            server
        })
    }

    /// A Prefect 2.20 server of its own (`scripts/setup-prefect.sh 2`).
    pub fn prefect2(extra_env: &[(&str, &str)]) -> PrefectServer {
        Self::start_from(&prefect2_venv(), "127.0.0.1", extra_env)
    }

    fn start_from(venv: &Path, host: &str, extra_env: &[(&str, &str)]) -> PrefectServer {
        let port = free_port();
        let home = prefect_home();
        spawn_tied_to_test_process(server_command(venv, host, port, &home, extra_env));
        wait_healthy(host, port, &home);
        PrefectServer {
            url: format!("http://{host}:{port}/api"),
            home,
            postgres: None,
        }
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url, Auth::None)
    }
}

/// A PostgreSQL server of its own on a free loopback port (`scripts/postgres.sh run`),
/// its data and log kept after the test for a look.
pub struct Postgres {
    /// Prefect's connection URL for it.
    pub url: String,
    pub dir: PathBuf,
    port: u16,
}

impl Postgres {
    /// The one value `sql` answers, by psql (as the database's owner).
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "prefect", "-d", "prefect", "-tAc", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn start() -> Postgres {
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("pao-postgres-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let data = dir.join("data");
        let log = std::fs::File::create(dir.join("postgres.log")).expect("log");
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("scripts/postgres.sh"))
            .arg("run")
            .arg(&data)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        spawn_tied_to_test_process(cmd);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !data.join("ready").exists() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start; see {}",
                dir.join("postgres.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Postgres {
            url: format!("postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"),
            dir,
            port,
        }
    }
}

/// A server's home (database, log), kept after the test for a look.
fn prefect_home() -> PathBuf {
    tempfile::Builder::new()
        .prefix("pao-prefect-")
        .tempdir()
        .expect("tempdir")
        .keep()
}

/// `prefect server start` on `port` with its database under `home`, logging to
/// `home/server.log`.
fn server_command(
    venv: &Path,
    host: &str,
    port: u16,
    home: &Path,
    extra_env: &[(&str, &str)],
) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("server.log"))
        .expect("server log");
    // Behind a shell that leads a process group of its own: `prefect server start` does
    // not always exit on the SIGTERM a dying test process sends (servers outlived their
    // tests, ppid 1), and its uvicorn child would outlive a SIGKILL of it alone. The
    // shell takes the signal and kills the whole group.
    let mut cmd = Command::new("bash");
    cmd.process_group(0);
    cmd.args([
        "-c",
        r#"trap 'kill -KILL -- -$$' TERM; "$@" & wait"#,
        "prefect-server",
    ])
    .arg(venv.join("bin/prefect"));
    cmd.args([
        "server",
        "start",
        "--host",
        host,
        "--port",
        &port.to_string(),
    ])
    .env("PREFECT_HOME", home)
    .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    .env("PREFECT_SERVER_UI_ENABLED", "false")
    // Prefect 2's name for the same.
    .env("PREFECT_UI_ENABLED", "false")
    .env_remove("PREFECT_API_URL")
    .env_remove("PREFECT_API_KEY")
    .stdin(Stdio::null())
    .stdout(log.try_clone().expect("log"))
    .stderr(log);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd
}

fn wait_healthy(host: &str, port: u16, home: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !http_get_ok_at(host, port, "/api/health") {
        assert!(
            Instant::now() < deadline,
            "prefect server did not become healthy; see {}",
            home.join("server.log").display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A Prefect server of its own that a test stops and starts again (same port, same
/// database), for fault injection.
pub struct RestartablePrefect {
    pub url: String,
    pub home: PathBuf,
    port: u16,
    child: Option<Child>,
    /// Its PostgreSQL database, which outlives its restarts; SQLite when `None`.
    pub postgres: Option<Postgres>,
}

impl RestartablePrefect {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// On a PostgreSQL database of its own.
    pub async fn on_postgres() -> Self {
        let db = tokio::task::spawn_blocking(Postgres::start)
            .await
            .expect("start PostgreSQL");
        Self::start_with(Some(db)).await
    }

    async fn start_with(postgres: Option<Postgres>) -> Self {
        let (port, home) = (free_port(), prefect_home());
        let mut server = RestartablePrefect {
            url: format!("http://127.0.0.1:{port}/api"),
            home,
            port,
            child: None,
            postgres,
        };
        server.restart().await;
        server
    }

    /// SIGKILL, no goodbye: what a crashed or evicted server looks like.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Starts it (again) on its port and database; returns once it is healthy.
    pub async fn restart(&mut self) {
        let (port, home) = (self.port, self.home.clone());
        let db = self.postgres.as_ref().map(|db| db.url.clone());
        let child = tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> = db
                .iter()
                .map(|url| ("PREFECT_API_DATABASE_CONNECTION_URL", url.as_str()))
                .collect();
            // In its own process group (server_command), so that a kill takes everything
            // it started.
            let mut cmd = server_command(&prefect_venv(), "127.0.0.1", port, &home, &env);
            let child = cmd.spawn().expect("spawn prefect server");
            wait_healthy("127.0.0.1", port, &home);
            child
        })
        .await
        .expect("start the Prefect server");
        self.child = Some(child);
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url, Auth::None)
    }
}

impl Drop for RestartablePrefect {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Calls a test makes on the Prefect API (with the crate's own retrying client).
pub struct Api {
    pub client: ApiClient,
}

impl Api {
    pub fn new(url: &str, auth: Auth) -> Self {
        let retry = RetryPolicy {
            attempts: 30,
            unreachable_attempts: 30,
            ..RetryPolicy::default()
        };
        Self {
            client: ApiClient::with_own_pool(url, auth, retry).expect("client"),
        }
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.try_call(method.clone(), path, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A flow run's state history, oldest first.
    pub async fn states(&self, run: &str) -> Vec<Value> {
        let states = self
            .call(
                Method::GET,
                &format!("/flow_run_states/?flow_run_id={run}"),
                None,
            )
            .await;
        states.as_array().cloned().unwrap_or_default()
    }

    pub async fn try_call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, HttpError> {
        self.client.call(method, path, body.as_ref()).await
    }

    pub async fn create_pool(&self, name: &str) {
        self.create_pool_with_template(name, json!({})).await;
    }

    pub async fn create_pool_with_template(&self, name: &str, base_job_template: Value) {
        self.call(
            Method::POST,
            "/work_pools/",
            Some(json!({"name": name, "type": "process", "base_job_template": base_job_template})),
        )
        .await;
    }

    pub async fn create_queue(&self, pool: &str, queue: &str) {
        self.call(
            Method::POST,
            &format!("/work_pools/{pool}/queues/"),
            Some(json!({"name": queue})),
        )
        .await;
    }

    /// A deployment of `examples/flows/hello.py:hello` in `pool` with these job variables.
    pub async fn create_deployment(&self, pool: &str, job_variables: Value) -> String {
        self.create_deployment_in(pool, "default", job_variables)
            .await
    }

    /// The same, in a named work queue of the pool.
    pub async fn create_deployment_in(
        &self,
        pool: &str,
        queue: &str,
        job_variables: Value,
    ) -> String {
        let flow = self
            .call(Method::POST, "/flows/", Some(json!({"name": "hello"})))
            .await;
        let dir = repo().join("examples/flows");
        let dir = dir.to_str().expect("utf-8 path");
        let dep = self
            .call(
                Method::POST,
                "/deployments/",
                Some(json!({
                    "name": format!("hello-{pool}-{queue}"),
                    "work_queue_name": queue,
                    "flow_id": flow["id"],
                    "work_pool_name": pool,
                    "entrypoint": "hello.py:hello",
                    "path": dir,
                    "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": dir}}],
                    "job_variables": job_variables,
                })),
            )
            .await;
        dep["id"].as_str().expect("deployment id").to_string()
    }

    pub async fn create_run(&self, deployment: &str) -> String {
        self.create_run_with(deployment, json!({})).await
    }

    /// A run of `deployment` with its own job variables.
    pub async fn create_run_with(&self, deployment: &str, job_variables: Value) -> String {
        let run = self
            .call(
                Method::POST,
                &format!("/deployments/{deployment}/create_flow_run"),
                Some(json!({"job_variables": job_variables})),
            )
            .await;
        run["id"].as_str().expect("run id").to_string()
    }

    /// A run of `deployment` scheduled for `at`.
    pub async fn create_run_at(
        &self,
        deployment: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let when = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let run = self
            .call(
                Method::POST,
                &format!("/deployments/{deployment}/create_flow_run"),
                Some(json!({"state": {"type": "SCHEDULED", "name": "Scheduled",
                    "state_details": {"scheduled_time": when}}})),
            )
            .await;
        run["id"].as_str().expect("run id").to_string()
    }

    /// Saves a block document of a system block type (`secret`, `string`, `json`…), as
    /// `Secret(value=...).save(name)` would.
    pub async fn create_block(&self, slug: &str, name: &str, data: Value) {
        let block_type = self
            .call(Method::GET, &format!("/block_types/slug/{slug}"), None)
            .await;
        let schemas = self
            .call(
                Method::POST,
                "/block_schemas/filter",
                Some(json!({"block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}})),
            )
            .await;
        self.call(
            Method::POST,
            "/block_documents/",
            Some(json!({
                "name": name,
                "data": data,
                "block_type_id": block_type["id"],
                "block_schema_id": schemas[0]["id"],
            })),
        )
        .await;
    }

    pub async fn run(&self, id: &str) -> Value {
        self.call(Method::GET, &format!("/flow_runs/{id}"), None)
            .await
    }

    pub async fn state(&self, id: &str) -> String {
        self.run(id).await["state"]["type"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the run is in `state` and returns the run.
    pub async fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        wait_for(&format!("run {id} to be {state}"), timeout, || async {
            let run = self.run(id).await;
            (run["state"]["type"] == state).then_some(run)
        })
        .await
    }

    pub async fn set_state(&self, id: &str, kind: &str, force: bool) -> Value {
        self.call(
            Method::POST,
            &format!("/flow_runs/{id}/set_state"),
            Some(json!({"state": {"type": kind}, "force": force})),
        )
        .await
    }

    pub async fn logs(&self, run_id: &str) -> Vec<String> {
        let logs = self
            .call(
                Method::POST,
                "/logs/filter",
                Some(json!({"logs": {"flow_run_id": {"any_": [run_id]}}})),
            )
            .await;
        logs.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["message"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What a run a local agent executed shows in Prefect: the flow's own log line and
    /// the agent's submission line, one RUNNING, the agent registered as the pool's worker.
    pub async fn assert_ran_here(&self, run: &str, pool: &str, worker: &str) {
        // The flow ships its logs in the background; they may land just after COMPLETED.
        let logs = wait_for(
            "the flow's own log in Prefect",
            Duration::from_secs(30),
            || async {
                let logs = self.logs(run).await;
                logs.iter()
                    .any(|l| l.contains("Hello, world!"))
                    .then_some(logs)
            },
        )
        .await;
        assert!(
            logs.iter()
                .any(|l| l.starts_with("Submitted for execution: process")),
            "the agent's submission log reached Prefect: {logs:?}"
        );
        assert_eq!(self.times_in_state(run, "RUNNING").await, 1);
        let workers = self
            .call(
                Method::POST,
                &format!("/work_pools/{pool}/workers/filter"),
                Some(json!({})),
            )
            .await;
        assert_eq!(
            workers[0]["name"], worker,
            "heartbeat registered the worker"
        );
        assert_eq!(workers[0]["status"], "ONLINE");
    }

    /// How many times the run entered `kind` (its state history).
    pub async fn times_in_state(&self, run_id: &str, kind: &str) -> usize {
        self.states(run_id)
            .await
            .iter()
            .filter(|s| s["type"] == kind)
            .count()
    }
}

/// What most tests start from: the shared server, a fresh pool, a record file for the fake runner.
pub struct Setup {
    pub server: &'static PrefectServer,
    pub api: Api,
    pub pool: String,
    pub record: PathBuf,
    pub _dir: tempfile::TempDir,
}

impl Setup {
    pub async fn new(prefix: &str) -> Setup {
        Self::with_template(prefix, json!({})).await
    }

    /// The same with a pool whose base job template is `template`.
    pub async fn with_template(prefix: &str, template: Value) -> Setup {
        Self::on(PrefectServer::shared, prefix, template).await
    }

    /// The same on the server `server` gives (e.g. [`PrefectServer::on_postgres`]).
    pub async fn on(
        server: fn() -> &'static PrefectServer,
        prefix: &str,
        template: Value,
    ) -> Setup {
        let server = tokio::task::spawn_blocking(server)
            .await
            .expect("server start");
        let api = server.api();
        let pool = unique(prefix);
        api.create_pool_with_template(&pool, template).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let record = dir.path().join("runs.txt");
        Setup {
            server,
            api,
            pool,
            record,
            _dir: dir,
        }
    }

    /// A new run of a new deployment of the pool (no job variables).
    pub async fn new_run(&self) -> String {
        let deployment = self.api.create_deployment(&self.pool, json!({})).await;
        self.api.create_run(&deployment).await
    }
}
