//! The `kubernetes` deployer: one Job per flow run, built from the pool's base job template.

pub mod job;
pub mod template;
