//! The command line's flags, and nothing else: `app` runs what they ask for. Every flag can
//! also come from the environment.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::flavor::Flavor;
use crate::telemetry::LogFormat;

/// Runs Prefect agents: pulls scheduled flow runs from Prefect and starts one
/// piece of infrastructure per run.
#[derive(Debug, Parser)]
#[command(name = "prefect-agent-operator", version, propagate_version = true)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        env = "PAO_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `prefect_agent_operator=debug`).
    #[arg(long, env = "PAO_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one standalone agent, like `prefect agent … start` / `prefect worker start`.
    Agent(Box<AgentArgs>),
    /// Print the CustomResourceDefinitions (YAML), as kept in crds/.
    Crdgen(CrdgenArgs),
    /// Run the operator: every PrefectAgent resource gets an agent that launches Jobs.
    Operator(OperatorArgs),
    /// Tests and the quick start only: run the operator's Jobs as local processes on an
    /// API server without a kubelet, writing their status.
    DevRunner(DevRunnerArgs),
}

/// Flags of `dev-runner`.
#[derive(Debug, Clone, Args)]
pub struct CrdgenArgs {
    /// Only the CRD kept in crds/FILE (e.g. prefectworkpool.yaml); default: all of them.
    #[arg(long)]
    pub file: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct DevRunnerArgs {
    /// Run Jobs of this namespace only (default: all namespaces).
    #[arg(long, env = "PAO_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
}

/// Flags of `operator`. The cluster comes from KUBECONFIG or the in-cluster service account.
#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// Create or update the operator's CRDs at start-up.
    #[arg(long, env = "PAO_INSTALL_CRD")]
    pub install_crd: bool,
    /// Watch PrefectAgents and Jobs in this namespace only (default: all namespaces).
    #[arg(long, env = "PAO_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Namespaces besides its own where a PrefectAgent may run its Jobs (comma-separated;
    /// `*` for any). Default: none, each PrefectAgent's Jobs stay in its namespace.
    #[arg(long, env = "PAO_JOB_NAMESPACES", value_delimiter = ',')]
    pub job_namespaces: Vec<String>,
    /// The Pod Security Standard every flow-run pod is held to, whatever a PrefectAgent's
    /// `job` section or a run's job variables ask for: `baseline` refuses host
    /// namespaces, host paths, host ports, privileged containers and added capabilities.
    #[arg(long, env = "PAO_POD_SECURITY", value_enum, default_value = "baseline")]
    pub pod_security: crate::deploy::kubernetes::pod_security::PodSecurity,
    /// How long a flow run's pod may wait on its image or a node before its run is
    /// marked crashed and its Job deleted.
    #[arg(long, env = "PAO_POD_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub pod_grace: std::time::Duration,
    /// How often each agent tells Prefect it is alive. A thousand agents at 30 s are 33
    /// heartbeats a second, more than one Prefect server process takes on two cores;
    /// Prefect counts a worker offline after three missed heartbeats.
    #[arg(long, env = "PAO_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = nonzero_duration)]
    pub heartbeat_interval: std::time::Duration,
    /// Claims each agent has under way at once (default: 4, within the Prefect server's
    /// pool of five database connections; raise it with the server's pool size).
    #[arg(long, env = "PAO_SUBMIT_CONCURRENCY", default_value_t = crate::agent::default_submit_concurrency(),
          value_parser = at_least_one)]
    pub submit_concurrency: usize,
    /// How often PrefectWorkPools are compared with Prefect again; a change made in
    /// Prefect behind the operator's back is put back within this time.
    #[arg(long, env = "PAO_SYNC_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub sync_interval: std::time::Duration,
    /// Serve /healthz, /readyz and /metrics here.
    #[arg(long, env = "PAO_HEALTH_ADDRESS", default_value = "0.0.0.0:8080")]
    pub health_address: std::net::SocketAddr,
    /// Run agents only while holding a Lease (for more than one replica).
    #[arg(long, env = "PAO_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leader Lease (default: the pod's, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub leader_election_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "PAO_LEADER_ELECTION_ID",
        default_value = "prefect-agent-operator"
    )]
    pub leader_election_id: String,
}

/// Where claimed runs are started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeployerKind {
    /// A local subprocess per run (`prefect flow-run execute`).
    Process,
}

/// Flags of `agent`. Names of the seed's arguments are kept; Prefect's own
/// environment variables are read where they exist.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Prefect API URL, ending in /api (Cloud: .../api/accounts/<id>/workspaces/<id>).
    /// Falls back to PREFECT__CLOUD__API.
    #[arg(long, env = "PREFECT_API_URL", help_heading = "Prefect API")]
    pub api_url: Option<String>,
    /// API key, sent as a Bearer token. Prefer the variable to the flag (flags show in `ps`).
    /// Falls back to PREFECT__CLOUD__API_KEY, PREFECT__CLOUD__AGENT__AUTH_TOKEN, PREFECT__CLOUD__AUTH_TOKEN.
    #[arg(
        long,
        short = 'k',
        env = "PREFECT_API_KEY",
        hide_env_values = true,
        help_heading = "Prefect API"
    )]
    pub key: Option<String>,
    /// `user:password` for a self-hosted server started with PREFECT_SERVER_API_AUTH_STRING.
    #[arg(
        long,
        env = "PREFECT_API_AUTH_STRING",
        hide_env_values = true,
        help_heading = "Prefect API"
    )]
    pub auth_string: Option<String>,
    /// API flavour.
    #[arg(
        long,
        env = "PAO_FLAVOR",
        value_enum,
        default_value = "prefect3",
        help_heading = "Prefect API"
    )]
    pub flavor: Option<Flavor>,
    /// Work pool to take runs from (Prefect 3).
    #[arg(long, short = 'p', env = "PAO_WORK_POOL", help_heading = "Prefect API")]
    pub pool: Option<String>,
    /// Work queue of the pool (repeatable; none = all queues).
    #[arg(
        long = "queue",
        short = 'q',
        env = "PAO_WORK_QUEUES",
        value_delimiter = ',',
        help_heading = "Prefect API"
    )]
    pub queues: Vec<String>,
    /// Create the work pool with this type when it does not exist.
    #[arg(
        long,
        env = "PAO_CREATE_POOL",
        value_name = "TYPE",
        help_heading = "Prefect API"
    )]
    pub create_pool: Option<String>,
    /// Do not listen to the server's event stream; find new runs by polling only.
    #[arg(long, env = "PAO_NO_EVENTS", help_heading = "Prefect API")]
    pub no_events: bool,

    /// Agent name shown in Prefect; also marks this agent's claims, so give each agent its own.
    /// Falls back to PREFECT__CLOUD__AGENT__NAME, then "agent".
    #[arg(long, short = 'n', help_heading = "Agent (the seed's arguments)")]
    pub name: Option<String>,
    /// Who this agent is in its claims: restarted with the same id it adopts the runs it
    /// claimed but never launched; an agent of the same name with another id never takes
    /// them. Default: this machine's host name.
    #[arg(
        long,
        env = "PAO_AGENT_ID",
        help_heading = "Agent (the seed's arguments)"
    )]
    pub agent_id: Option<String>,
    /// Label (repeatable). Falls back to PREFECT__CLOUD__AGENT__LABELS (`['a', 'b']`).
    #[arg(
        long = "label",
        short = 'l',
        help_heading = "Agent (the seed's arguments)"
    )]
    pub labels: Vec<String>,
    /// KEY=VALUE added to every flow run's environment (repeatable).
    /// Falls back to PREFECT__CLOUD__AGENT__ENV_VARS (a JSON object).
    #[arg(
        long = "env",
        short = 'e',
        value_name = "KEY=VALUE",
        help_heading = "Agent (the seed's arguments)"
    )]
    pub env_vars: Vec<String>,
    /// Stop after this many polls (0 = register and stop). Default: poll forever.
    #[arg(
        long,
        env = "PAO_MAX_POLLS",
        help_heading = "Agent (the seed's arguments)"
    )]
    pub max_polls: Option<u64>,
    /// Serve GET /api/health and GET /api/poke here (`0.0.0.0:8080` or `http://0.0.0.0:8080`).
    /// Falls back to PREFECT__CLOUD__AGENT__AGENT_ADDRESS.
    #[arg(long, help_heading = "Agent (the seed's arguments)")]
    pub agent_address: Option<String>,
    /// Ship no logs to Prefect, from the agent or from the runs it starts.
    /// Also on when PREFECT__CLOUD__SEND_FLOW_RUN_LOGS=false.
    #[arg(
        long,
        env = "PAO_NO_CLOUD_LOGS",
        help_heading = "Agent (the seed's arguments)"
    )]
    pub no_cloud_logs: bool,
    /// Prefect 1 tenant (with an API key; looked up when not given).
    /// Falls back to PREFECT__CLOUD__TENANT_ID.
    #[arg(long, help_heading = "Prefect API")]
    pub tenant_id: Option<String>,
    /// Prefect 1 agent configuration id (not used by Prefect 3).
    #[arg(
        long,
        env = "PREFECT__CLOUD__AGENT__AGENT_CONFIG_ID",
        help_heading = "Agent (the seed's arguments)"
    )]
    pub agent_config_id: Option<String>,

    /// Longest sleep between polls while idle (the seed backs off from 0.25 s up to this).
    #[arg(long, env = "PAO_POLL_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration, help_heading = "Polling")]
    pub poll_interval: Duration,
    /// Runs scheduled this far in the future are picked up already.
    #[arg(long, env = "PAO_PREFETCH", default_value = "10s", value_parser = humantime::parse_duration, help_heading = "Polling")]
    pub prefetch: Duration,
    /// How often the agent tells Prefect it is alive.
    #[arg(long, env = "PAO_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration, help_heading = "Polling")]
    pub heartbeat_interval: Duration,
    /// How often cancellations and claimed-but-unlaunched runs are looked for.
    #[arg(long, env = "PAO_MAINTENANCE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration, help_heading = "Polling")]
    pub maintenance_interval: Duration,
    /// A run this agent claimed this long ago without launching it is launched again.
    #[arg(long, env = "PAO_ADOPT_AFTER", default_value = "15s", value_parser = humantime::parse_duration, help_heading = "Polling")]
    pub adopt_after: Duration,
    /// Claims under way at once (default: 4, within the Prefect server's pool of five
    /// database connections; raise it with the server's pool size).
    #[arg(long, env = "PAO_SUBMIT_CONCURRENCY", help_heading = "Polling")]
    pub submit_concurrency: Option<usize>,

    /// Where runs are started.
    #[arg(
        long,
        env = "PAO_DEPLOYER",
        value_enum,
        default_value = "process",
        help_heading = "Infrastructure"
    )]
    pub deployer: Option<DeployerKind>,
    /// Process deployer: command run for each flow run, unless the run's job variables set `command`.
    #[arg(long, env = "PAO_PROCESS_COMMAND", default_value = DEFAULT_PROCESS_COMMAND, help_heading = "Infrastructure")]
    pub command: String,
    /// Process deployer: working directory, unless the job variables set `working_dir`.
    #[arg(long, env = "PAO_PROCESS_WORKING_DIR", help_heading = "Infrastructure")]
    pub working_dir: Option<std::path::PathBuf>,

    /// Fault injection for tests: abort right after a claim, before the launch.
    #[arg(long, env = "PAO_FAULT_ABORT_AFTER_CLAIM", hide = true)]
    pub fault_abort_after_claim: bool,
}

/// A count of one or more.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be 1 or more".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration above zero (`30s`, `1m`).
fn nonzero_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// The process deployer's command when none is given (`ProcessConfig`'s default).
pub const DEFAULT_PROCESS_COMMAND: &str = "prefect flow-run execute";
