//! `xlb run`: start the daemon, run it until a signal.

use crate::{cli::args::RunArgs, daemon};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    daemon::start(&args.config).await?.run(args.detach_on_exit).await
}
