//! `xlb check`: validate a config file.

use crate::{cli::args::CheckArgs, config::Config};

pub fn check(args: CheckArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let backends: usize = config.vips.iter().map(|v| v.backends.len()).sum();
    println!(
        "{}: OK — interface {}, {} VIP(s), {} backend(s), table size {}",
        args.config.display(),
        config.interface,
        config.vips.len(),
        backends,
        config.table_size
    );
    Ok(())
}
