//! `xlb detach`: withdraw the VIP routes, remove program, link and maps.

use crate::{
    cli::{args::TargetArgs, target::Target},
    dataplane::loader,
    net,
    observe::pinned::published,
};

pub fn detach(args: TargetArgs) -> anyhow::Result<()> {
    let target = Target::resolve(&args)?;
    let files = target.files();
    // Routes first: nothing may go on announcing a data plane that is gone.
    let table =
        target.announce_table.or_else(|| files.as_ref().and_then(published)?.announce.map(|a| a.table));
    if let Some(table) = table {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let withdrawn = runtime.block_on(async {
            let handle = net::connect()?;
            net::table::delete_all_ours(&handle, table).await
        })?;
        println!("withdrew {withdrawn} VIP route(s) from table {table}");
    }
    if loader::detach(&target.pin_dir)? {
        println!("detached: removed {}", target.pin_dir.display());
    } else {
        println!("nothing pinned at {}", target.pin_dir.display());
    }
    if let Some(files) = files {
        files.forget();
    }
    Ok(())
}
