//! Subcommands: one file per verb, the clap tree in `args`.

mod announce;
pub mod args;
mod check;
mod client;
mod decap;
mod detach;
mod drain;
pub mod run;
mod stats;
mod status;
mod target;
#[cfg(test)]
mod tests;

pub use announce::announce;
pub use check::check;
pub use decap::decap;
pub use detach::detach;
pub use drain::change;
pub use stats::stats;
pub use status::status;
