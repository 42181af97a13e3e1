//! unhidra-authn
