//! `xlb announce on|off`: maintenance through the admin API.

use std::time::Duration;

use crate::cli::{
    args::{AnnounceArgs, Switch},
    client::AdminClient,
    target::Target,
};

pub fn announce(args: AnnounceArgs) -> anyhow::Result<()> {
    let target = Target::resolve(&args.target)?;
    let on = args.switch == Switch::On;
    let wait = AdminClient::new(&target)?.announce(on)?;
    if on {
        println!("announcing: every VIP that can serve is announced again");
        return Ok(());
    }
    println!("withdrawn: routers move this node's flows to the others (forwarding goes on)");
    if let Some(secs) = wait.filter(|s| *s > 0.0 && !args.no_wait) {
        println!("waiting {secs:.0} s (announce.withdraw_wait) for them to finish…");
        std::thread::sleep(Duration::from_secs_f64(secs));
        println!("done: the node takes no new flows; `xlb announce on` to serve again");
    }
    Ok(())
}
