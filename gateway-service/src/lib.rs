//! gateway-service
