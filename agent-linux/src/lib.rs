//! `kvmmanager-agent`, the Linux guest agent.
//!
//! The binary (`main.rs`) only parses the command line and builds the
//! runtime; everything else lives here so that tests, benches and fuzzers
//! call the same code. See ARCHITECTURE.md for the map.

pub mod config;
pub mod error;
pub mod exec;
pub mod files;
pub mod policy;
