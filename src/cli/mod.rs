//! Command-line interface: one clap subcommand per file.

pub mod keyslot;
