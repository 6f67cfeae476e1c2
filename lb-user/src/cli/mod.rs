//! Subcommands: one file per verb, the clap tree in `args`.

pub mod args;
mod check;
mod detach;
pub mod run;
pub mod status;
mod target;

pub use check::check;
pub use detach::detach;
