//! `command-trigger test`: placeholder.
