//! `neruba catalog check|hash-key`: catalog tools.

use super::load_catalog;
use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub(crate) enum CatalogCommand {
    /// Load a catalog file and report the first problem, or a summary.
    Check {
        /// Catalog file (`.toml`, `.yaml` or `.yml`).
        file: PathBuf,
    },
    /// Print the SHA-256 digest of an API key, as the catalog stores it.
    HashKey {
        /// The plaintext key.
        key: String,
    },
}

/// Runs a catalog command.
pub(crate) fn run(command: CatalogCommand) -> Result<()> {
    match command {
        CatalogCommand::Check { file } => {
            let catalog = load_catalog(&file)?;
            for tenant in catalog.tenants() {
                println!(
                    "tenant {}: {} keys, {} meters, {} price plans",
                    tenant.id,
                    tenant.api_keys.len(),
                    tenant.meters.len(),
                    tenant.price_plans.len()
                );
            }
            println!("{}: ok", file.display());
        }
        CatalogCommand::HashKey { key } => {
            println!("{}", neruba_schemas::catalog::hash_key(&key));
        }
    }
    Ok(())
}
