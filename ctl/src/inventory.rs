//! `hosts.yaml`, the fleet inventory: which nodes the coordinator expects.
//! Parsed and validated here (`gantry inventory check`, `--inventory`), then
//! handed to the coordinator as plain [`InventoryHost`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use gantry_coordinator::core::InventoryHost;
use serde::Deserialize;

use crate::spec::Size;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryFile {
    hosts: Vec<HostFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    name: String,
    address: String,
    provider: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    gpus: Option<GpusFile>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpusFile {
    model: String,
    count: u32,
    memory: Size,
}

/// Reads and validates an inventory; errors name the file, the host and the field.
pub fn read_inventory(path: &Path) -> Result<Vec<InventoryHost>, String> {
    // 64 MiB holds a few hundred thousand hosts.
    let text = crate::yaml_limits::read_yaml_file(path, 64 << 20, "an inventory")?;
    parse_inventory(&text, &path.display().to_string())
}

/// Parses inventory text (see [`read_inventory`]).
pub fn parse_inventory(text: &str, source: &str) -> Result<Vec<InventoryHost>, String> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    let file: InventoryFile = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner().to_string();
        // serde_yaml_ng sometimes names the path itself.
        if inner.starts_with(&field) {
            format!("{}: {inner}", source)
        } else {
            format!("{}: {field}: {inner}", source)
        }
    })?;
    let mut names = BTreeSet::new();
    let mut hosts = Vec::with_capacity(file.hosts.len());
    for (i, host) in file.hosts.into_iter().enumerate() {
        let at = format!("{source}: hosts[{i}]");
        let valid_name = !host.name.is_empty()
            && host.name.len() <= 128
            && host
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid_name {
            return Err(format!(
                "{at}.name: {:?} is not a valid node name (letters, digits, '-', '_', '.')",
                host.name
            ));
        }
        if !names.insert(host.name.clone()) {
            return Err(format!("{at}.name: {:?} is listed twice", host.name));
        }
        if host.address.trim().is_empty() {
            return Err(format!("{at}.address: must not be empty"));
        }
        if host.provider.trim().is_empty() {
            return Err(format!("{at}.provider: must not be empty"));
        }
        let (gpu_model, gpu_count, gpu_memory) = match host.gpus {
            None => (String::new(), 0, 0),
            Some(gpus) => {
                if gpus.count == 0 || gpus.count > 64 {
                    return Err(format!("{at}.gpus.count: {} is outside 1..=64", gpus.count));
                }
                if gpus.memory.0 <= 0 {
                    return Err(format!("{at}.gpus.memory: must be positive"));
                }
                if gpus.model.trim().is_empty() {
                    return Err(format!("{at}.gpus.model: must not be empty"));
                }
                (gpus.model, gpus.count, gpus.memory.0 as u64)
            }
        };
        let mut labels = host.labels;
        labels
            .entry("provider".into())
            .or_insert(host.provider.clone());
        if let Some(region) = host.region {
            labels.entry("region".into()).or_insert(region);
        }
        hosts.push(InventoryHost {
            name: host.name,
            address: host.address,
            labels,
            gpu_model,
            gpu_count,
            gpu_memory,
        });
    }
    if hosts.is_empty() {
        return Err(format!("{source}: hosts: the inventory lists no hosts"));
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_inventory_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hosts.yaml");
        let hosts = read_inventory(&path).expect("hosts.yaml parses");
        assert!(hosts.len() >= 70, "{} hosts", hosts.len());
        let providers: BTreeSet<&str> = hosts
            .iter()
            .filter_map(|h| h.labels.get("provider").map(String::as_str))
            .collect();
        assert_eq!(
            providers.into_iter().collect::<Vec<_>>(),
            ["hetzner", "lambda", "onprem", "vast"]
        );
    }

    #[test]
    fn bad_inventories_name_the_host_and_field() {
        let host = "name: a\n    address: 10.0.0.1\n    provider: lambda";
        let cases = [
            (format!("hosts:\n  - {host}\n  - {host}\n"), "hosts[1].name: \"a\" is listed twice"),
            ("hosts:\n  - {name: a, address: x, provider: p, gpus: {model: H100, count: 0, memory: 80GiB}}\n".to_string(), "hosts[0].gpus.count"),
            ("hosts:\n  - {name: a, address: x, provider: p, gpus: {model: H100, count: 8, memory: lots}}\n".to_string(), "hosts[0].gpus.memory"),
            ("hosts:\n  - {name: 'a b', address: x, provider: p}\n".to_string(), "hosts[0].name"),
            ("hosts:\n  - {name: a, address: x, provider: p, rack: 3}\n".to_string(), "unknown field `rack`"),
            ("hosts:\n  - {name: a, provider: p}\n".to_string(), "missing field `address`"),
            ("hosts: []\n".to_string(), "lists no hosts"),
        ];
        for (text, expected) in cases {
            let error = parse_inventory(&text, "hosts.yaml").expect_err(&text);
            assert!(
                error.contains(expected),
                "{error:?} should contain {expected:?}"
            );
        }
    }
}
