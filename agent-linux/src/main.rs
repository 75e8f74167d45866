//! `kvmmanager-agent`: see the library for everything it does.

fn main() -> std::process::ExitCode {
    agent_linux::cli::main()
}
