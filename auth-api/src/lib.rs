//! auth-api owns identities: users and their argon2id password hashes, login
//! sessions with rotating refresh tokens, and the Ed25519 keys that sign access
//! tokens (published as a JWKS over HTTP and over the bus).

mod accounts;
mod admin;
mod api_keys;
mod devices;
mod discovery;
mod fields;
mod invites;
mod mail;
mod mfa;
mod one_time_tokens;
mod passwords;
mod resets;
mod sessions;
mod signing_keys;
mod users;

use axum::{
    Router,
    routing::{delete, get, patch, post},
};
use prometheus::{IntCounter, IntCounterVec};
use tokio::net::TcpListener;
use unhidra_core::{
    Config,
    rpc::{AuthApiKey, AuthJwks, AuthRevocations},
};
use unhidra_ratelimit::Limit;
use unhidra_runtime::{ApiState, Service, ServiceContext, body_limit, rpc};
use unhidra_store::{Database, Migration};

use crate::{
    accounts::{AccountRepo, LockoutPolicy},
    api_keys::ApiKeyRepo,
    devices::DeviceRepo,
    invites::InviteRepo,
    mail::Mailer,
    mfa::MfaRepo,
    one_time_tokens::OneTimeTokenRepo,
    passwords::Passwords,
    sessions::SessionRepo,
    signing_keys::{SigningKeyRepo, SigningKeys},
};

pub const NAME: &str = unhidra_core::bus_access::Role::AuthApi.name();
pub const DEFAULT_PORT: u16 = 9200;
/// How often each replica reloads the signing keys (to follow a rotation).
pub const KEY_RELOAD_SECS: u64 = signing_keys::RELOAD_EVERY.as_secs();

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "identities",
        sql: include_str!("../migrations/0001_identities.sql"),
        only_on: None,
    },
    Migration {
        version: 2,
        name: "lockout",
        sql: include_str!("../migrations/0002_lockout.sql"),
        only_on: None,
    },
    Migration {
        version: 3,
        name: "roles",
        sql: include_str!("../migrations/0003_roles.sql"),
        only_on: None,
    },
    Migration {
        version: 4,
        name: "session families",
        sql: include_str!("../migrations/0004_session_families.sql"),
        only_on: None,
    },
    Migration {
        version: 5,
        name: "profiles",
        sql: include_str!("../migrations/0005_profiles.sql"),
        only_on: None,
    },
    Migration {
        version: 6,
        name: "password resets",
        sql: include_str!("../migrations/0006_password_resets.sql"),
        only_on: None,
    },
    Migration {
        version: 7,
        name: "registration",
        sql: include_str!("../migrations/0007_registration.sql"),
        only_on: None,
    },
    Migration {
        version: 8,
        name: "mfa",
        sql: include_str!("../migrations/0008_mfa.sql"),
        only_on: None,
    },
    Migration {
        version: 9,
        name: "devices",
        sql: include_str!("../migrations/0009_devices.sql"),
        only_on: None,
    },
    Migration {
        version: 10,
        name: "signing key generations",
        sql: include_str!("../migrations/0010_signing_key_generations.sql"),
        only_on: None,
    },
    Migration {
        version: 11,
        name: "api keys",
        sql: include_str!("../migrations/0011_api_keys.sql"),
        only_on: None,
    },
];

/// auth-api's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    users::register,
    users::verify,
    users::me,
    users::update_me,
    users::request_deletion,
    sessions::login,
    sessions::refresh,
    sessions::manage::list,
    sessions::manage::logout,
    sessions::manage::revoke,
    sessions::manage::revoke_all,
    sessions::manage::change_password,
    resets::request,
    resets::confirm,
    mfa::enrol,
    mfa::confirm,
    mfa::login,
    mfa::disable,
    devices::register,
    devices::list,
    devices::rename,
    devices::revoke,
    admin::list_users,
    admin::show_user,
    admin::change_user,
    admin::delete_user,
    admin::block,
    admin::show_block,
    admin::unblock,
    admin::rotate_keys,
    invites::create,
    api_keys::create,
    api_keys::list,
    api_keys::rotate,
    api_keys::revoke,
    discovery::jwks,
    discovery::openid_configuration,
    discovery::userinfo,
))]
struct AuthDoc;

/// The paths this service answers, as OpenAPI.
pub fn openapi() -> utoipa::openapi::OpenApi {
    <AuthDoc as utoipa::OpenApi>::openapi()
}

/// auth-api's part of its handlers' state.
#[derive(Clone)]
struct Auth {
    accounts: AccountRepo,
    sessions: SessionRepo,
    resets: OneTimeTokenRepo,
    verifications: OneTimeTokenRepo,
    mfa: MfaRepo,
    devices: DeviceRepo,
    api_keys: ApiKeyRepo,
    mfa_challenges: OneTimeTokenRepo,
    invites: InviteRepo,
    mailer: Mailer,
    passwords: Passwords,
    keys: SigningKeys,
    metrics: AuthMetrics,
    limits: CredentialLimits,
    lockout: LockoutPolicy,
}

/// The limits of the credential routes (each `None` when set to `off`).
#[derive(Clone)]
struct CredentialLimits {
    login_ip: Option<Limit>,
    login_account: Option<Limit>,
    register_ip: Option<Limit>,
    register_account: Option<Limit>,
    refresh_ip: Option<Limit>,
    refresh_account: Option<Limit>,
    /// Password resets count like logins, in buckets of their own.
    reset_ip: Option<Limit>,
    reset_account: Option<Limit>,
}

impl CredentialLimits {
    fn new(config: &Config) -> Self {
        Self {
            login_ip: Limit::new("login_ip", config.limit_login_ip),
            login_account: Limit::new("login_account", config.limit_login_account),
            register_ip: Limit::new("register_ip", config.limit_register_ip),
            register_account: Limit::new("register_account", config.limit_register_account),
            refresh_ip: Limit::new("refresh_ip", config.limit_refresh_ip),
            refresh_account: Limit::new("refresh_account", config.limit_refresh_account),
            reset_ip: Limit::new("reset_ip", config.limit_login_ip),
            reset_account: Limit::new("reset_account", config.limit_login_account),
        }
    }
}

type AuthState = ApiState<Auth>;

#[derive(Clone)]
struct AuthMetrics {
    logins: IntCounterVec,
    tokens_issued: IntCounter,
    lockouts: IntCounter,
}

impl AuthMetrics {
    fn register(ctx: &ServiceContext) -> anyhow::Result<Self> {
        Ok(Self {
            logins: ctx.metrics.counter_vec(
                "unhidra_logins_total",
                "Login attempts by outcome.",
                &["outcome"],
                &[&["success"], &["failure"]],
            )?,
            tokens_issued: ctx
                .metrics
                .counter("unhidra_tokens_issued_total", "Access tokens issued.")?,
            lockouts: ctx.metrics.counter(
                "unhidra_account_lockouts_total",
                "Accounts locked after failed logins in a row.",
            )?,
        })
    }
}

/// Migrates the database, loads (or creates) the signing key, and answers JWKS
/// requests on the bus.
pub async fn build(ctx: ServiceContext, db: Database) -> anyhow::Result<Service> {
    db.migrate(NAME, MIGRATIONS).await?;
    ctx.bus.ensure_stream(&ctx.subjects.audit_stream()).await?;
    let keys = signing_keys_of(&ctx.config, db.clone(), ctx.clock.clone()).await?;
    let accounts = AccountRepo::new(db.clone());
    let passwords = Passwords::new(&ctx.config).await?;
    if let (Some(email), Some(password)) = (
        &ctx.config.bootstrap_admin_email,
        &ctx.config.bootstrap_admin_password,
    ) {
        let admin = admin::ensure_admin(&accounts, &passwords, email, password.clone()).await?;
        tracing::info!(user_id = %admin, "bootstrap admin in place");
    }
    let state = AuthState {
        ctx: ctx.clone(),
        service: Auth {
            accounts,
            sessions: SessionRepo::new(db.clone()),
            resets: OneTimeTokenRepo::password_resets(db.clone(), ctx.clock.clone()),
            verifications: OneTimeTokenRepo::email_verifications(db.clone(), ctx.clock.clone()),
            mfa: MfaRepo::new(db.clone()),
            devices: DeviceRepo::new(db.clone()),
            api_keys: ApiKeyRepo::new(db.clone()),
            mfa_challenges: OneTimeTokenRepo::mfa_challenges(db.clone(), ctx.clock.clone()),
            invites: InviteRepo::new(db.clone()),
            mailer: Mailer::from_config(&ctx.config)?,
            passwords,
            keys: keys.clone(),
            metrics: AuthMetrics::register(&ctx)?,
            limits: CredentialLimits::new(&ctx.config),
            lockout: LockoutPolicy {
                failures: ctx.config.lockout_failures,
                first_ms: seconds_to_ms(ctx.config.lockout_secs),
                max_ms: seconds_to_ms(ctx.config.lockout_max_secs),
            },
        },
    };
    let key_reloads = signing_keys::spawn_reloads(&ctx, keys.clone());
    let jwks_responder = rpc::respond::<AuthJwks, _, _>(&ctx, NAME, move |_| {
        let jwks = keys.jwks();
        async move { Ok(jwks) }
    })
    .await?;
    let revocations = state.clone();
    let revocations_responder = rpc::respond::<AuthRevocations, _, _>(&ctx, NAME, move |_| {
        let state = revocations.clone();
        async move { sessions::manage::recent(&state).await }
    })
    .await?;
    let lookups = state.clone();
    let api_key_responder = rpc::respond::<AuthApiKey, _, _>(&ctx, NAME, move |request| {
        let state = lookups.clone();
        async move { api_keys::lookup(&state, &request).await }
    })
    .await?;
    let credentials = Router::new()
        .route("/api/v1/auth/register", post(users::register))
        .route("/api/v1/auth/login", post(sessions::login))
        .route("/api/v1/auth/refresh", post(sessions::refresh))
        .route(
            "/api/v1/auth/password",
            post(sessions::manage::change_password),
        )
        .route("/api/v1/auth/password/reset", post(resets::request))
        .route("/api/v1/auth/password/reset/confirm", post(resets::confirm))
        .route("/api/v1/auth/verify", post(users::verify))
        .route("/api/v1/auth/login/mfa", post(mfa::login))
        .route("/api/v1/auth/mfa/totp", post(mfa::enrol))
        .route("/api/v1/auth/mfa/totp/confirm", post(mfa::confirm))
        .route("/api/v1/auth/mfa/totp/disable", post(mfa::disable));
    let own_sessions = Router::new()
        .route("/api/v1/auth/logout", post(sessions::manage::logout))
        .route(
            "/api/v1/auth/sessions",
            get(sessions::manage::list).delete(sessions::manage::revoke_all),
        )
        .route(
            "/api/v1/auth/sessions/{session_id}",
            delete(sessions::manage::revoke),
        );
    let router = body_limit(credentials, ctx.config.auth_body_limit_bytes)
        .merge(own_sessions)
        .route("/api/v1/users/me", get(users::me).patch(users::update_me))
        .route(
            "/api/v1/devices",
            get(devices::list).post(devices::register),
        )
        .route(
            "/api/v1/devices/{device_id}",
            patch(devices::rename).delete(devices::revoke),
        )
        .route("/api/v1/users/me/deletion", post(users::request_deletion))
        .route(
            "/api/v1/api-keys",
            get(api_keys::list).post(api_keys::create),
        )
        .route("/api/v1/api-keys/{key_id}", delete(api_keys::revoke))
        .route("/api/v1/api-keys/{key_id}/rotate", post(api_keys::rotate))
        .route("/api/v1/admin/users", get(admin::list_users))
        .route(
            "/api/v1/admin/users/{user_id}",
            get(admin::show_user)
                .patch(admin::change_user)
                .delete(admin::delete_user),
        )
        .route("/api/v1/admin/invites", post(invites::create))
        .route("/api/v1/admin/keys/rotate", post(admin::rotate_keys))
        .route("/api/v1/admin/blocks", post(admin::block))
        .route(
            "/api/v1/admin/blocks/{ip}",
            get(admin::show_block).delete(admin::unblock),
        )
        .route("/api/v1/auth/userinfo", get(discovery::userinfo))
        .route("/.well-known/jwks.json", get(discovery::jwks))
        .route(
            "/.well-known/openid-configuration",
            get(discovery::openid_configuration),
        )
        .with_state(state);
    Ok(Service {
        name: NAME,
        router,
        openapi: openapi(),
        database: Some(db),
        tasks: vec![
            jwks_responder,
            revocations_responder,
            api_key_responder,
            key_reloads,
        ],
        fallback: None,
    })
}

fn seconds_to_ms(seconds: u64) -> i64 {
    i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// The signing keys of the auth database: a replaced key stays published
/// until the last access token it signed has expired, allowing for replicas
/// that follow a rotation up to one reload late and for the verifiers' leeway.
async fn signing_keys_of(
    config: &Config,
    db: Database,
    clock: unhidra_core::clock::SharedClock,
) -> anyhow::Result<SigningKeys> {
    let keep_for = std::time::Duration::from_secs(config.access_token_ttl_secs)
        + signing_keys::RELOAD_EVERY
        + std::time::Duration::from_secs(60);
    SigningKeys::load_or_create(
        SigningKeyRepo::new(db),
        config.signing_key_secret.as_ref(),
        clock,
        keep_for,
    )
    .await
}

/// The auth database `config` names, migrated (for the command line).
async fn open_database(config: &Config) -> anyhow::Result<Database> {
    let url = match &config.database_url {
        Some(url) => secrecy::ExposeSecret::expose_secret(url).to_owned(),
        None => {
            std::fs::create_dir_all(&config.data_dir)?;
            unhidra_store::sqlite_url(&config.data_dir, NAME)
        }
    };
    let db = Database::connect(&url, 1).await?;
    db.migrate(NAME, MIGRATIONS).await?;
    Ok(db)
}

/// `unhidra admin create`: makes the account with `email` an admin in the
/// auth database `config` names, creating it with `password` if needed.
pub async fn create_admin(
    config: &Config,
    email: &str,
    password: secrecy::SecretString,
) -> anyhow::Result<unhidra_core::ids::UserId> {
    let db = open_database(config).await?;
    let passwords = Passwords::new(config).await?;
    admin::ensure_admin(&AccountRepo::new(db), &passwords, email, password).await
}

/// `unhidra keys rotate`: adds a signing key to the auth database `config`
/// names; running replicas sign with it within their next reload. Its `kid`.
pub async fn rotate_signing_key(config: &Config) -> anyhow::Result<String> {
    let db = open_database(config).await?;
    let keys = signing_keys_of(
        config,
        db,
        std::sync::Arc::new(unhidra_core::clock::SystemClock),
    )
    .await?;
    keys.rotate().await
}

/// Runs auth-api alone on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    unhidra_runtime::run_service(listener, config, shutdown, NAME, build).await
}
