//! A backend, configured: built from the `agent` flags (`settings`) or from a
//! PrefectAgent's spec (`controller::config`), turned into a running agent in one place
//! ([`crate::agent::AnyAgent`]).

use super::prefect1::Prefect1Config;
use super::prefect3::Prefect3Config;

/// Which API the agent speaks, with its settings.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    Prefect3(Prefect3Config),
    Prefect1(Prefect1Config),
}
