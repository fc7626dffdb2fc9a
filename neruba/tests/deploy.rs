//! The Kubernetes deployment in `k8s/` agrees with the binary: its catalog loads, kustomize
//! applies every manifest, every container's `args` are a command and flags the binary
//! accepts, every `NERUBA_*` variable it sets is one a component reads, and each is set where
//! its readers get it (a component's own in its manifest, the shared ones in the ConfigMap
//! every component loads).
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

/// The `NERUBA_*` names in a manifest (a word ending in `_`, such as `NERUBA_RATER_` in a
/// comment, is a prefix, not a variable).
fn variables(path: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("NERUBA_") && !word.ends_with('_'))
        .map(str::to_owned)
        .collect())
}

/// `neruba <command> --help`, which lists every variable the command reads as `env: NAME=`.
fn help(command: &[&str]) -> Result<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_neruba"))
        .args(command)
        .arg("--help")
        .output()
        .with_context(|| format!("neruba {command:?} --help"))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Every container's `args` in `path`: the flow sequences after `args:` (which may span lines),
/// each a JSON array of strings.
fn container_args(path: &Path) -> Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(path)?;
    let mut all = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("args: [") {
        let from = at + "args: ".len();
        let to = from + rest[from..].find(']').context("unterminated args")? + 1;
        let args: Vec<String> = serde_json::from_str(&rest[from..to])
            .with_context(|| format!("args in {}: {}", path.display(), &rest[from..to]))?;
        all.push(args);
        rest = &rest[to..];
    }
    Ok(all)
}

#[test]
fn every_container_runs_a_command_with_flags_the_binary_accepts() -> Result<()> {
    let mut commands = BTreeSet::new();
    for entry in std::fs::read_dir(k8s_dir())? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        for args in container_args(&path)? {
            // clap reports an unknown flag or a value that does not parse before `--help`.
            let output = Command::new(env!("CARGO_BIN_EXE_neruba"))
                .args(&args)
                .arg("--help")
                .output()
                .with_context(|| format!("neruba {args:?} --help"))?;
            assert!(
                output.status.success(),
                "{}: `neruba {}` is refused: {}",
                path.display(),
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
            commands.insert(args[0].clone());
        }
    }
    let expected: BTreeSet<String> = ["gateway", "aggregator", "rater", "balances", "api"]
        .map(str::to_owned)
        .into();
    assert_eq!(commands, expected, "the commands k8s/ runs");
    Ok(())
}

#[test]
fn every_variable_the_manifests_set_is_read_by_a_component() -> Result<()> {
    let mut set = BTreeSet::new();
    for entry in std::fs::read_dir(k8s_dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            set.extend(variables(&path)?);
        }
    }
    assert!(set.contains("NERUBA_BROKERS"), "{set:?}");
    let mut help_text = String::new();
    for command in [
        &[][..],
        &["gateway"],
        &["aggregator"],
        &["rater"],
        &["balances"],
        &["api"],
    ] {
        help_text.push_str(&help(command)?);
    }
    let unknown: Vec<&String> = set
        .iter()
        .filter(|v| !help_text.contains(&format!("env: {v}=")))
        .collect();
    assert!(
        unknown.is_empty(),
        "set by k8s/ but read by no component: {unknown:?}"
    );
    Ok(())
}

#[test]
fn a_stage_manifest_sets_only_what_it_reads_and_the_config_map_no_stage_setting() -> Result<()> {
    let stages = ["gateway", "aggregator", "rater", "balances", "api"];
    let helps: Vec<String> = stages
        .iter()
        .map(|stage| help(&[stage]))
        .collect::<Result<_>>()?;
    // 1. A stage's manifest sets only variables that stage reads.
    for (stage, help) in stages.iter().zip(&helps) {
        let set = variables(&k8s_dir().join(format!("{stage}.yaml")))?;
        let foreign: Vec<&String> = set
            .iter()
            .filter(|v| !help.contains(&format!("env: {v}=")))
            .collect();
        assert!(
            foreign.is_empty(),
            "k8s/{stage}.yaml sets what `neruba {stage}` does not read: {foreign:?}"
        );
    }
    // 2. The ConfigMap and Secret every stage loads hold only shared settings: no variable
    //    that names a stage (`neruba/src/cli/mod.rs` keeps the plain names for what is shared).
    let shared = variables(&k8s_dir().join("config.yaml"))?;
    assert!(shared.contains("NERUBA_BROKERS"), "{shared:?}");
    let owned: Vec<&String> = shared
        .iter()
        .filter(|v| {
            stages
                .iter()
                .any(|stage| v.starts_with(&format!("NERUBA_{}_", stage.to_uppercase())))
        })
        .collect();
    assert!(
        owned.is_empty(),
        "k8s/config.yaml is loaded by every stage but sets a stage's own {owned:?}: \
         it goes in that stage's manifest"
    );
    // 3. Its other keys are the allocator's, spelt as mimalloc reads them (a misspelt one would
    //    be ignored silently).
    let text = std::fs::read_to_string(k8s_dir().join("config.yaml"))?;
    let others: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("  ")?.split_once(':'))
        .map(|(key, _)| key)
        .filter(|key| {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && !key.starts_with("NERUBA_")
        })
        .collect();
    assert_eq!(others, ["MIMALLOC_ALLOW_THP"], "k8s/config.yaml");
    Ok(())
}
