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
            let accept = decap::Accept { vips: args.vips, sources: args.sources };
            if let Some(vip) =
                accept.vips.iter().find(|v| !accept.sources.iter().any(|s| s.addr.is_ipv4() == v.is_ipv4()))
            {
                anyhow::bail!("--vip {vip}: no --from of its family, so no balancer could tunnel to it");
            }
            let how = decap::attach(&iface, &pin_dir, &accept, args.xdp_mode)?;
            println!(
                "xlb_decap on {} ({how}) for {} from {}",
                iface.name,
                join(&accept.vips),
                join(&accept.sources)
            );
            for warning in forwarding_off(&iface.name, &accept.vips) {
                eprintln!("warning: {warning}");
            }
        }
        DecapCommand::Status(args) => {
            let s = decap::status(&pin_dir(&args))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("xlb_decap on {} ({})", args.interface, s.pin_dir.display());
                println!("  VIPs          {}", join(&s.vips));
                println!("  from          {}", join(&s.sources));
                println!("  decapsulated  {}", s.decapsulated);
                println!(
                    "  untrusted     {}  (tunnelled to the VIPs from other sources, dropped)",
                    s.untrusted
                );
                println!("  not ours      {}  (tunnelled to other addresses, passed as is)", s.not_ours);
                println!(
                    "  second chance {} sent on to the previous owner, {} kept here (the flow's socket is here), {} without a route",
                    s.second_chance_forwarded, s.second_chance_kept, s.second_chance_no_route
                );
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

/// The forwarding switches second chance needs that are off: without them
/// the FIB helper gives no next hop, and a packet whose flow lives on
/// another backend is delivered here, which resets it.
fn forwarding_off(interface: &str, vips: &[std::net::IpAddr]) -> Vec<String> {
    let mut keys = Vec::new();
    if vips.iter().any(|v| v.is_ipv4()) {
        let path = format!("/proc/sys/net/ipv4/conf/{interface}/forwarding");
        keys.push((format!("net.ipv4.conf.{interface}.forwarding"), path));
    }
    if vips.iter().any(|v| v.is_ipv6()) {
        keys.push((
            "net.ipv6.conf.all.forwarding".to_owned(),
            "/proc/sys/net/ipv6/conf/all/forwarding".to_owned(),
        ));
    }
    keys.into_iter()
        .filter(|(_, path)| std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0"))
        .map(|(key, _)| {
            format!(
                "{key} is 0: second chance cannot pass packets on to the backend that has their flow, so they \
                 are reset here (set it to 1; see the README's second chance section)"
            )
        })
        .collect()
}

fn join(items: &[impl ToString]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn pin_dir(args: &DecapTargetArgs) -> std::path::PathBuf {
    args.pin_dir.clone().unwrap_or_else(|| decap::default_pin_dir(&args.interface))
}
