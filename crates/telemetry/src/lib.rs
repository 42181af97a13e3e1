//! unhidra-telemetry
