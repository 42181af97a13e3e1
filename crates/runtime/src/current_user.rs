//! The authenticated user of an HTTP request: the bearer token of its
//! `Authorization` header, verified against the process's JWKS cache, and
//! counted against the per-user request budget.

use std::sync::Arc;

use axum::{
    extract::{FromRef, FromRequestParts},
    http::{HeaderMap, header::AUTHORIZATION, request::Parts},
};
use unhidra_authn::{Authenticated, TokenVerifier};

use crate::{ApiError, Limits, limits::limit_user};

/// The bearer token of an `Authorization` header, if any.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Extractor for handlers that need an authenticated user (401 otherwise,
/// 429 over the per-user budget).
#[derive(Debug, Clone, Copy)]
pub struct CurrentUser(pub Authenticated);

impl<S> FromRequestParts<S> for CurrentUser
where
    Arc<TokenVerifier>: FromRef<S>,
    Limits: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let token = bearer_token(&parts.headers)
            .ok_or_else(|| ApiError::unauthenticated("missing bearer token"))?;
        let verified = Arc::<TokenVerifier>::from_ref(state).verify(token).await?;
        limit_user(parts, &Limits::from_ref(state), &verified.user.to_string()).await?;
        Ok(CurrentUser(verified))
    }
}

/// Extractor for handlers only admins may call (401 without a token, 403
/// without the admin role).
#[derive(Debug, Clone, Copy)]
pub struct AdminUser(pub Authenticated);

impl<S> FromRequestParts<S> for AdminUser
where
    Arc<TokenVerifier>: FromRef<S>,
    Limits: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let CurrentUser(me) = CurrentUser::from_request_parts(parts, state).await?;
        if !me.role.is_admin() {
            tracing::warn!(user_id = %me.user, "admin endpoint refused");
            return Err(ApiError::Forbidden("this needs the admin role".into()));
        }
        Ok(AdminUser(me))
    }
}
