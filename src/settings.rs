//! Turns flags and the environment into an agent's settings, with the seed's fallbacks.
//!
//! Precedence, as in Prefect 1's `Agent(...)`: an explicit flag (or its own
//! variable) wins, then Prefect 1's configuration variables, then the default.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::agent::health::parse_agent_address;
use crate::agent::{AgentConfig, default_submit_concurrency};
use crate::backend::config::BackendConfig;
use crate::backend::http::Auth;
use crate::backend::http::RetryPolicy;
use crate::backend::prefect1::Prefect1Config;
use crate::backend::prefect3::Prefect3Config;
use crate::cli::AgentArgs;
use crate::deploy::process::ProcessConfig;
use crate::flavor::Flavor;
use crate::secret::SecretString;

/// Everything a standalone agent needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub agent: AgentConfig,
    pub backend: BackendConfig,
    pub process: ProcessConfig,
    /// Things the user set that have no effect here; logged at start.
    pub warnings: Vec<String>,
}

/// A setting that cannot be used, naming the flag or variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("no Prefect API URL: pass --api-url or set PREFECT_API_URL")]
    NoApiUrl,
    #[error("--api-url `{0}` is not an http(s) URL")]
    BadApiUrl(String),
    #[error("no work pool: pass --pool or set PAO_WORK_POOL")]
    NoPool,
    #[error("--auth-string is a Prefect 3 setting; Prefect 1 takes an API key or token")]
    AuthStringOnPrefect1,
    #[error(
        "pass either --key (PREFECT_API_KEY) or --auth-string (PREFECT_API_AUTH_STRING), not both"
    )]
    TwoCredentials,
    #[error("--env expects KEY=VALUE, got `{0}`")]
    BadEnv(String),
    #[error("PREFECT__CLOUD__AGENT__ENV_VARS must be a JSON object of strings: {0}")]
    BadEnvJson(String),
    #[error("PREFECT__CLOUD__AGENT__LABELS must be a list such as ['a', 'b'], got `{0}`")]
    BadLabels(String),
    #[error("--agent-address `{0}` is not an address such as 0.0.0.0:8080")]
    BadAgentAddress(String),
    #[error(
        "--agent-config-id is a Prefect 1 setting; a Prefect 3 pool keeps its configuration in its base job template"
    )]
    AgentConfigIdOnPrefect3,
    #[error("--{flag} must be greater than zero")]
    Zero { flag: &'static str },
    #[error("--api-url: {0}")]
    CredentialsInUrl(String),
    #[error("--key / --auth-string: {0}")]
    BadCredential(String),
    #[error("--{flag} must not be empty")]
    Empty { flag: &'static str },
}

impl AgentSettings {
    /// Resolves settings from parsed flags and an environment lookup (injectable for tests).
    pub fn resolve(
        args: &AgentArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let mut warnings = Vec::new();

        let flavor = args.flavor.unwrap_or(Flavor::Prefect3);
        let prefect1 = flavor == Flavor::Prefect1;
        let api_url = args
            .api_url
            .clone()
            .or_else(|| env("PREFECT__CLOUD__API"))
            .or_else(|| prefect1.then(|| prefect1_default_url(&env)))
            .ok_or(SettingsError::NoApiUrl)?;
        let api_url = api_url.trim().trim_end_matches('/').to_string();
        if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
            return Err(SettingsError::BadApiUrl(api_url));
        }
        crate::backend::http::check_api_url(&api_url).map_err(SettingsError::CredentialsInUrl)?;
        let key = args
            .key
            .clone()
            .or_else(|| env("PREFECT__CLOUD__API_KEY"))
            .or_else(|| env("PREFECT__CLOUD__AGENT__AUTH_TOKEN"))
            .or_else(|| env("PREFECT__CLOUD__AUTH_TOKEN"))
            .filter(|k| !k.is_empty())
            .map(SecretString::new);
        let auth_string = args
            .auth_string
            .clone()
            .filter(|s| !s.is_empty())
            .map(SecretString::new);
        if key.is_some() && auth_string.is_some() {
            return Err(SettingsError::TwoCredentials);
        }
        if let Err(e) = Auth::from_credentials(key.clone(), auth_string.clone()).check() {
            return Err(SettingsError::BadCredential(e));
        }
        if prefect1 && auth_string.is_some() {
            return Err(SettingsError::AuthStringOnPrefect1);
        }
        let pool = if prefect1 {
            String::new()
        } else {
            args.pool.clone().ok_or(SettingsError::NoPool)?
        };
        if !prefect1 && args.agent_config_id.is_some() {
            return Err(SettingsError::AgentConfigIdOnPrefect3);
        }

        let name = args
            .name
            .clone()
            .or_else(|| env("PREFECT__CLOUD__AGENT__NAME"))
            .unwrap_or_else(|| "agent".to_string());
        let identity = match &args.agent_id {
            Some(id) if id.trim().is_empty() => {
                return Err(SettingsError::Empty { flag: "agent-id" });
            }
            Some(id) => id.trim().to_string(),
            None => crate::deploy::process::host_name(),
        };
        let labels = if args.labels.is_empty() {
            match env("PREFECT__CLOUD__AGENT__LABELS") {
                Some(raw) => parse_label_list(&raw)?,
                None => Vec::new(),
            }
        } else {
            args.labels.clone()
        };
        if !prefect1 && !labels.is_empty() {
            warnings.push(format!(
                "labels {labels:?} do not select runs in Prefect 3; use --queue to split a pool's work"
            ));
        }
        let env_vars = if args.env_vars.is_empty() {
            match env("PREFECT__CLOUD__AGENT__ENV_VARS") {
                Some(raw) => parse_env_json(&raw)?,
                None => BTreeMap::new(),
            }
        } else {
            parse_env_pairs(&args.env_vars)?
        };
        let agent_address = args
            .agent_address
            .clone()
            .or_else(|| env("PREFECT__CLOUD__AGENT__AGENT_ADDRESS"))
            .map(|a| parse_agent_address(&a).ok_or(SettingsError::BadAgentAddress(a)))
            .transpose()?;
        let no_cloud_logs = args.no_cloud_logs
            || env("PREFECT__CLOUD__SEND_FLOW_RUN_LOGS")
                .is_some_and(|v| v.eq_ignore_ascii_case("false"));

        for (flag, d) in [
            ("poll-interval", args.poll_interval),
            ("heartbeat-interval", args.heartbeat_interval),
            ("maintenance-interval", args.maintenance_interval),
        ] {
            if d.is_zero() {
                return Err(SettingsError::Zero { flag });
            }
        }
        if args.submit_concurrency == Some(0) {
            return Err(SettingsError::Zero {
                flag: "submit-concurrency",
            });
        }

        let agent = AgentConfig {
            agent_config_id: args.agent_config_id.clone(),
            name: name.clone(),
            labels,
            env_vars,
            max_polls: args.max_polls,
            agent_address,
            no_cloud_logs,
            poll_interval: args.poll_interval,
            heartbeat_interval: args.heartbeat_interval,
            maintenance_interval: args.maintenance_interval,
            adopt_after: args.adopt_after,
            submit_concurrency: args
                .submit_concurrency
                .unwrap_or_else(default_submit_concurrency),
            fault_abort_after_claim: args.fault_abort_after_claim,
        };
        let backend = if prefect1 {
            BackendConfig::Prefect1(Prefect1Config {
                api_url,
                backend: env("PREFECT__BACKEND")
                    .unwrap_or_else(|| if key.is_some() { "cloud" } else { "server" }.to_string()),
                key,
                tenant_id: args
                    .tenant_id
                    .clone()
                    .or_else(|| env("PREFECT__CLOUD__TENANT_ID"))
                    .filter(|t| !t.is_empty()),
                agent_name: name,
                identity: identity.clone(),
                agent_type: "LocalAgent".into(),
                labels: agent.labels.clone(),
                agent_config_id: args.agent_config_id.clone(),
                prefetch: args.prefetch,
                log_level: env("PREFECT__LOGGING__LEVEL").unwrap_or_else(|| "INFO".into()),
                retry: RetryPolicy::default(),
            })
        } else {
            BackendConfig::Prefect3(Prefect3Config {
                api_url,
                auth: Auth::from_credentials(key, auth_string),
                pool,
                queues: args
                    .queues
                    .iter()
                    .filter(|q| !q.is_empty())
                    .cloned()
                    .collect(),
                agent_name: name,
                identity,
                prefetch: args.prefetch,
                heartbeat_interval: args.heartbeat_interval,
                create_pool: args.create_pool.clone(),
                poll_limit: 200,
                retry: RetryPolicy::default(),
                events: !args.no_events,
            })
        };
        // Prefect 1 runs start with its own command unless one was given.
        let command = if prefect1 && args.command == crate::deploy::process::DEFAULT_COMMAND {
            crate::backend::prefect1::run_config::flow_run_command(None).to_string()
        } else {
            args.command.clone()
        };
        let process = ProcessConfig {
            command,
            working_dir: args.working_dir.clone(),
            ..ProcessConfig::default()
        };
        Ok(Self {
            agent,
            backend,
            process,
            warnings,
        })
    }
}

/// Prefect 1's endpoint when none is given: the server's with `PREFECT__BACKEND=server`,
/// else Prefect Cloud 1.
fn prefect1_default_url(env: &impl Fn(&str) -> Option<String>) -> String {
    if env("PREFECT__BACKEND").is_some_and(|b| b == "server") {
        env("PREFECT__SERVER__ENDPOINT").unwrap_or_else(|| "http://localhost:4200/graphql".into())
    } else {
        "https://api.prefect.io".into()
    }
}

/// Parses Prefect 1's label list: `['a', 'b']`, `["a"]`, or a bare `a,b`.
pub fn parse_label_list(raw: &str) -> Result<Vec<String>, SettingsError> {
    let t = raw.trim();
    let inner = match (t.strip_prefix('['), t.ends_with(']')) {
        (Some(rest), true) => &rest[..rest.len() - 1],
        (None, false) => t,
        _ => return Err(SettingsError::BadLabels(raw.to_string())),
    };
    let mut labels = Vec::new();
    for item in inner.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let unquoted = ['\'', '"']
            .iter()
            .find_map(|q| item.strip_prefix(*q).and_then(|s| s.strip_suffix(*q)))
            .unwrap_or(item);
        if unquoted.is_empty() || unquoted.contains(['\'', '"', '[', ']']) {
            return Err(SettingsError::BadLabels(raw.to_string()));
        }
        labels.push(unquoted.to_string());
    }
    Ok(labels)
}

/// Parses repeated `--env KEY=VALUE` flags.
pub fn parse_env_pairs(pairs: &[String]) -> Result<BTreeMap<String, String>, SettingsError> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
            _ => Err(SettingsError::BadEnv(p.clone())),
        })
        .collect()
}

fn parse_env_json(raw: &str) -> Result<BTreeMap<String, String>, SettingsError> {
    let v: Value =
        serde_json::from_str(raw).map_err(|e| SettingsError::BadEnvJson(e.to_string()))?;
    let Value::Object(map) = v else {
        return Err(SettingsError::BadEnvJson(format!("got {v}")));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            Value::Number(_) | Value::Bool(_) => Ok((k, v.to_string())),
            other => Err(SettingsError::BadEnvJson(format!("`{k}` is {other}"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use std::collections::HashMap;

    fn args(argv: &[&str]) -> AgentArgs {
        let mut full = vec!["pao", "agent"];
        full.extend_from_slice(argv);
        // Flags only: the test environment must not leak in through clap's `env`.
        let cli = Cli::try_parse_from(full).unwrap();
        match cli.command {
            Command::Agent(a) => *a,
            _ => unreachable!("parsed an agent command line"),
        }
    }

    fn resolve(argv: &[&str], env: &[(&str, &str)]) -> Result<AgentSettings, SettingsError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        AgentSettings::resolve(&args(argv), |k| env.get(k).cloned())
    }

    const BASE: [&str; 4] = ["--api-url", "http://127.0.0.1:4200/api/", "--pool", "p"];

    fn prefect3(s: &AgentSettings) -> &Prefect3Config {
        match &s.backend {
            BackendConfig::Prefect3(cfg) => cfg,
            BackendConfig::Prefect1(_) => panic!("expected Prefect 3 settings"),
        }
    }

    fn prefect1(s: &AgentSettings) -> &Prefect1Config {
        match &s.backend {
            BackendConfig::Prefect1(cfg) => cfg,
            BackendConfig::Prefect3(_) => panic!("expected Prefect 1 settings"),
        }
    }

    #[test]
    fn prefect1_flavor_takes_the_seed_s_settings() {
        let s = resolve(
            &[
                "--flavor",
                "prefect1",
                "--agent-config-id",
                "cfg-1",
                "-l",
                "k8s",
            ],
            &[
                ("PREFECT__BACKEND", "server"),
                ("PREFECT__SERVER__ENDPOINT", "http://p1:4200/graphql"),
                ("PREFECT__CLOUD__AGENT__AUTH_TOKEN", "tok"),
                ("PREFECT__CLOUD__TENANT_ID", "t-1"),
            ],
        )
        .unwrap();
        let cfg = prefect1(&s);
        assert_eq!(cfg.api_url, "http://p1:4200/graphql");
        assert_eq!(cfg.key.as_ref().map(|k| k.expose()), Some("tok"));
        assert_eq!(cfg.tenant_id.as_deref(), Some("t-1"));
        assert_eq!(cfg.agent_config_id.as_deref(), Some("cfg-1"));
        assert_eq!(cfg.labels, ["k8s"]);
        assert_eq!(cfg.backend, "server");
        assert!(s.warnings.is_empty(), "labels select runs in Prefect 1");
        assert_eq!(s.process.command, "prefect execute flow-run");
        let cloud = resolve(&["--flavor", "prefect1"], &[]).unwrap();
        assert_eq!(prefect1(&cloud).api_url, "https://api.prefect.io");
        assert_eq!(
            resolve(&["--flavor", "prefect1", "--auth-string", "u:p"], &[]).unwrap_err(),
            SettingsError::AuthStringOnPrefect1
        );
    }

    #[test]
    fn seed_defaults() {
        let s = resolve(&BASE, &[]).unwrap();
        assert_eq!(s.agent.name, "agent");
        assert!(s.agent.labels.is_empty());
        assert!(s.agent.env_vars.is_empty());
        assert_eq!(s.agent.max_polls, None);
        assert_eq!(s.agent.agent_address, None);
        assert!(!s.agent.no_cloud_logs);
        assert_eq!(prefect3(&s).api_url, "http://127.0.0.1:4200/api");
        assert!(matches!(
            prefect3(&s).auth,
            crate::backend::http::Auth::None
        ));
        assert_eq!(s.agent.poll_interval.as_secs(), 10);
        assert_eq!(
            prefect3(&s).identity,
            crate::deploy::process::host_name(),
            "claims are this machine's unless --agent-id says otherwise"
        );
    }

    #[test]
    fn credentials_go_in_flags_not_in_the_url_and_must_fit_a_header() {
        let err = resolve(&["--api-url", "http://u:PASS@h/api", "--pool", "p"], &[]).unwrap_err();
        assert!(matches!(err, SettingsError::CredentialsInUrl(_)));
        assert!(!err.to_string().contains("PASS"));
        let mut argv = BASE.to_vec();
        argv.extend(["--key", "pnu_a\nb"]);
        let err = resolve(&argv, &[]).unwrap_err();
        assert!(err.to_string().starts_with("--key"), "{err}");
    }

    #[test]
    fn the_agent_id_marks_claims() {
        let mut argv = BASE.to_vec();
        argv.extend(["--agent-id", "worker-7"]);
        assert_eq!(prefect3(&resolve(&argv, &[]).unwrap()).identity, "worker-7");
        let mut argv = BASE.to_vec();
        argv.extend(["--agent-id", " "]);
        assert_eq!(
            resolve(&argv, &[]).unwrap_err().to_string(),
            "--agent-id must not be empty"
        );
    }

    #[test]
    fn prefect1_environment_fallbacks() {
        let s = resolve(
            &["--pool", "p"],
            &[
                ("PREFECT__CLOUD__API", "https://api.example/api"),
                ("PREFECT__CLOUD__AGENT__NAME", "from-env"),
                ("PREFECT__CLOUD__AGENT__LABELS", "['a', \"b\"]"),
                ("PREFECT__CLOUD__AGENT__AUTH_TOKEN", "tok"),
                (
                    "PREFECT__CLOUD__AGENT__ENV_VARS",
                    r#"{"TEAM": "data", "N": 1}"#,
                ),
                (
                    "PREFECT__CLOUD__AGENT__AGENT_ADDRESS",
                    "http://127.0.0.1:8080",
                ),
                ("PREFECT__CLOUD__SEND_FLOW_RUN_LOGS", "false"),
            ],
        )
        .unwrap();
        assert_eq!(prefect3(&s).api_url, "https://api.example/api");
        assert_eq!(s.agent.name, "from-env");
        assert_eq!(s.agent.labels, ["a", "b"]);
        assert!(
            matches!(&prefect3(&s).auth, crate::backend::http::Auth::Bearer(k) if k.expose() == "tok")
        );
        assert_eq!(s.agent.env_vars["TEAM"], "data");
        assert_eq!(s.agent.env_vars["N"], "1");
        assert_eq!(
            s.agent.agent_address,
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert!(s.agent.no_cloud_logs);
        assert_eq!(s.warnings.len(), 1, "labels have no effect on Prefect 3");
    }

    #[test]
    fn flags_win_over_prefect1_environment() {
        let mut argv = BASE.to_vec();
        argv.extend([
            "-n",
            "flag",
            "-l",
            "x",
            "-e",
            "A=1=2",
            "--max-polls",
            "3",
            "--no-cloud-logs",
        ]);
        let s = resolve(
            &argv,
            &[
                ("PREFECT__CLOUD__AGENT__NAME", "env"),
                ("PREFECT__CLOUD__AGENT__LABELS", "['y']"),
                ("PREFECT__CLOUD__AGENT__ENV_VARS", r#"{"B": "2"}"#),
            ],
        )
        .unwrap();
        assert_eq!(s.agent.name, "flag");
        assert_eq!(s.agent.labels, ["x"]);
        assert_eq!(
            s.agent.env_vars,
            BTreeMap::from([("A".into(), "1=2".into())])
        );
        assert_eq!(s.agent.max_polls, Some(3));
        assert!(s.agent.no_cloud_logs);
    }

    #[test]
    fn bad_settings_name_the_flag() {
        assert_eq!(
            resolve(&["--pool", "p"], &[]).unwrap_err(),
            SettingsError::NoApiUrl
        );
        assert_eq!(
            resolve(&["--api-url", "x"], &[]).unwrap_err(),
            SettingsError::BadApiUrl("x".into())
        );
        assert_eq!(
            resolve(&["--api-url", "http://x/api"], &[]).unwrap_err(),
            SettingsError::NoPool
        );
        let mut argv = BASE.to_vec();
        argv.extend(["-e", "NOEQUALS"]);
        assert!(
            resolve(&argv, &[])
                .unwrap_err()
                .to_string()
                .contains("--env expects KEY=VALUE")
        );
        let mut argv = BASE.to_vec();
        argv.extend(["--key", "k", "--auth-string", "u:p"]);
        assert_eq!(
            resolve(&argv, &[]).unwrap_err(),
            SettingsError::TwoCredentials
        );
        let mut argv = BASE.to_vec();
        argv.extend(["--agent-address", "nonsense"]);
        assert!(
            resolve(&argv, &[])
                .unwrap_err()
                .to_string()
                .contains("--agent-address")
        );
        let mut argv = BASE.to_vec();
        argv.extend(["--poll-interval", "0s"]);
        assert!(
            resolve(&argv, &[])
                .unwrap_err()
                .to_string()
                .contains("--poll-interval")
        );
        let mut argv = BASE.to_vec();
        argv.extend(["--agent-config-id", "abc"]);
        assert_eq!(
            resolve(&argv, &[]).unwrap_err(),
            SettingsError::AgentConfigIdOnPrefect3
        );
        assert!(resolve(&BASE, &[("PREFECT__CLOUD__AGENT__ENV_VARS", "[1]")]).is_err());
        assert!(resolve(&BASE, &[("PREFECT__CLOUD__AGENT__LABELS", "['a'")]).is_err());
    }

    #[test]
    fn label_lists() {
        assert_eq!(parse_label_list("[]").unwrap(), Vec::<String>::new());
        assert_eq!(parse_label_list("['a', 'b c']").unwrap(), ["a", "b c"]);
        assert_eq!(parse_label_list(r#"["x"]"#).unwrap(), ["x"]);
        assert_eq!(parse_label_list("a, b").unwrap(), ["a", "b"]);
        assert!(parse_label_list("['a', 'b'").is_err());
        assert!(parse_label_list("['a'b']").is_err());
    }
}
