//! `kvmmanager-ctl`: talk to a VM's kvmmanager-agent. See `host_client::cli`.

fn main() {
    std::process::exit(host_client::cli::main());
}
