//! The built-in sample catalog (`catalog/sample.toml`) and its public dev keys.

use neruba_schemas::Catalog;

/// The sample catalog's text, compiled in so `neruba dev` works from any directory.
pub const CATALOG_TOML: &str = include_str!("../../catalog/sample.toml");

/// Where the built-in catalog came from, for error messages.
pub const CATALOG_ORIGIN: &str = "catalog/sample.toml (built in)";

/// `(tenant, scope, plaintext key)` of the sample catalog's dev keys. They are public on purpose.
pub const DEV_KEYS: &[(&str, &str, &str)] = &[
    ("acme", "ingest", "nrb_dev_acme_ingest_7f3a9c"),
    ("acme", "read", "nrb_dev_acme_read_2b81d4"),
    ("acme", "credits", "nrb_dev_acme_credits_5c1e07"),
    ("globex", "ingest", "nrb_dev_globex_ingest_c05e11"),
    ("globex", "credits", "nrb_dev_globex_credits_9d2b44"),
    ("globex", "read", "nrb_dev_globex_read_6e0f3a"),
];

/// Parses the built-in catalog.
pub fn catalog() -> neruba_schemas::Result<Catalog> {
    Catalog::from_toml_str(CATALOG_TOML, CATALOG_ORIGIN)
}

/// The dev ingest key of `tenant`.
pub fn ingest_key(tenant: &str) -> Option<&'static str> {
    dev_key(tenant, "ingest")
}

/// The dev key of `tenant` with `scope`.
pub fn dev_key(tenant: &str, scope: &str) -> Option<&'static str> {
    DEV_KEYS
        .iter()
        .find(|(t, s, _)| *t == tenant && *s == scope)
        .map(|(_, _, key)| *key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_keys_match_the_catalog_digests() {
        let catalog = catalog().expect("sample catalog loads");
        for (tenant, scope, key) in DEV_KEYS {
            let (t, k) = catalog
                .authenticate(key)
                .expect("dev key is in the catalog");
            assert_eq!(t.id, *tenant);
            let scopes: Vec<String> = k
                .scopes
                .iter()
                .map(|s| format!("{s:?}").to_lowercase())
                .collect();
            assert_eq!(scopes, vec![scope.to_string()]);
        }
    }
}
