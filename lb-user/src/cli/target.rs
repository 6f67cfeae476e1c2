//! Finding the data plane a command is about.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::{
    cli::args::{LocateArgs, TargetArgs},
    config,
    files::RunFiles,
};

pub struct Target {
    pub interface: Option<String>,
    pub pin_dir: PathBuf,
    /// The config's `announce.table`, when found from a config.
    pub announce_table: Option<u32>,
    /// The admin API base URL and token.
    pub admin: String,
    pub token: Option<String>,
}

impl Target {
    /// The daemon's files, when the interface is known.
    pub fn files(&self) -> Option<RunFiles> {
        self.interface.as_deref().map(RunFiles::new)
    }

    /// From --config, --interface or --pin-dir; with none of them, the only
    /// data plane under /sys/fs/bpf/xlb. --admin and --token override what
    /// the config says.
    pub fn resolve(args: &TargetArgs) -> anyhow::Result<Target> {
        let mut target = Self::locate(&args.locate)?;
        if let Some(admin) = &args.admin {
            target.admin = admin.trim_end_matches('/').to_owned();
        }
        if args.token.is_some() {
            target.token.clone_from(&args.token);
        }
        Ok(target)
    }

    fn locate(args: &LocateArgs) -> anyhow::Result<Target> {
        let admin = format!("http://{}", config::DEFAULT_ADMIN_LISTEN);
        if let Some(path) = &args.config {
            let c = config::Config::load(path)?.start;
            return Ok(Target {
                token: c.admin.token()?,
                admin: c.admin.local_url(),
                announce_table: c.announce.map(|a| a.table),
                pin_dir: c.pin_dir,
                interface: Some(c.interface),
            });
        }
        if let Some(interface) = &args.interface {
            return Ok(Target {
                pin_dir: config::default_pin_dir(interface),
                interface: Some(interface.clone()),
                admin,
                token: None,
                announce_table: None,
            });
        }
        if let Some(pin_dir) = &args.pin_dir {
            return Ok(Target {
                pin_dir: pin_dir.clone(),
                interface: None,
                admin,
                token: None,
                announce_table: None,
            });
        }
        let root = Path::new("/sys/fs/bpf/xlb");
        let found: Vec<String> = std::fs::read_dir(root)
            .with_context(|| format!("no data plane found under {} (is `xlb run` started?)", root.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        match found.as_slice() {
            [one] => Ok(Target {
                pin_dir: root.join(one),
                interface: Some(one.clone()),
                admin,
                token: None,
                announce_table: None,
            }),
            [] => bail!("no data plane found under {} (is `xlb run` started?)", root.display()),
            many => bail!("several data planes ({}); pick one with --interface", many.join(", ")),
        }
    }
}
