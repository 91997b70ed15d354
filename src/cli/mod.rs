//! Command-line tools. (The daemon helper owns the clap enum in this file; the image tools below
//! are `clap::Args` structs with `run` functions to wire into it.)

pub mod check;
pub mod create;
pub mod info;
pub mod tools;
