//! The authenticated user of an HTTP request, from one place for every
//! service: the bearer token of its `Authorization` header or the API key of
//! its `X-API-Key` header, verified by the process's token verifier, checked
//! against the key's scopes, and counted against the per-user request budget.

use std::sync::Arc;

use axum::{
    extract::{FromRef, FromRequestParts},
    http::{HeaderMap, Method, header::AUTHORIZATION, request::Parts},
};
use unhidra_authn::{Authenticated, TokenVerifier};
use unhidra_core::api_keys::{API_KEY_HEADER, ApiScope};

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

/// Verifies the credential of `headers`: an `X-API-Key`, else a bearer
/// token (`bearer` names where else a caller found one, such as the
/// WebSocket subprotocol). Both at once is refused as ambiguous.
pub async fn authenticate(
    verifier: &TokenVerifier,
    headers: &HeaderMap,
    bearer: Option<&str>,
) -> Result<Authenticated, ApiError> {
    let api_key = headers.get(API_KEY_HEADER);
    match (api_key, bearer.or_else(|| bearer_token(headers))) {
        (Some(_), Some(_)) => Err(ApiError::unauthenticated(
            "send either a bearer token or an API key, not both",
        )),
        (Some(key), None) => {
            let key = key
                .to_str()
                .map_err(|_| ApiError::unauthenticated("malformed API key"))?;
            Ok(verifier.verify_api_key(key.trim()).await?)
        }
        (None, Some(token)) => Ok(verifier.verify(token).await?),
        (None, None) => Err(ApiError::unauthenticated("missing bearer token or API key")),
    }
}

/// What an API key needs for a request of `method`: reading for `GET` and
/// `HEAD`, writing for everything else.
fn scope_of(method: &Method) -> ApiScope {
    if method == Method::GET || method == Method::HEAD {
        ApiScope::Read
    } else {
        ApiScope::Write
    }
}

fn require(me: &Authenticated, scope: ApiScope) -> Result<(), ApiError> {
    if me.may(scope) {
        return Ok(());
    }
    tracing::info!(user_id = %me.user, scope = scope.as_str(), "API key refused: scope missing");
    Err(ApiError::Denied {
        code: "insufficient_scope",
        message: format!("this API key lacks the `{scope}` scope"),
    })
}

/// Extractor for handlers that need an authenticated user, by access token
/// or by an API key with the scope the method needs (401 otherwise, 403
/// `insufficient_scope`, 429 over the per-user budget).
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
        let verifier = Arc::<TokenVerifier>::from_ref(state);
        let me = authenticate(&verifier, &parts.headers, None).await?;
        limit_user(parts, &Limits::from_ref(state), &me.user.to_string()).await?;
        require(&me, scope_of(&parts.method))?;
        Ok(CurrentUser(me))
    }
}

/// Extractor for handlers that act on a person's own credentials (sessions,
/// password, two-factor, devices, API keys, account deletion): an access
/// token only; an API key gets 403 `api_key_not_allowed`, so a leaked key
/// cannot make more keys or take the account over.
#[derive(Debug, Clone, Copy)]
pub struct SessionUser(pub Authenticated);

impl<S> FromRequestParts<S> for SessionUser
where
    Arc<TokenVerifier>: FromRef<S>,
    Limits: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let CurrentUser(me) = CurrentUser::from_request_parts(parts, state).await?;
        if me.is_api_key() {
            tracing::info!(user_id = %me.user, "API key refused: this needs a user's session");
            return Err(ApiError::Denied {
                code: "api_key_not_allowed",
                message: "this needs a user's access token, not an API key".into(),
            });
        }
        Ok(SessionUser(me))
    }
}

/// Extractor for handlers only admins may call (401 without a credential,
/// 403 without the admin role, or for an API key without the `admin` scope).
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
        require(&me, ApiScope::Admin)?;
        Ok(AdminUser(me))
    }
}
