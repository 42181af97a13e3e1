//! What OpenID Connect clients and JWT libraries discover: the signing keys
//! (`/.well-known/jwks.json`), the provider metadata
//! (`/.well-known/openid-configuration`) and the claims of the token's user
//! (`GET /api/v1/auth/userinfo`). Unhidra issues access tokens through its
//! own login API, not through OAuth flows, so the metadata names no
//! authorization or token endpoint.

use axum::{Json, extract::State};
use serde::Serialize;
use unhidra_core::{ids::UserId, token::JWT_ALG, token::Jwks, users::SystemRole};
use unhidra_runtime::{ApiError, CurrentUser};

use crate::AuthState;

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "discovery", responses(
    (status = 200, description = "The public signing keys", body = unhidra_core::token::Jwks)))]
pub async fn jwks(State(state): State<AuthState>) -> Json<Jwks> {
    Json(state.service.keys.jwks())
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ProviderMetadata {
    issuer: String,
    jwks_uri: String,
    userinfo_endpoint: String,
    subject_types_supported: [&'static str; 1],
    id_token_signing_alg_values_supported: [&'static str; 1],
    claims_supported: Vec<&'static str>,
}

#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "discovery", responses(
    (status = 200, description = "OpenID provider metadata", body = ProviderMetadata)))]
pub async fn openid_configuration(State(state): State<AuthState>) -> Json<ProviderMetadata> {
    let config = &state.ctx.config;
    let base = config.public_url.trim_end_matches('/');
    let mut claims = vec!["sub", "email", "name", "role", "iss", "aud", "exp", "iat"];
    if config.email_verification {
        claims.push("email_verified");
    }
    Json(ProviderMetadata {
        issuer: config.token_issuer.clone(),
        jwks_uri: format!("{base}/.well-known/jwks.json"),
        userinfo_endpoint: format!("{base}/api/v1/auth/userinfo"),
        subject_types_supported: ["public"],
        id_token_signing_alg_values_supported: [JWT_ALG],
        claims_supported: claims,
    })
}

/// The OpenID standard claims Unhidra knows, and the system role.
#[derive(Serialize, utoipa::ToSchema)]
pub struct UserInfo {
    sub: UserId,
    email: String,
    /// Present when the server requires verified addresses (an account
    /// whose address is not verified cannot log in).
    #[serde(skip_serializing_if = "Option::is_none")]
    email_verified: Option<bool>,
    name: String,
    role: SystemRole,
}

#[utoipa::path(get, path = "/api/v1/auth/userinfo", tag = "discovery", security(("bearer" = []), ("api_key" = [])), responses(
    (status = 200, description = "The OpenID claims of the credential's user", body = UserInfo)))]
pub async fn userinfo(
    State(state): State<AuthState>,
    CurrentUser(me): CurrentUser,
) -> Result<Json<UserInfo>, ApiError> {
    let profile = state
        .service
        .accounts
        .profile(me.user)
        .await?
        .ok_or_else(|| ApiError::unauthenticated("the token's account no longer exists"))?;
    Ok(Json(UserInfo {
        sub: profile.id,
        email: profile.email,
        email_verified: state.ctx.config.email_verification.then_some(true),
        name: profile.display_name,
        role: profile.role,
    }))
}
