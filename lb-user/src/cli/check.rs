//! `xlb check`: validate a config file.

use crate::{cli::args::CheckArgs, config::Config};

pub fn check(args: CheckArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let backends: usize = config.live.vips.iter().map(|v| v.backends.listed().len()).sum();
    let discovered = config.live.consul_services().len();
    println!(
        "{}: OK — interface {}, {} VIP(s), {} static backend(s), {} Consul service(s), table size {}",
        args.config.display(),
        config.start.interface,
        config.live.vips.len(),
        backends,
        discovered,
        config.start.capacities.table_size
    );
    Ok(())
}
