//! `unhidra`: the embedded default. `cargo run --release --bin unhidra` starts
//! every service on 127.0.0.1:9000 with SQLite under `./data`; no other
//! software is needed. `unhidra admin create <email>` makes that account an
//! admin (creating it with the password read from standard input); `unhidra
//! keys rotate` adds a new token signing key; `unhidra nats-config` prints the
//! NATS server's per-service users and permissions for the scaled-out
//! deployment.

use std::io::BufRead;

use secrecy::SecretString;

const ADMIN_USAGE: &str =
    "usage: unhidra admin create <email>   (the password is read from standard input)";
const KEYS_USAGE: &str = "usage: unhidra keys rotate";
const NATS_USAGE: &str =
    "usage: unhidra nats-config   (for the bus prefix UNHIDRA_BUS_PREFIX names)";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("admin") => with_runtime(|config| admin(&args[1..], config)),
        Some("keys") => with_runtime(|config| keys(&args[1..], config)),
        Some("nats-config") => {
            if args.len() > 1 {
                anyhow::bail!(NATS_USAGE);
            }
            let config = unhidra_core::Config::load()?;
            let subjects = unhidra_core::subjects::Subjects::new(&config.bus_prefix);
            print!("{}", unhidra_bus::nats_authorization(&subjects));
            Ok(())
        }
        _ => unhidra_runtime::main_for("unhidra", unhidra::DEFAULT_PORT, |listener, config| {
            unhidra::run(listener, config, unhidra_runtime::shutdown_signal())
        }),
    }
}

/// Runs an administrative command with the configuration, on its runtime.
fn with_runtime<F, Fut>(command: F) -> anyhow::Result<()>
where
    F: FnOnce(unhidra_core::Config) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = unhidra_core::Config::load()?;
    unhidra_runtime::runtime(&config)?.block_on(command(config))
}

async fn admin(args: &[String], config: unhidra_core::Config) -> anyhow::Result<()> {
    let [command, email] = args else {
        anyhow::bail!(ADMIN_USAGE);
    };
    if command != "create" {
        anyhow::bail!(ADMIN_USAGE);
    }
    // Read, not taken from the command line, where other users could see it.
    let mut password = String::new();
    std::io::stdin().lock().read_line(&mut password)?;
    let password = SecretString::from(password.trim_end_matches(['\r', '\n']).to_owned());
    let user = auth_api::create_admin(&config, email, password).await?;
    println!("{email} is an admin (user {user})");
    Ok(())
}

async fn keys(args: &[String], config: unhidra_core::Config) -> anyhow::Result<()> {
    if args != ["rotate"] {
        anyhow::bail!(KEYS_USAGE);
    }
    let kid = auth_api::rotate_signing_key(&config).await?;
    println!(
        "new tokens are signed with key {kid} (running replicas switch within {} s)",
        auth_api::KEY_RELOAD_SECS
    );
    Ok(())
}
