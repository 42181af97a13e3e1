//! `unhidra`: the embedded default. `cargo run --release --bin unhidra` starts
//! every service on 127.0.0.1:9000 with SQLite under `./data`; no other
//! software is needed.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    unhidra_runtime::main_for("unhidra", unhidra::DEFAULT_PORT, |listener, config| {
        unhidra::run(listener, config, unhidra_runtime::shutdown_signal())
    })
    .await
}
