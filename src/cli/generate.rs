//! `vhost-user-qcow2 generate man|completions`: the manual page and shell completions, made
//! from the same clap definitions that parse the command line (so they cannot drift apart).

use std::io::Write;
use std::path::PathBuf;

use clap::CommandFactory;

use super::tools::ToolError;

/// Arguments of `generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: What,
}

/// What to generate.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum What {
    /// Manual pages (roff): vhost-user-qcow2.1 and one vhost-user-qcow2-SUBCOMMAND.1 per
    /// subcommand, written into DIR.
    Man {
        /// Directory to write the pages into (created if missing).
        dir: PathBuf,
    },
    /// A completion script for SHELL, on standard output.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Runs `generate`.
pub fn run(args: &GenerateArgs, out: &mut dyn Write) -> Result<i32, ToolError> {
    let mut cmd = super::Cli::command();
    match &args.what {
        What::Man { dir } => {
            std::fs::create_dir_all(dir)?;
            cmd.build();
            write_page(&cmd, dir, "vhost-user-qcow2")?;
            for sub in cmd
                .get_subcommands()
                .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            {
                // A one-shot generator: leaking the few page names is harmless.
                let name: &'static str =
                    Box::leak(format!("vhost-user-qcow2-{}", sub.get_name()).into_boxed_str());
                write_page(&sub.clone().name(name), dir, name)?;
            }
        }
        What::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a failed write (a closed pipe).
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "vhost-user-qcow2", &mut buf);
            out.write_all(&buf)?;
        }
    }
    Ok(0)
}

fn write_page(cmd: &clap::Command, dir: &std::path::Path, name: &str) -> Result<(), ToolError> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
    std::fs::write(dir.join(format!("{name}.1")), buf)?;
    Ok(())
}
