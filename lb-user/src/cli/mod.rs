//! Subcommands: one file per verb, the clap tree in `args`.

pub mod args;
mod check;
mod decap;
mod detach;
pub mod run;
pub mod status;
mod target;

pub use check::check;
pub use decap::decap;
pub use detach::detach;
