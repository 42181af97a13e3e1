//! Multi-factor authentication with TOTP (RFC 6238):
//! `POST /api/v1/auth/mfa/totp` starts enrolment (secret, `otpauth://` URI,
//! QR code as SVG); `POST /api/v1/auth/mfa/totp/confirm` puts it in force
//! with a first code and returns ten single-use recovery codes (shown once,
//! stored hashed); `POST /api/v1/auth/mfa/totp/disable` removes it after the
//! password and a code are given again. A login with MFA in force answers
//! `{"mfa_required": true, "mfa_token"}` once the password is right, and
//! `POST /api/v1/auth/login/mfa` finishes it with a code or a recovery code.

mod repo;
pub mod totp;

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use data_encoding::BASE32_NOPAD;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use unhidra_core::error::ErrorBody;
use unhidra_core::{
    events::{AuditEvent, AuditKind},
    ids::UserId,
};
use unhidra_runtime::{ApiError, ApiJson, SessionUser, Throttle};

pub use self::repo::MfaRepo;
use crate::{
    AuthState,
    one_time_tokens::{hash_token, new_token},
    sessions::{failed_login, open_session, own_device},
};

/// Recovery codes given at confirmation.
const RECOVERY_CODES: usize = 10;
/// Bytes of a TOTP secret (160 bits, as RFC 4226 recommends).
const SECRET_BYTES: usize = 20;

fn invalid_code() -> ApiError {
    ApiError::Unauthenticated {
        code: "invalid_mfa_code",
        message: "the code is wrong, used already, or out of time".into(),
    }
}

fn secret_bytes(secret: &str) -> Result<Vec<u8>, ApiError> {
    BASE32_NOPAD
        .decode(secret.as_bytes())
        .map_err(|e| ApiError::Unexpected(anyhow::anyhow!("stored TOTP secret: {e}")))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Enrolment {
    /// Base32, for typing into an authenticator app.
    secret: String,
    otpauth_uri: String,
    /// The URI as a QR code, an SVG document.
    qr_svg: String,
}

#[utoipa::path(post, path = "/api/v1/auth/mfa/totp", tag = "two-factor", security(("bearer" = [])), responses(
    (status = 201, description = "A new TOTP secret, not in force until confirmed", body = Enrolment),
    (status = 404, description = "`not_found`: the account is gone", body = ErrorBody),
    (status = 409, description = "`mfa_enabled`", body = ErrorBody)))]
pub async fn enrol(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
) -> Result<(StatusCode, Json<Enrolment>), ApiError> {
    let profile = state
        .service
        .accounts
        .profile(me.user)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such account".into()))?;
    let mut bytes = [0_u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = BASE32_NOPAD.encode(&bytes);
    if !state.service.mfa.enrol(me.user, &secret).await? {
        return Err(ApiError::Conflict {
            code: "mfa_enabled",
            message: "two-factor authentication is on already; disable it first".into(),
        });
    }
    let issuer = &state.ctx.config.token_issuer;
    let otpauth_uri = format!(
        "otpauth://totp/{}:{}?secret={secret}&issuer={}&algorithm=SHA1&digits={}&period={}",
        percent(issuer),
        percent(&profile.email),
        percent(issuer),
        totp::DIGITS,
        totp::STEP.as_secs()
    );
    let qr_svg = qrcode::QrCode::new(otpauth_uri.as_bytes())
        .map_err(|e| ApiError::Unexpected(anyhow::anyhow!("QR code: {e}")))?
        .render::<qrcode::render::svg::Color>()
        .min_dimensions(200, 200)
        .build();
    Ok((
        StatusCode::CREATED,
        Json(Enrolment {
            secret,
            otpauth_uri,
            qr_svg,
        }),
    ))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Confirm {
    code: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RecoveryCodes {
    /// Shown this once; each works once instead of a code.
    recovery_codes: Vec<String>,
}

#[utoipa::path(post, path = "/api/v1/auth/mfa/totp/confirm", tag = "two-factor", security(("bearer" = [])), request_body = Confirm, responses(
    (status = 200, description = "In force; ten recovery codes, shown once", body = RecoveryCodes),
    (status = 401, description = "`invalid_mfa_code`", body = ErrorBody),
    (status = 409, description = "`no_pending_enrolment`", body = ErrorBody)))]
pub async fn confirm(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
    ApiJson(request): ApiJson<Confirm>,
) -> Result<Json<RecoveryCodes>, ApiError> {
    let mfa = &state.service.mfa;
    let pending = mfa
        .totp(me.user)
        .await?
        .filter(|t| !t.confirmed)
        .ok_or_else(|| ApiError::Conflict {
            code: "no_pending_enrolment",
            message: "start with POST /api/v1/auth/mfa/totp".into(),
        })?;
    let step = totp::matching_step(
        &secret_bytes(&pending.secret)?,
        &request.code,
        state.ctx.clock.now(),
    )
    .ok_or_else(invalid_code)?;
    let codes: Vec<String> = (0..RECOVERY_CODES).map(|_| recovery_code()).collect();
    let hashes: Vec<String> = codes.iter().map(|c| hash_token(c)).collect();
    let step = i64::try_from(step).unwrap_or(i64::MAX);
    if !mfa.confirm(me.user, step, &hashes).await? {
        return Err(invalid_code());
    }
    tracing::info!(user_id = %me.user, "two-factor authentication on");
    state
        .ctx
        .audit(AuditEvent::new(AuditKind::MfaEnabled, Some(me.user), None))
        .await;
    Ok(Json(RecoveryCodes {
        recovery_codes: codes,
    }))
}

/// `xxxxx-xxxxx`: 50 random bits in base32, easy to copy by hand.
fn recovery_code() -> String {
    let mut bytes = [0_u8; 7];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let text = BASE32_NOPAD.encode(&bytes).to_lowercase();
    format!("{}-{}", &text[..5], &text[5..10])
}

/// A second factor as a request gives it: a current `code`, or one of the
/// recovery codes.
struct SecondFactor<'a> {
    code: Option<&'a str>,
    recovery_code: Option<&'a SecretString>,
}

/// Whether `factor` is a fresh code or an unused recovery code of `user`
/// (using it up).
async fn accept(
    state: &AuthState,
    user: UserId,
    factor: SecondFactor<'_>,
) -> Result<bool, ApiError> {
    let mfa = &state.service.mfa;
    if let Some(code) = factor.code {
        let Some(totp) = mfa.totp(user).await?.filter(|t| t.confirmed) else {
            return Ok(false);
        };
        let secret = secret_bytes(&totp.secret)?;
        return Ok(
            match totp::matching_step(&secret, code, state.ctx.clock.now()) {
                Some(step) => {
                    mfa.use_step(user, i64::try_from(step).unwrap_or(i64::MAX))
                        .await?
                }
                None => false,
            },
        );
    }
    if let Some(recovery) = factor.recovery_code {
        let hash = hash_token(recovery.expose_secret().trim());
        return Ok(mfa.use_recovery_code(user, &hash).await?);
    }
    Err(ApiError::Invalid("give a code or a recovery_code".into()))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MfaChallenge {
    mfa_required: bool,
    /// For `POST /api/v1/auth/login/mfa`, valid five minutes, once.
    mfa_token: String,
    expires_in: u64,
}

/// The first step of a login with MFA in force: the password was right.
pub async fn challenge(state: &AuthState, user: UserId) -> Result<MfaChallenge, ApiError> {
    let (token, token_hash) = new_token();
    state
        .service
        .mfa_challenges
        .create(user, &token_hash)
        .await?;
    Ok(MfaChallenge {
        mfa_required: true,
        mfa_token: token,
        expires_in: 300,
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaLogin {
    #[schema(value_type = String)]
    mfa_token: SecretString,
    /// As in the first step: one of the user's registered devices.
    device_id: Option<String>,
    /// A current code of the authenticator app...
    code: Option<String>,
    /// ...or one of the recovery codes.
    #[schema(value_type = Option<String>)]
    recovery_code: Option<SecretString>,
}

/// `POST /api/v1/auth/login/mfa`: the second step. The MFA token works
/// once, so each password gives one guess at the code; a wrong one counts
/// as a failed login.
#[utoipa::path(post, path = "/api/v1/auth/login/mfa", tag = "two-factor", request_body = MfaLogin, responses(
    (status = 200, description = "Tokens", body = crate::sessions::Tokens),
    (status = 401, description = "`invalid_mfa_token` or `invalid_mfa_code`", body = ErrorBody),
    (status = 403, description = "`account_disabled`, or `ip_blocked`", body = ErrorBody),
    (status = 423, description = "`account_locked`", body = ErrorBody),
    (status = 422, description = "`invalid_input` or `unknown_device`", body = ErrorBody)))]
pub async fn login(
    State(state): State<AuthState>,
    throttle: Throttle,
    ApiJson(request): ApiJson<MfaLogin>,
) -> Result<Response, ApiError> {
    throttle
        .limit_ip(state.service.limits.login_ip.as_ref())
        .await?;
    let user = state
        .service
        .mfa_challenges
        .redeem(&hash_token(request.mfa_token.expose_secret()))
        .await?
        .ok_or_else(|| ApiError::Unauthenticated {
            code: "invalid_mfa_token",
            message: "the MFA token is unknown, used or expired; log in again".into(),
        })?;
    let factor = SecondFactor {
        code: request.code.as_deref(),
        recovery_code: request.recovery_code.as_ref(),
    };
    if !accept(&state, user, factor).await? {
        let now_ms = state.ctx.clock.now_millis();
        let error = failed_login(&state, &throttle.ip, Some(user), user.to_string(), now_ms).await;
        tracing::warn!(user_id = %user, "second factor refused");
        return Err(match error {
            ApiError::Unauthenticated { .. } => invalid_code(),
            other => other,
        });
    }
    let standing = state
        .service
        .accounts
        .standing(user)
        .await?
        .ok_or_else(|| ApiError::unauthenticated("no such account"))?;
    let device = own_device(&state, user, request.device_id.as_deref()).await?;
    Ok(Json(open_session(&state, user, standing.role, device).await?).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Disable {
    #[schema(value_type = String)]
    password: SecretString,
    /// A current code of the authenticator app...
    code: Option<String>,
    /// ...or one of the recovery codes.
    #[schema(value_type = Option<String>)]
    recovery_code: Option<SecretString>,
}

/// Turning MFA off needs the password and a second factor again.
#[utoipa::path(post, path = "/api/v1/auth/mfa/totp/disable", tag = "two-factor", security(("bearer" = [])), request_body = Disable, responses(
    (status = 204, description = "Two-factor authentication is off"),
    (status = 401, description = "`invalid_credentials`: the password or the code is wrong", body = ErrorBody)))]
pub async fn disable(
    State(state): State<AuthState>,
    SessionUser(me): SessionUser,
    throttle: Throttle,
    ApiJson(request): ApiJson<Disable>,
) -> Result<StatusCode, ApiError> {
    throttle
        .limit(
            state.service.limits.login_account.as_ref(),
            &me.user.to_string(),
        )
        .await?;
    crate::passwords::check_length(&request.password)?;
    let (_, hash) = state
        .service
        .accounts
        .password_of(me.user)
        .await?
        .ok_or_else(|| ApiError::unauthenticated("no such account"))?;
    let password_ok = state
        .service
        .passwords
        .verify(request.password, Some(hash))
        .await?;
    let factor = SecondFactor {
        code: request.code.as_deref(),
        recovery_code: request.recovery_code.as_ref(),
    };
    if !password_ok || !accept(&state, me.user, factor).await? {
        state.ctx.limits.strike(&throttle.ip).await;
        return Err(ApiError::Unauthenticated {
            code: "invalid_credentials",
            message: "the password or the code is wrong".into(),
        });
    }
    state.service.mfa.disable(me.user).await?;
    tracing::info!(user_id = %me.user, "two-factor authentication off");
    state
        .ctx
        .audit(AuditEvent::new(AuditKind::MfaDisabled, Some(me.user), None))
        .await;
    Ok(StatusCode::NO_CONTENT)
}
