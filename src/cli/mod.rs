//! Command-line interface: one clap subcommand per file.

pub mod encrypt;
pub mod keyslot;
