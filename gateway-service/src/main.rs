//! The `gateway-service` binary: one Unhidra service in its own process, configured by
//! `UNHIDRA_*` variables (see the README).

fn main() -> anyhow::Result<()> {
    unhidra_runtime::main_for(
        gateway_service::NAME,
        gateway_service::DEFAULT_PORT,
        |listener, config| {
            gateway_service::run(listener, config, unhidra_runtime::shutdown_signal())
        },
    )
}
