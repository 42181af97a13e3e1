//! unhidra
