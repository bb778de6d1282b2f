//! Operations: the loopback HTTP endpoint (metrics and health) and process hygiene.

pub mod admission;
pub mod http;
pub mod hygiene;
