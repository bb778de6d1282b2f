//! Integration tests: the built binary, over its real Unix socket, with a real gRPC client.

mod common;

mod bad_input;
mod hierarchy;
mod protocol;
mod socket;
