//! Where a daemon's `tracing` events go: the journal under systemd, stderr otherwise.

/// Logs through `tracing` (filter from `$REWIND_LOG`, default info): to the journal, with
/// structured fields, when systemd connected our output to it (`$JOURNAL_STREAM`); to stderr
/// otherwise (with colour on a terminal). Call it once, early in `main`; a later call keeps the
/// logging the first one set up.
pub fn init() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let filter =
        || EnvFilter::try_from_env("REWIND_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journal) = tracing_journald::layer() {
            // Fails only when a subscriber is already set, which then stays.
            let _ = tracing_subscriber::registry()
                .with(filter())
                .with(journal)
                .try_init();
            return;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
