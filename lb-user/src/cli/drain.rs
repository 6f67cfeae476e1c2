//! `xlb drain`, `xlb undrain`, `xlb weight`: changes through the admin API.

use crate::{
    cli::{args::BackendArgs, client::AdminClient, target::Target},
    observe::admin::Change,
};

pub fn change(args: &BackendArgs, change: Change) -> anyhow::Result<()> {
    let target = Target::resolve(&args.target)?;
    AdminClient::new(&target)?.change(&args.vip, args.backend, change)?;
    let what = match change {
        Change::Drain => "draining: no new flows, established ones continue".to_owned(),
        Change::Undrain => "taking new flows again".to_owned(),
        Change::Weight(w) => format!("weight {w}"),
    };
    println!("{} on VIP {}: {what}", args.backend, args.vip);
    Ok(())
}
