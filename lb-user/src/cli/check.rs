//! `xlb check`: validate a config file.

use crate::{
    cli::args::CheckArgs,
    config::{Config, SourceKind},
};

pub fn check(args: CheckArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let backends: usize = config.live.vips.iter().map(|v| v.backends.listed().len()).sum();
    let sources = config.live.sources();
    let count = |kind| sources.iter().filter(|s| s.kind() == kind).count();
    println!(
        "{}: OK — interface {}, {} VIP(s), {} static backend(s), {} Consul service(s), {} etcd prefix(es), table size {}",
        args.config.display(),
        config.start.interface,
        config.live.vips.len(),
        backends,
        count(SourceKind::Consul),
        count(SourceKind::Etcd),
        config.start.capacities.table_size
    );
    Ok(())
}
