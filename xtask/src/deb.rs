//! `cargo xtask deb`: the Debian package, built with dpkg-deb from a staged
//! tree: the binary, the systemd unit, an example config in /etc/xlb/, the
//! man pages and the shell completions.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use super::{dist, workspace};

/// A command's trimmed output.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    Ok(xlb_tests::cmd::run(program, args)?.trim().to_owned())
}

/// Builds the package from `xlb` into `out`; its path.
pub fn build(xlb: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let arch = run("dpkg", &["--print-architecture"])?;
    let version = env!("CARGO_PKG_VERSION");
    let root = out.join(format!("xlb_{version}_{arch}"));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    let packaging = workspace().join("packaging");
    let generated = out.join("dist");
    dist::write(&generated)?;
    let install = |from: &Path, to: &str, mode: u32| -> anyhow::Result<()> {
        let dest = root.join(to);
        std::fs::create_dir_all(dest.parent().expect("a directory"))?;
        std::fs::copy(from, &dest)
            .with_context(|| format!("copy {} to {}", from.display(), dest.display()))?;
        std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        Ok(())
    };
    install(xlb, "usr/bin/xlb", 0o755)?;
    // As Debian ships binaries: without symbols.
    run("strip", &["--strip-unneeded", root.join("usr/bin/xlb").to_str().expect("utf-8")])?;
    install(&packaging.join("xlb.service"), "lib/systemd/system/xlb.service", 0o644)?;
    install(&packaging.join("xlb.toml.example"), "etc/xlb/xlb.toml.example", 0o644)?;
    for page in std::fs::read_dir(generated.join("man"))? {
        let page = page?.path();
        let name = page.file_name().expect("a file").to_string_lossy().into_owned();
        install(&page, &format!("usr/share/man/man1/{name}"), 0o644)?;
        run("gzip", &["-9n", root.join(format!("usr/share/man/man1/{name}")).to_str().expect("utf-8")])?;
    }
    let completions = generated.join("completions");
    install(&completions.join("xlb.bash"), "usr/share/bash-completion/completions/xlb", 0o644)?;
    install(&completions.join("_xlb"), "usr/share/zsh/vendor-completions/_xlb", 0o644)?;
    install(&completions.join("xlb.fish"), "usr/share/fish/vendor_completions.d/xlb.fish", 0o644)?;
    install(&workspace().join("README.md"), "usr/share/doc/xlb/README.md", 0o644)?;

    let debian = root.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    let size_kib = dir_size(&root)? / 1024;
    std::fs::write(
        debian.join("control"),
        format!(
            "Package: xlb\nVersion: {version}\nArchitecture: {arch}\nMaintainer: xlb developers <xlb@users.noreply.github.com>\n\
             Installed-Size: {size_kib}\nDepends: libc6\nRecommends: bird2\nSection: net\nPriority: optional\n\
             Homepage: {}\nDescription: layer-4 load balancer in XDP\n \
             xlb balances TCP and UDP flows addressed to virtual IPs across backends with\n \
             Maglev consistent hashing, in an XDP program (direct routing or IPIP/IP6IP6\n \
             tunnels), following its config file, Consul and its own health checks.\n",
            env!("CARGO_PKG_REPOSITORY")
        ),
    )?;
    // Operators edit files under /etc: an upgrade must not overwrite them.
    std::fs::write(debian.join("conffiles"), "/etc/xlb/xlb.toml.example\n")?;
    let deb = out.join(format!("xlb_{version}_{arch}.deb"));
    run(
        "dpkg-deb",
        &["--root-owner-group", "--build", root.to_str().expect("utf-8"), deb.to_str().expect("utf-8")],
    )?;
    Ok(deb)
}

/// Installs `deb` with dpkg into an empty root of its own (nothing on this
/// machine changes) and runs the installed binary: `--version`, and
/// `check` on the installed example config.
pub fn check_installed(deb: &Path, scratch: &Path) -> anyhow::Result<()> {
    let root = scratch.join("root");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "")?;
    let root_arg = format!("--root={}", root.display());
    // Dependencies are this machine's, not the empty root's.
    run("dpkg", &[&root_arg, "--force-depends", "-i", deb.to_str().expect("utf-8")])?;
    let listed = run("dpkg", &[&root_arg, "-L", "xlb"])?;
    for file in [
        "/usr/bin/xlb",
        "/lib/systemd/system/xlb.service",
        "/etc/xlb/xlb.toml.example",
        "/usr/share/man/man1/xlb.1.gz",
        "/usr/share/man/man1/xlb-run.1.gz",
        "/usr/share/bash-completion/completions/xlb",
    ] {
        if !listed.lines().any(|l| l == file) {
            bail!("the package does not install {file}:\n{listed}");
        }
    }
    let xlb = root.join("usr/bin/xlb");
    let version = run(xlb.to_str().expect("utf-8"), &["--version"])?;
    if version != format!("xlb {}", env!("CARGO_PKG_VERSION")) {
        bail!("installed xlb --version says {version:?}");
    }
    let example = root.join("etc/xlb/xlb.toml.example");
    let checked =
        run(xlb.to_str().expect("utf-8"), &["check", "--config", example.to_str().expect("utf-8")])?;
    println!("installed package: {version}; {checked}");
    Ok(())
}

fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { dir_size(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}
