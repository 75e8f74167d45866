//! The guest operations: freeze and thaw ([`freeze`]), trim ([`trim`]),
//! time ([`time`]), users, SSH keys and passwords ([`users`]), vCPUs
//! ([`cpu`]) and memory blocks ([`memory`]), the filesystem-to-disk map ([`disks`]) statistics
//! ([`stats`]), metrics, processes and signals ([`procs`], over the
//! process table of [`proc_pid`]), logs
//! ([`logs`]) and suspend ([`suspend`]), over the mount
//! table ([`mounts`]). Each handler knows nothing of the wire; `dispatch`
//! calls them. Their `unsafe` system calls are in `sys` (`sys/ops.rs`);
//! the programs they run (freeze hooks, `chpasswd`) are started by
//! `crate::exec::run_helper`.

pub mod cpu;
pub mod disks;
pub mod freeze;
pub mod logs;
pub mod memory;
pub mod mounts;
pub mod proc_pid;
pub mod procs;
pub mod stats;
pub mod suspend;
pub mod time;
pub mod trim;
pub mod users;
