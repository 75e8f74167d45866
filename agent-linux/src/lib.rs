//! `kvmmanager-agent`, the Linux guest agent.
//!
//! The binary (`main.rs`) only calls [`cli::main`]; everything else lives
//! here so that tests, benches and fuzzers call the same code. See
//! ARCHITECTURE.md for the map: [`transport`] reads the port, [`server`]
//! runs a connection (framing, back-pressure, the [`session`] context),
//! [`dispatch`] is the method core behind the JSON-RPC envelope, and the
//! handlers ([`sysinfo`], [`exec`], [`files`], [`power`])
//! apply the [`policy`] of the [`config`]. Every `unsafe` system call
//! wrapper is in `sys`, and every process is spawned by [`exec`].

pub mod audit;
pub mod buffers;
pub mod cancel;
pub mod cgroup;
pub mod cli;
pub mod config;
mod dirwatch;
pub mod dispatch;
pub mod error;
pub mod exec;
pub mod exec_stream;
pub mod files;
pub mod follow;
pub mod forward;
pub mod logging;
pub mod ops;
pub mod payload;
pub mod policy;
pub mod power;
pub mod qga;
pub mod server;
pub mod session;
pub mod streams;
mod sys;
pub mod sysinfo;
pub mod transport;
