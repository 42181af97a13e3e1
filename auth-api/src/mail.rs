//! Outgoing mail: over SMTP when `UNHIDRA_SMTP_URL` is set, otherwise into
//! `<data_dir>/outbox` as `.eml` files and into the log (the embedded
//! default, so that a newcomer can follow a reset link without a mail
//! server). Both through lettre.

use std::path::PathBuf;

use lettre::{
    AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, header::ContentType},
};
use secrecy::ExposeSecret;
use unhidra_core::Config;

enum Outbox {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Files(AsyncFileTransport<Tokio1Executor>, PathBuf),
}

/// Sends auth-api's mail.
#[derive(Clone)]
pub struct Mailer {
    outbox: std::sync::Arc<Outbox>,
    from: Mailbox,
}

impl Mailer {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let from: Mailbox = config
            .mail_from
            .parse()
            .map_err(|e| anyhow::anyhow!("mail_from: {e}"))?;
        let outbox = match &config.smtp_url {
            Some(url) => Outbox::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose_secret())
                    .map_err(|e| anyhow::anyhow!("smtp_url: {e}"))?
                    .build(),
            ),
            None => {
                let dir = config.data_dir.join("outbox");
                std::fs::create_dir_all(&dir)?;
                Outbox::Files(AsyncFileTransport::new(&dir), dir)
            }
        };
        Ok(Self {
            outbox: std::sync::Arc::new(outbox),
            from,
        })
    }

    /// Sends a plain-text mail to `to`.
    pub async fn send(&self, to: &str, subject: &str, body: String) -> anyhow::Result<()> {
        let message = Message::builder()
            .from(self.from.clone())
            .to(to.parse()?)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body.clone())?;
        match self.outbox.as_ref() {
            Outbox::Smtp(smtp) => {
                smtp.send(message).await?;
                tracing::info!(subject, "mail sent");
            }
            Outbox::Files(files, dir) => {
                let id = files.send(message).await?;
                let path = dir.join(format!("{id}.eml"));
                // No SMTP: the log is how a newcomer reads it.
                tracing::info!(to, subject, path = %path.display(), body = %body, "mail written to the outbox (no SMTP configured)");
            }
        }
        Ok(())
    }
}
