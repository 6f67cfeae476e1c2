//! `cargo xtask dist`: man pages (xlb.1 and xlb-<command>.1) and bash, zsh
//! and fish completions, generated from xlb's clap tree.

use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_complete::Shell;
use xlb::cli::args::Cli;

/// Writes everything under `dir` (`man/`, `completions/`); the files written.
pub fn write(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    let cli = Cli::command();
    let mut pages = vec![("xlb".to_owned(), cli.clone())];
    for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("xlb-{}", sub.get_name());
        let usage = format!("xlb {}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name).bin_name(usage)));
    }
    for (name, command) in pages {
        let mut page = Vec::new();
        clap_mangen::Man::new(command).render(&mut page)?;
        let file = man.join(format!("{name}.1"));
        std::fs::write(&file, page)?;
        written.push(file);
    }
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let file = clap_complete::generate_to(shell, &mut Cli::command(), "xlb", &completions)?;
        written.push(file);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_a_man_page_and_completes() {
        let dir = std::env::temp_dir().join(format!("xlb-dist-{}", std::process::id()));
        let files = write(&dir).unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        let commands: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|s| s.get_name().to_owned())
            .filter(|n| n != "help")
            .collect();
        assert!(commands.len() >= 10, "{commands:?}");
        let main = read("man/xlb.1");
        let bash = read("completions/xlb.bash");
        for c in &commands {
            assert!(files.contains(&dir.join(format!("man/xlb-{c}.1"))), "man page of {c}");
            assert!(main.contains(&c.replace('-', "\\-")), "xlb.1 names {c}");
            assert!(bash.contains(c.as_str()), "bash completes {c}");
        }
        // The long help is in the page: the run command's config example.
        assert!(read("man/xlb-run.1").contains("interface"), "xlb-run.1 has the long help");
        assert!(read("completions/_xlb").contains("#compdef xlb"));
        assert!(read("completions/xlb.fish").contains("complete -c xlb"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
