//! Reading a catalog file: the only IO in `neruba-schemas`. Everything else in the crate is a
//! pure function of its arguments, so it can be tested and fuzzed without a file system.
//!
//! Invariant: the format follows the file's extension (`.toml`, `.yaml`, `.yml`); any other name
//! is refused rather than guessed from the content.

use super::Catalog;
use crate::{Error, Result};
use std::path::Path;

impl Catalog {
    /// Loads a catalog file; the format follows the extension (`.toml`, `.yaml`, `.yml`).
    pub fn load(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::CatalogIo {
            path: origin.clone(),
            source,
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Self::from_yaml_str(&text, &origin),
            Some("toml") => Self::from_toml_str(&text, &origin),
            _ => Err(Error::CatalogSyntax {
                path: origin,
                message: "unknown format; name the file *.toml, *.yaml or *.yml".into(),
            }),
        }
    }
}
