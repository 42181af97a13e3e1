//! The `auth-api` binary: one Unhidra service in its own process, configured by
//! `UNHIDRA_*` variables (see the README).

fn main() -> anyhow::Result<()> {
    unhidra_runtime::main_for(
        auth_api::NAME,
        auth_api::DEFAULT_PORT,
        |listener, config| auth_api::run(listener, config, unhidra_runtime::shutdown_signal()),
    )
}
