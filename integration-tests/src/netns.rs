//! Hosts in network namespaces: a lab of `ip netns` namespaces, each with
//! one veth link to a bridge in a namespace of its own, so tests cut real
//! links (the kernel drops the packets) instead of stopping a proxy. Nothing
//! touches the machine's own namespace: every link is created directly in
//! the lab's namespaces, and dropping the lab deletes them.
//!
//! Faults are routes: `cut(from, to)` installs a blackhole route for `to`'s
//! address in `from`'s namespace, so packets from `from` to `to` are dropped
//! and packets the other way still arrive (one-way loss; TCP then fails both
//! ways, as on a real network). `cut_both` is a symmetric partition. The
//! kernel here has no `netem` qdisc and no iptables, and routes need
//! neither.
//!
//! Needs root and `ip` (iproute2); [`NetLab::new`] says why when it cannot
//! make the lab, so a test can skip (or fail under `GANTRY_REQUIRE_TOOLS=1`).

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

/// Subnet of every lab (each lab has its own namespaces, so labs never clash).
const SUBNET: &str = "10.77.0";
/// Labs made by this process, for unique namespace names.
static LABS: AtomicU32 = AtomicU32::new(0);

/// A set of hosts on one bridge, each in its own network namespace.
pub struct NetLab {
    /// Namespace names: index 0 is the bridge, then one per host.
    names: Vec<String>,
    /// Cuts in force: (from, to) host indices.
    cuts: Mutex<BTreeSet<(usize, usize)>>,
}

impl NetLab {
    /// Makes `hosts` namespaces (host `i` has address `10.77.0.(10 + i)`,
    /// `i` from 1) linked to one bridge. Fails, naming the command, when
    /// namespaces cannot be made (not root, no `ip`).
    pub fn new(hosts: usize) -> anyhow::Result<NetLab> {
        if hosts == 0 || hosts > 200 {
            bail!("a lab has 1 to 200 hosts, not {hosts}");
        }
        let lab = LABS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("gt{}x{lab}", std::process::id());
        let mut names = vec![format!("{prefix}br")];
        names.extend((1..=hosts).map(|i| format!("{prefix}h{i}")));
        // From here on, Drop deletes whatever was made.
        let net = NetLab {
            names,
            cuts: Mutex::new(BTreeSet::new()),
        };
        let bridge = net.names[0].clone();
        ip(&["netns", "add", &bridge])?;
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        for i in 1..=hosts {
            let ns = net.names[i].clone();
            let port = format!("p{i}");
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &bridge,
            ])?;
            ip(&["-n", &bridge, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &bridge, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.ip(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Host `i`'s address (1-based).
    pub fn ip(&self, host: usize) -> String {
        format!("{SUBNET}.{}", 10 + host)
    }

    /// Host `i`'s namespace name (1-based), for `ip netns exec`.
    pub fn ns(&self, host: usize) -> &str {
        &self.names[host]
    }

    /// Drops every packet from `from` to `to` (one way).
    pub fn cut(&self, from: usize, to: usize) -> anyhow::Result<()> {
        let mut cuts = self
            .cuts
            .lock()
            .map_err(|_| anyhow::anyhow!("cuts poisoned"))?;
        if cuts.insert((from, to)) {
            let dest = format!("{}/32", self.ip(to));
            ip(&["-n", self.ns(from), "route", "add", "blackhole", &dest])?;
        }
        Ok(())
    }

    /// Drops every packet between `a` and `b`, both ways.
    pub fn cut_both(&self, a: usize, b: usize) -> anyhow::Result<()> {
        self.cut(a, b)?;
        self.cut(b, a)
    }

    /// Restores every link.
    pub fn heal(&self) -> anyhow::Result<()> {
        let mut cuts = self
            .cuts
            .lock()
            .map_err(|_| anyhow::anyhow!("cuts poisoned"))?;
        for (from, to) in std::mem::take(&mut *cuts) {
            let dest = format!("{}/32", self.ip(to));
            ip(&["-n", self.ns(from), "route", "del", "blackhole", &dest])?;
        }
        Ok(())
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth ends (and their peers);
        // processes still inside keep it alive until they exit, which the
        // sandbox sees to.
        for name in self.names.iter().rev() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Runs `ip ARGS`; fails with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
