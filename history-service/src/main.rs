//! The `history-service` binary: one Unhidra service in its own process, configured by
//! `UNHIDRA_*` variables (see the README).

fn main() -> anyhow::Result<()> {
    unhidra_runtime::main_for(
        history_service::NAME,
        history_service::DEFAULT_PORT,
        |listener, config| {
            history_service::run(listener, config, unhidra_runtime::shutdown_signal())
        },
    )
}
