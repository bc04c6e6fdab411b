//! `rewind-receiver`: parses the command line, runs it, maps failure to exit code 1.

use clap::Parser;
use rewind_receiver::cli::{self, Cli};

// Many short-lived 64 KiB block buffers: mimalloc reuses them instead of returning pages
// to the kernel and faulting them in again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // The service manager's variables, read and removed before any thread or child exists.
    rewind_daemon::systemd::take_environment();
    // One crypto provider for the whole process, chosen before any TLS object exists.
    rewind_daemon::tls::install_provider();
    rewind_daemon::logging::init();
    match cli::run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", rewind_proto::report::Chain(&*e));
            std::process::ExitCode::FAILURE
        }
    }
}
