//! Entry point: parse the command line, set up logging, dispatch, map errors to
//! exit codes. Everything else lives in the library (`xcp_vm_agent`).
fn main() {
    std::process::exit(xcp_vm_agent::cli::main());
}
