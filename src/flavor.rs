//! Which Prefect API an agent speaks: the `--flavor` of `agent` and `spec.api.flavor` of a
//! PrefectAgent, one type for both.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which Prefect API the agent speaks.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// Prefect 3 work pools (REST).
    #[default]
    Prefect3,
    /// Prefect 1 Server/Cloud (GraphQL), as the seed's Agent.
    Prefect1,
}
