//! unhidra-runtime
