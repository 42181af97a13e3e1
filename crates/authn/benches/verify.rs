//! Verifying an access token with the signing key cached: what every
//! WebSocket handshake and authenticated request pays, for a token this
//! process verified before (a reconnect) and for one it never saw.

use std::sync::{Arc, Mutex};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use unhidra_core::{Config, ids::SessionId, token::Jwks};

#[path = "../tests/signing/mod.rs"]
mod signing;

fn verify(c: &mut Criterion) {
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        return;
    };
    let Ok(key) = signing::SigningKey::generate("k1") else {
        return;
    };
    let config = Config::default();
    let published = Arc::new(Mutex::new(Jwks {
        keys: vec![key.jwk()],
    }));
    let Ok(verifier) = runtime.block_on(signing::verifier(&config, published)) else {
        return;
    };
    let Ok(token) = key.token(&config, SessionId::new(), 3600) else {
        return;
    };
    if runtime.block_on(verifier.verify(&token)).is_err() {
        return;
    }
    c.bench_function("verify access token (seen before)", |b| {
        b.to_async(&runtime).iter(|| verifier.verify(&token))
    });
    let verifier = &verifier;
    // A new token each time (signed outside the measurement): the signature
    // is checked in full.
    c.bench_function("verify access token (never seen, key cached)", |b| {
        b.to_async(&runtime).iter_batched(
            || {
                key.token(&config, SessionId::new(), 3600)
                    .unwrap_or_default()
            },
            |token| async move { verifier.verify(&token).await },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, verify);
criterion_main!(benches);
