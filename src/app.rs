//! The composition root: runs what the command line asks for, wiring settings, backends,
//! deployers and the controller together. Errors become one line on stderr.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use crate::agent::{AgentError, AnyAgent, StopReason};
use crate::cli::{AgentArgs, Cli, Command, DevRunnerArgs, OperatorArgs};
use crate::deploy::process::ProcessDeployer;
use crate::leader::LeaderConfig;
use crate::operator_api::Readiness;
use crate::settings::AgentSettings;
use crate::telemetry;

/// Runs the command line; errors become one line on stderr and a non-zero exit code.
pub fn run(cli: Cli) -> ExitCode {
    if let Command::Crdgen(args) = &cli.command {
        let yaml = match &args.file {
            None => Some(crate::crd::all_yaml()),
            Some(file) => crate::crd::crd_yaml_of(file),
        };
        return match yaml {
            Some(Ok(yaml)) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Some(Err(e)) => {
                eprintln!("error: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
            None => {
                let files: Vec<&str> = crate::crd::all().iter().map(|(f, _)| *f).collect();
                eprintln!(
                    "error: --file: no CRD is kept as {:?}; one of {files:?}",
                    args.file
                );
                ExitCode::from(2)
            }
        };
    }
    if let Err(e) = telemetry::init(cli.log_format, &cli.log_level) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Agent(args) => runtime.block_on(run_agent(*args)),
        Command::Crdgen(_) => Ok(()),
        Command::Operator(args) => runtime.block_on(run_operator(args)),
        Command::DevRunner(args) => runtime.block_on(run_dev_runner(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError { message, code }) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

/// An error for the user: one line, and the exit code (2 for usage, 1 otherwise).
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub code: u8,
}

impl CliError {
    fn usage(e: impl std::fmt::Display) -> Self {
        Self {
            message: e.to_string(),
            code: 2,
        }
    }

    fn runtime(e: impl std::fmt::Display) -> Self {
        Self {
            message: e.to_string(),
            code: 1,
        }
    }
}

async fn run_agent(args: AgentArgs) -> Result<(), CliError> {
    let settings =
        AgentSettings::resolve(&args, |k| std::env::var(k).ok()).map_err(CliError::usage)?;
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    let shutdown = crate::signals::shutdown_on_signals().map_err(CliError::runtime)?;
    let deployer = ProcessDeployer::new(settings.process);
    let agent =
        AnyAgent::new(settings.agent, settings.backend, deployer).map_err(CliError::runtime)?;
    let stopped = agent.start(shutdown).await.map_err(|e| match e {
        // The standalone agent can create its pool itself.
        AgentError::NoPool { kind, .. } => {
            CliError::runtime(format!("{e}, or pass --create-pool {kind}"))
        }
        e => CliError::runtime(e),
    })?;
    match stopped {
        StopReason::MaxPolls => tracing::info!("max polls reached"),
        StopReason::Shutdown => {}
    }
    Ok(())
}

async fn run_operator(args: OperatorArgs) -> Result<(), CliError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| CliError::runtime(format!("cannot configure a Kubernetes client: {e}")))?;
    let version = client
        .apiserver_version()
        .await
        .map_err(|e| CliError::runtime(format!("cannot reach the Kubernetes API: {e}")))?;
    tracing::info!(version = %version.git_version, "connected to Kubernetes");
    if args.install_crd {
        use kube::api::{Patch, PatchParams};
        let crds: kube::Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            kube::Api::all(client.clone());
        for (_, crd) in crate::crd::all() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            crds.patch(
                &name,
                &PatchParams::apply(crate::controller::FIELD_MANAGER).force(),
                &Patch::Apply(crd),
            )
            .await
            .map_err(|e| CliError::runtime(format!("cannot install the CRD {name}: {e}")))?;
            tracing::info!(crd = %name, "CRD installed");
        }
    }
    let shutdown = crate::signals::shutdown_on_signals().map_err(CliError::runtime)?;
    let readiness = Arc::new(Readiness::default());
    readiness.api_reachable.store(true, Ordering::Relaxed);
    let scope = crate::scope::Scope {
        watch_namespace: args.namespace.clone(),
        job_namespaces: crate::scope::JobNamespaces::from_list(&args.job_namespaces),
        pod_security: args.pod_security,
    };
    let agent_defaults = crate::controller::AgentDefaults {
        heartbeat_interval: args.heartbeat_interval,
        submit_concurrency: args.submit_concurrency,
    };
    let ctx =
        crate::controller::Context::new(client.clone(), args.pod_grace, scope, agent_defaults);
    crate::operator_api::serve(
        args.health_address,
        readiness.clone(),
        ctx.registry.clone(),
        ctx.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|e| {
        CliError::runtime(format!(
            "cannot serve on --health-address {}: {e}",
            args.health_address
        ))
    })?;
    tokio::spawn(watch_api(
        client.clone(),
        readiness.clone(),
        shutdown.clone(),
    ));

    // Agents run only while this replica leads; losing the Lease ends the process.
    let run_token = shutdown.child_token();
    let mut renewer = None;
    if args.leader_elect {
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
            format!(
                "{}-{}",
                crate::deploy::process::host_name(),
                std::process::id()
            )
        });
        let cfg = LeaderConfig::new(
            args.leader_election_namespace.clone(),
            args.leader_election_id.clone(),
            identity,
        );
        let Some((lost, handle)) = crate::leader::lead(client.clone(), cfg, shutdown.clone()).await
        else {
            return Ok(());
        };
        let token = run_token.clone();
        tokio::spawn(async move {
            lost.cancelled().await;
            token.cancel();
        });
        renewer = Some(handle);
    }
    readiness.leading.store(true, Ordering::Relaxed);
    // Guarded: one resource that does not decode must not keep the operator unready.
    let agents: kube::Api<crate::controller::Guarded> = match &args.namespace {
        Some(ns) => kube::Api::namespaced(client.clone(), ns),
        None => kube::Api::all(client.clone()),
    };
    // Ready once PrefectAgents can be listed (a CRD installed a moment ago is not served yet).
    let mut warned = false;
    while let Err(e) = agents
        .list(&kube::api::ListParams::default().limit(1))
        .await
    {
        if !warned {
            tracing::warn!(error = %e, "cannot list PrefectAgents yet; retrying (is the CRD installed?)");
            warned = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = run_token.cancelled() => return Ok(()),
        }
    }
    readiness.synced.store(true, Ordering::Relaxed);
    let sync = crate::sync::run(
        client.clone(),
        args.namespace.clone(),
        args.sync_interval,
        run_token.clone(),
    );
    let agents = crate::controller::run(ctx, args.namespace, run_token, readiness.clone());
    tokio::join!(agents, sync);
    readiness.leading.store(false, Ordering::Relaxed);
    if let Some(handle) = renewer {
        shutdown.cancel();
        if let Ok(Err(e)) = handle.await {
            return Err(CliError::runtime(e));
        }
    }
    Ok(())
}

/// Keeps `api_reachable` current: /readyz fails while Kubernetes cannot be reached.
async fn watch_api(client: kube::Client, readiness: Arc<Readiness>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
            _ = stop.cancelled() => return,
        }
        let ok = client.apiserver_version().await.is_ok();
        if readiness.api_reachable.swap(ok, Ordering::Relaxed) != ok {
            tracing::warn!(reachable = ok, "Kubernetes API reachability changed");
        }
    }
}

async fn run_dev_runner(args: DevRunnerArgs) -> Result<(), CliError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| CliError::runtime(format!("cannot configure a Kubernetes client: {e}")))?;
    let shutdown = crate::signals::shutdown_on_signals().map_err(CliError::runtime)?;
    crate::devrunner::run(client, args.namespace, shutdown).await;
    Ok(())
}
