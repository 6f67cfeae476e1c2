//! `xlb detach`: remove program, link and maps.

use crate::{
    cli::{args::TargetArgs, target::Target},
    dataplane::loader,
};

pub fn detach(args: TargetArgs) -> anyhow::Result<()> {
    let target = Target::resolve(&args)?;
    if loader::detach(&target.pin_dir)? {
        println!("detached: removed {}", target.pin_dir.display());
    } else {
        println!("nothing pinned at {}", target.pin_dir.display());
    }
    if let Some(files) = target.files() {
        files.forget();
    }
    Ok(())
}
