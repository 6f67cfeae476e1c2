//! `xlb decap …`: program xlb_decap on TUN-mode backends.

use anyhow::Context as _;

use crate::{
    cli::args::{DecapCommand, DecapTargetArgs},
    dataplane::decap,
    net,
};

pub async fn decap(cmd: DecapCommand) -> anyhow::Result<()> {
    match cmd {
        DecapCommand::Attach(args) => {
            let handle = net::connect()?;
            let iface = net::interface(&handle, &args.target.interface).await?;
            let pin_dir = pin_dir(&args.target);
            let how = decap::attach(&iface, &pin_dir, &args.vips, args.xdp_mode)?;
            let vips: Vec<String> = args.vips.iter().map(|a| a.to_string()).collect();
            println!("xlb_decap on {} ({how}) for {}", iface.name, vips.join(", "));
        }
        DecapCommand::Status(args) => {
            let s = decap::status(&pin_dir(&args))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let vips: Vec<String> = s.vips.iter().map(|a| a.to_string()).collect();
                println!("xlb_decap on {} ({})", args.interface, s.pin_dir.display());
                println!("  VIPs          {}", vips.join(", "));
                println!("  decapsulated  {}", s.decapsulated);
                println!("  not ours      {}  (tunnelled to other addresses, passed as is)", s.not_ours);
                println!("  passed        {}  (not tunnelled)", s.passed);
            }
        }
        DecapCommand::Detach(args) => {
            let dir = pin_dir(&args);
            if decap::detach(&dir).with_context(|| format!("cannot detach {}", dir.display()))? {
                println!("detached: removed {}", dir.display());
            } else {
                println!("nothing pinned at {}", dir.display());
            }
        }
    }
    Ok(())
}

fn pin_dir(args: &DecapTargetArgs) -> std::path::PathBuf {
    args.pin_dir.clone().unwrap_or_else(|| decap::default_pin_dir(&args.interface))
}
