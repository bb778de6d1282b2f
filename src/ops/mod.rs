//! Operations: the loopback HTTP endpoint (metrics and health) and process hygiene.

pub mod http;
pub mod hygiene;
