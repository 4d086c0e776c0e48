//! prefect-agent-operator: Prefect agents as Kubernetes resources.
//!
//! Data flows one way: a [`backend::Backend`] finds and claims flow runs, the
//! [`agent::Agent`] loop decides what to do with them, a [`deploy::Deployer`]
//! starts the infrastructure, and what happens is reported back through the
//! backend.

pub mod agent;
pub mod app;
pub mod backend;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod deploy;
pub mod devrunner;
pub mod flavor;
pub mod leader;
pub mod metrics;
pub mod operator_api;
pub mod scope;
pub mod secret;
pub mod settings;
pub mod signals;
pub mod sync;
pub mod telemetry;
pub mod text;
pub mod work_pool;

/// The field manager, user agent and log target this program identifies itself with.
pub const APP_NAME: &str = "prefect-agent-operator";

/// Makes rustls usable: kube and reqwest would otherwise each bring a crypto provider
/// and rustls refuses to pick one. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
