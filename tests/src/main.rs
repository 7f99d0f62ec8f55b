//! `cim-sandbox`: start and stop a sandbox fleet from the shell (the demo
//! uses it). `up` leaves the hosts running and saves the fleet's description
//! in DIR/fleet.json; `down` reads it and tears everything down.

use std::path::PathBuf;

use anyhow::{bail, Result};
use cim_sandbox::Fleet;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: cim-sandbox up DIR [HOSTS] | down DIR";
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["up", dir, rest @ ..] => {
            let n = match rest {
                [] => 3,
                [n] => n.parse()?,
                _ => bail!(usage),
            };
            let fleet = Fleet::start_in(&PathBuf::from(dir), n)?;
            fleet.save()?;
            println!("sandbox fleet of {n} hosts on bridge {}", fleet.bridge);
            for h in &fleet.hosts {
                println!("  {:<8} {:<14} netns {}", h.name, h.address, h.netns);
            }
            println!("repository: {}", fleet.repo.display());
            println!("ssh config: {}", fleet.ssh_config.display());
            fleet.detach();
            Ok(())
        }
        ["down", dir] => {
            let mut fleet = Fleet::load(&PathBuf::from(dir))?;
            fleet.teardown();
            println!("sandbox fleet in {dir} stopped");
            Ok(())
        }
        _ => bail!(usage),
    }
}
