//! The Kubernetes deployment in `k8s/` agrees with the binary: its catalog loads, kustomize
//! applies every manifest, and every `NERUBA_*` variable it sets is one a component reads.
//! (Schema validation and lint are `scripts/k8s-check`.)

use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn k8s_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../k8s"))
}

#[test]
fn the_deployed_catalog_loads() -> Result<()> {
    let text = std::fs::read_to_string(k8s_dir().join("catalog.toml"))?;
    let catalog = neruba_schemas::Catalog::from_toml_str(&text, "k8s/catalog.toml")?;
    let tenants: Vec<&str> = catalog.tenants().iter().map(|t| t.id.as_str()).collect();
    assert_eq!(tenants, ["example"]);
    Ok(())
}

#[test]
fn kustomize_lists_every_manifest() -> Result<()> {
    let kustomization = std::fs::read_to_string(k8s_dir().join("kustomization.yaml"))?;
    for entry in std::fs::read_dir(k8s_dir())? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                kustomization.contains(&format!("  - {name}\n")),
                "{name} is not in k8s/kustomization.yaml"
            );
        }
    }
    Ok(())
}

#[test]
fn every_variable_the_manifests_set_is_read_by_a_component() -> Result<()> {
    let mut set = BTreeSet::new();
    for entry in std::fs::read_dir(k8s_dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path)?;
            for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("NERUBA_") && word.len() > "NERUBA_".len() {
                    set.insert(word.to_owned());
                }
            }
        }
    }
    assert!(set.contains("NERUBA_BROKERS"), "{set:?}");
    let binary = env!("CARGO_BIN_EXE_neruba");
    let mut help = String::new();
    for command in [
        &["--help"][..],
        &["gateway", "--help"],
        &["aggregator", "--help"],
        &["rater", "--help"],
    ] {
        let output = Command::new(binary)
            .args(command)
            .output()
            .with_context(|| format!("neruba {command:?}"))?;
        help.push_str(&String::from_utf8_lossy(&output.stdout));
    }
    let unknown: Vec<&String> = set
        .iter()
        .filter(|v| !help.contains(&format!("env: {v}=")))
        .collect();
    assert!(
        unknown.is_empty(),
        "set by k8s/ but read by no component: {unknown:?}"
    );
    Ok(())
}
