//! audit-service
