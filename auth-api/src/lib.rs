//! auth-api owns identities: users and their argon2id password hashes, login
//! sessions with rotating refresh tokens, and the Ed25519 keys that sign access
//! tokens (published as a JWKS over HTTP and over the bus).

mod passwords;
mod sessions;
mod signing_keys;
mod users;

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use tokio::net::TcpListener;
use unhidra_core::{
    Config,
    events::{JwksRequest, RpcReply},
    token::Jwks,
};
use unhidra_runtime::{Service, ServiceContext, rpc};
use unhidra_store::{Database, Migration};

use crate::{passwords::Passwords, signing_keys::SigningKeys};

pub const NAME: &str = "auth-api";
pub const DEFAULT_PORT: u16 = 9200;

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "identities",
    sql: include_str!("../migrations/0001_identities.sql"),
}];

#[derive(Clone)]
struct AuthState {
    ctx: ServiceContext,
    db: Database,
    passwords: Passwords,
    keys: SigningKeys,
}

/// Migrates the database, loads (or creates) the signing key, and answers JWKS
/// requests on the bus.
pub async fn build(ctx: ServiceContext, db: Database) -> anyhow::Result<Service> {
    db.migrate(NAME, MIGRATIONS).await?;
    ctx.bus.ensure_stream(&ctx.subjects.audit_stream()).await?;
    let keys = SigningKeys::load_or_create(&db).await?;
    let state = AuthState {
        ctx: ctx.clone(),
        db: db.clone(),
        passwords: Passwords::new(ctx.config.password_hash_concurrency).await?,
        keys: keys.clone(),
    };
    let jwks_responder = rpc::respond(
        &ctx,
        ctx.subjects.auth_jwks(),
        NAME,
        move |_: JwksRequest| {
            let jwks = keys.jwks().clone();
            async move { RpcReply::Ok(jwks) }
        },
    )
    .await?;
    let router = Router::new()
        .route("/api/v1/auth/register", post(users::register))
        .route("/api/v1/auth/login", post(sessions::login))
        .route("/api/v1/auth/refresh", post(sessions::refresh))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(state);
    Ok(Service {
        name: NAME,
        router,
        database: Some(db),
        tasks: vec![jwks_responder],
    })
}

async fn jwks(State(state): State<AuthState>) -> Json<Jwks> {
    Json(state.keys.jwks().clone())
}

/// Runs auth-api alone on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    unhidra_runtime::run_service(listener, config, shutdown, NAME, build).await
}
