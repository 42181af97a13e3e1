//! history-service
