//! Finding the data plane a command is about.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::{cli::args::TargetArgs, config};

pub struct Target {
    pub interface: Option<String>,
    pub pin_dir: PathBuf,
    /// The admin API base URL and token.
    pub admin: String,
    pub token: Option<String>,
}

impl Target {
    /// From --config, --interface or --pin-dir; with none of them, the only
    /// data plane under /sys/fs/bpf/xlb.
    pub fn resolve(args: &TargetArgs) -> anyhow::Result<Target> {
        let mut target = Self::locate(args)?;
        if let Some(admin) = &args.admin {
            target.admin = admin.trim_end_matches('/').to_owned();
        }
        if args.token.is_some() {
            target.token.clone_from(&args.token);
        }
        Ok(target)
    }

    fn locate(args: &TargetArgs) -> anyhow::Result<Target> {
        let admin = format!("http://{}", config::DEFAULT_ADMIN_LISTEN);
        if let Some(path) = &args.config {
            let c = config::Config::load(path)?;
            let token = c.admin.token()?;
            // A daemon listening on every address is reachable on loopback.
            let mut listen = c.admin.listen;
            if listen.ip().is_unspecified() {
                listen.set_ip(if listen.is_ipv4() {
                    [127, 0, 0, 1].into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            return Ok(Target {
                pin_dir: c.pin_dir(),
                interface: Some(c.interface),
                admin: format!("http://{listen}"),
                token,
            });
        }
        if let Some(interface) = &args.interface {
            return Ok(Target {
                pin_dir: config::default_pin_dir(interface),
                interface: Some(interface.clone()),
                admin,
                token: None,
            });
        }
        if let Some(pin_dir) = &args.pin_dir {
            return Ok(Target { pin_dir: pin_dir.clone(), interface: None, admin, token: None });
        }
        let root = Path::new("/sys/fs/bpf/xlb");
        let found: Vec<String> = std::fs::read_dir(root)
            .with_context(|| format!("no data plane found under {} (is `xlb run` started?)", root.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        match found.as_slice() {
            [one] => Ok(Target { pin_dir: root.join(one), interface: Some(one.clone()), admin, token: None }),
            [] => bail!("no data plane found under {} (is `xlb run` started?)", root.display()),
            many => bail!("several data planes ({}); pick one with --interface", many.join(", ")),
        }
    }
}
