//! Verifying an access token with the signing key cached: what every
//! WebSocket handshake and authenticated request pays.

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use criterion::{Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use ring::signature::{Ed25519KeyPair, KeyPair};
use unhidra_authn::TokenVerifier;
use unhidra_bus::{Bus, Headers, MemoryBus, RpcClient};
use unhidra_core::{
    Config,
    rpc::RpcReply,
    subjects::Subjects,
    token::{AccessClaims, Jwk, Jwks},
};

fn verify(c: &mut Criterion) {
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        return;
    };
    let Ok(pkcs8) = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()) else {
        return;
    };
    let Ok(pair) = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()) else {
        return;
    };
    let config = Config::default();
    let subjects = Subjects::new("bench");
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
    let jwks = Jwks {
        keys: vec![Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
            kid: "k1".into(),
            alg: "EdDSA".into(),
            use_: "sig".into(),
        }],
    };
    // auth-api's part: answer JWKS requests.
    let responder = {
        let (bus, subject) = (Arc::clone(&bus), subjects.auth_jwks());
        let reply = serde_json::to_vec(&RpcReply::Ok(jwks)).unwrap_or_default();
        runtime.spawn(async move {
            let Ok(mut requests) = bus.subscribe(&subject).await else {
                return;
            };
            while let Some(request) = requests.next().await {
                if let Some(to) = request.reply {
                    let _ = bus.publish(&to, Headers::new(), reply.clone().into()).await;
                }
            }
        })
    };
    let verifier = TokenVerifier::new(
        &config,
        RpcClient::new(Arc::clone(&bus), subjects, Duration::from_secs(5)),
    );
    let now = chrono::Utc::now().timestamp();
    let claims = AccessClaims {
        sub: uuid::Uuid::now_v7().to_string(),
        sid: uuid::Uuid::now_v7().to_string(),
        role: unhidra_core::users::SystemRole::Member,
        did: None,
        jti: uuid::Uuid::now_v7().to_string(),
        iat: now,
        exp: now + 3600,
        iss: config.token_issuer.clone(),
        aud: config.token_audience.clone(),
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("k1".into());
    let key = jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref());
    let Ok(token) = jsonwebtoken::encode(&header, &claims, &key) else {
        return;
    };
    // The first verification fetches the keys; the benchmark measures the rest.
    if runtime.block_on(verifier.verify(&token)).is_err() {
        return;
    }
    c.bench_function("verify access token (key cached)", |b| {
        b.to_async(&runtime).iter(|| verifier.verify(&token))
    });
    responder.abort();
}

criterion_group!(benches, verify);
criterion_main!(benches);
