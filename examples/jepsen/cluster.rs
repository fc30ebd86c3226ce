//! A cluster of real `vertice-register` processes on this machine, and the
//! faults the nemesis can inflict on it.
//!
//! Every node listens on, and connects from, its own loopback address
//! (`127.0.0.{10+id}`), so iptables rules can cut nodes apart while the
//! harness (on 127.0.0.1) still reaches all of them.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const SECRET: &str = "jepsen-secret";

/// What clients see of the cluster: the nodes they may send requests to,
/// and each node's incarnation (bumped on every start).
#[derive(Default)]
pub struct Targets {
    pub nodes: RwLock<Vec<(u64, String)>>,
    pub incarnations: RwLock<BTreeMap<u64, Arc<AtomicU64>>>,
}

impl Targets {
    pub fn incarnation(&self, id: u64) -> u64 {
        self.incarnations
            .read()
            .unwrap()
            .get(&id)
            .map_or(0, |a| a.load(Ordering::SeqCst))
    }
}

/// A CA for `--tls`: every node gets a certificate for its own loopback
/// address, and the nodes run with mutual TLS.
pub struct Pki {
    ca: rcgen::Certificate,
    key: rcgen::KeyPair,
    dir: PathBuf,
}

impl Pki {
    pub fn new(dir: PathBuf) -> Result<Self> {
        fs::create_dir_all(&dir)?;
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "jepsen CA");
        let ca = p.self_signed(&key)?;
        fs::write(dir.join("ca.pem"), ca.pem())?;
        Ok(Self { ca, key, dir })
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        self.ca.pem().into_bytes()
    }

    /// Node `id`'s certificate and key files (made on first use).
    fn files(&self, id: u64) -> Result<[PathBuf; 2]> {
        let cert = self.dir.join(format!("node{id}.pem"));
        let key = self.dir.join(format!("node{id}-key.pem"));
        if !cert.exists() {
            let k = rcgen::KeyPair::generate()?;
            let mut p = rcgen::CertificateParams::new(vec![host(id)])?;
            p.distinguished_name
                .push(rcgen::DnType::CommonName, format!("node{id}"));
            p.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let c = p.signed_by(&k, &self.ca, &self.key)?;
            fs::write(&key, k.serialize_pem())?;
            fs::write(&cert, c.pem())?;
        }
        Ok([cert, key])
    }
}

struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    paused: bool,
}

pub struct Cluster {
    bin: PathBuf,
    pub root: PathBuf,
    extra: Vec<String>,
    nodes: BTreeMap<u64, Node>,
    /// Current voters, as far as the harness changed them.
    pub members: Vec<u64>,
    next_id: u64,
    pub targets: Arc<Targets>,
    http: reqwest::blocking::Client,
    chain: String,
    cut_active: bool,
    tls: Option<Pki>,
}

pub fn host(id: u64) -> String {
    format!("127.0.0.{}", 10 + id)
}

fn free_port(id: u64) -> Result<u16> {
    let l = TcpListener::bind((host(id).as_str(), 0)).context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill {sig} {pid} failed ({status})");
    }
    Ok(())
}

/// The state letter of process `pid` in `/proc` (`T`: stopped by a signal).
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name in parentheses may hold spaces; the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits up to a second for `pid` to be in (or, with `stopped` false, out
/// of) the stopped state: a pause counts only once the process is stopped.
fn wait_stopped(pid: u32, stopped: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let state = proc_state(pid);
        if (state == Some('T')) == stopped {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("process {pid} is in state {state:?} after SIGSTOP/SIGCONT");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Cluster {
    pub fn new(
        bin: PathBuf,
        root: PathBuf,
        extra: Vec<String>,
        n: u64,
        tls: Option<Pki>,
    ) -> Result<Self> {
        fs::create_dir_all(&root)?;
        let mut http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(3));
        if let Some(pki) = &tls {
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&pki.ca_pem())?);
        }
        let mut c = Cluster {
            bin,
            root,
            extra,
            nodes: BTreeMap::new(),
            members: (1..=n).collect(),
            next_id: n + 1,
            targets: Arc::new(Targets::default()),
            http: http.build()?,
            chain: format!("VR_JEPSEN_{}", std::process::id()),
            cut_active: false,
            tls,
        };
        for id in 1..=n {
            c.add_node_record(id)?;
        }
        let peers: Vec<String> = (1..=n)
            .map(|id| format!("{id}={}:{}", host(id), c.nodes[&id].port))
            .collect();
        let peers = peers.join(",");
        for id in 1..=n {
            c.spawn(id, &["--peers", &peers])?;
        }
        c.publish();
        Ok(c)
    }

    fn add_node_record(&mut self, id: u64) -> Result<()> {
        let node = Node {
            port: free_port(id)?,
            dir: self.root.join(format!("n{id}")),
            child: None,
            paused: false,
        };
        self.nodes.insert(id, node);
        self.targets
            .incarnations
            .write()
            .unwrap()
            .insert(id, Arc::new(AtomicU64::new(0)));
        Ok(())
    }

    pub fn url(&self, id: u64) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", host(id), self.nodes[&id].port)
    }

    /// Tells clients which nodes to use.
    fn publish(&self) {
        *self.targets.nodes.write().unwrap() =
            self.members.iter().map(|&id| (id, self.url(id))).collect();
    }

    fn spawn(&mut self, id: u64, more: &[&str]) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.root.join(format!("node{id}.log")))?;
        let tls = match &self.tls {
            Some(pki) => {
                let [cert, key] = pki.files(id)?;
                vec![
                    "--tls-cert".into(),
                    cert.into_os_string(),
                    "--tls-key".into(),
                    key.into_os_string(),
                    "--tls-ca".into(),
                    pki.dir.join("ca.pem").into_os_string(),
                ]
            }
            None => Vec::new(),
        };
        let node = self.nodes.get_mut(&id).context("unknown node")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("node")
            .args(["--id", &id.to_string()])
            .args(["--addr", &format!("{}:{}", host(id), node.port)])
            .arg("--data-dir")
            .arg(&node.dir)
            .args(["--source-addr", &host(id)])
            .args(["--cluster-secret", SECRET])
            .args(more)
            .args(&tls)
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log);
        node.child = Some(cmd.spawn().context("starting a node")?);
        node.paused = false;
        if let Some(inc) = self.targets.incarnations.read().unwrap().get(&id) {
            inc.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    pub fn running(&mut self, id: u64) -> bool {
        match self.nodes.get_mut(&id).and_then(|n| n.child.as_mut()) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Restarts a stopped member (keeps its data).
    pub fn start(&mut self, id: u64) -> Result<()> {
        if !self.running(id) {
            self.spawn(id, &[])?;
        }
        Ok(())
    }

    /// SIGKILL; an error unless the node was running and died of it.
    pub fn kill9(&mut self, id: u64) -> Result<()> {
        use std::os::unix::process::ExitStatusExt;
        let n = self.nodes.get_mut(&id).context("no such node")?;
        n.paused = false;
        let mut c = n
            .child
            .take()
            .with_context(|| format!("node {id} is not running"))?;
        c.kill().context("sending SIGKILL")?;
        let status = c.wait().context("waiting for the killed node")?;
        match status.signal() {
            Some(9) => Ok(()),
            _ => bail!("node {id} ended with {status}, not by SIGKILL (it was not running)"),
        }
    }

    /// SIGTERM, waiting up to 10 s for a clean exit (then SIGKILL).
    /// SIGTERM, waiting up to 10 s for a clean exit (then SIGKILL); an
    /// error unless the node was running and has exited.
    pub fn terminate(&mut self, id: u64) -> Result<()> {
        let n = self.nodes.get_mut(&id).context("no such node")?;
        let mut c = n
            .child
            .take()
            .with_context(|| format!("node {id} is not running"))?;
        if n.paused {
            signal(c.id(), "-CONT")?;
            n.paused = false;
        }
        signal(c.id(), "-TERM")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        c.kill().context("sending SIGKILL after SIGTERM")?;
        c.wait().context("waiting for the node")?;
        Ok(())
    }

    /// SIGSTOP; an error unless the node is then stopped (`/proc` state T).
    pub fn pause(&mut self, id: u64) -> Result<()> {
        let n = self.nodes.get_mut(&id).context("no such node")?;
        let pid = n
            .child
            .as_ref()
            .with_context(|| format!("node {id} is not running"))?
            .id();
        signal(pid, "-STOP")?;
        n.paused = true;
        wait_stopped(pid, true)
    }

    /// SIGCONT to a paused node; an error unless it then runs again.
    pub fn resume(&mut self, id: u64) -> Result<()> {
        let Some(n) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        if let (Some(c), true) = (&n.child, n.paused) {
            let pid = c.id();
            signal(pid, "-CONT")?;
            n.paused = false;
            wait_stopped(pid, false)?;
        }
        Ok(())
    }

    fn health(&self, id: u64) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/health", self.url(id)))
            .timeout(Duration::from_millis(500))
            .send()
            .ok()?;
        r.json().ok()
    }

    /// The leader as the members see it: a member whose /health says it
    /// leads and that a quorum acknowledged recently.
    pub fn leader(&self) -> Option<u64> {
        self.members.iter().copied().find(|&id| {
            self.nodes.get(&id).is_some_and(|n| !n.paused)
                && self
                    .health(id)
                    .is_some_and(|h| h["role"] == "leader" && h["status"] == "healthy")
        })
    }

    pub fn wait_for_leader(&self, within: Duration) -> Option<u64> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `(applied index, committed index)` of a node, from /health.
    pub fn indexes(&self, id: u64) -> Option<(u64, u64)> {
        let h = self.health(id)?;
        Some((h["last_applied"].as_u64()?, h["committed"].as_u64()?))
    }

    pub fn iptables_available() -> bool {
        Command::new("iptables")
            .args(["-w", "-L", "-n"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn ipt(args: &[&str]) -> Result<()> {
        let out = Command::new("iptables").arg("-w").args(args).output()?;
        if !out.status.success() {
            bail!(
                "iptables {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Drops packets from `from` to `to` (pairs of node ids).
    pub fn drop_packets(&mut self, pairs: &[(u64, u64)]) -> Result<()> {
        if !self.cut_active {
            Self::ipt(&["-N", &self.chain])?;
            Self::ipt(&["-I", "INPUT", "-i", "lo", "-j", &self.chain])?;
            self.cut_active = true;
        }
        for &(a, b) in pairs {
            Self::ipt(&[
                "-A",
                &self.chain,
                "-s",
                &host(a),
                "-d",
                &host(b),
                "-j",
                "DROP",
            ])?;
        }
        Ok(())
    }

    /// Packets the partition chain has dropped since it was created: the
    /// effect of a partition, not the attempt.
    pub fn dropped_packets(&self) -> Result<u64> {
        if !self.cut_active {
            return Ok(0);
        }
        let out = Command::new("iptables")
            .args(["-w", "-L", &self.chain, "-v", "-n", "-x"])
            .output()
            .context("running iptables -L")?;
        if !out.status.success() {
            bail!(
                "iptables -L {}: {}",
                self.chain,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Rule lines start with their packet count; the header lines do not.
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }

    pub fn heal(&mut self) {
        if !self.cut_active {
            return;
        }
        let chain = self.chain.clone();
        let _ = Self::ipt(&["-D", "INPUT", "-i", "lo", "-j", &chain]);
        let _ = Self::ipt(&["-F", &chain]);
        let _ = Self::ipt(&["-X", &chain]);
        self.cut_active = false;
    }

    fn cluster_request(
        &self,
        method: reqwest::Method,
        via: u64,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url(via)))
            .header("X-Cluster-Secret", SECRET)
            .timeout(Duration::from_secs(30));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send()?;
        let status = r.status();
        let v: Value = r.json().unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{status}: {v}");
        }
        Ok(v)
    }

    /// Removes `victim` from the voters (through another member), stops it
    /// and wipes its data. Returns an error if the cluster refused.
    pub fn remove_member(&mut self, victim: u64) -> Result<()> {
        let via = *self
            .members
            .iter()
            .find(|&&m| m != victim)
            .context("no other member")?;
        self.cluster_request(
            reqwest::Method::DELETE,
            via,
            &format!("/cluster/nodes/{victim}"),
            None,
        )?;
        self.members.retain(|&m| m != victim);
        self.publish();
        // Out of the cluster now; it may have stopped by itself already.
        let _ = self.kill9(victim);
        let _ = fs::remove_dir_all(&self.nodes[&victim].dir);
        Ok(())
    }

    /// Starts a fresh node that joins through a member, and waits (up to
    /// `within`) until the cluster lists it as a voter.
    pub fn add_member(&mut self, within: Duration) -> Result<u64> {
        let id = self.next_id;
        if id > 200 {
            bail!("out of loopback addresses for new nodes");
        }
        self.next_id += 1;
        self.add_node_record(id)?;
        let via = self.url(*self.members.first().context("no members")?);
        self.spawn(id, &["--join", &via])?;
        let deadline = Instant::now() + within;
        loop {
            let members = self.members.clone();
            for m in members {
                if let Ok(v) =
                    self.cluster_request(reqwest::Method::GET, m, "/cluster/status", None)
                {
                    let voter = v["members"].as_array().is_some_and(|ms| {
                        ms.iter()
                            .any(|x| x["id"].as_u64() == Some(id) && x["voter"] == true)
                    });
                    if voter {
                        self.members.push(id);
                        self.publish();
                        return Ok(id);
                    }
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("node {id} did not become a voter within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Ends every fault: heals partitions, resumes paused nodes, restarts
    /// stopped members.
    pub fn heal_all(&mut self) -> Result<()> {
        self.heal();
        let ids: Vec<u64> = self.members.clone();
        for id in ids {
            self.resume(id)?;
            self.start(id)?;
        }
        Ok(())
    }

    /// Waits until every member has applied at least what the leader had
    /// committed when the wait began. Returns that index.
    pub fn wait_converged(&self, within: Duration) -> Result<u64> {
        let deadline = Instant::now() + within;
        let leader = self
            .wait_for_leader(within)
            .context("no leader after healing")?;
        let target = loop {
            if let Some((_, c)) = self.indexes(leader) {
                break c;
            }
            if Instant::now() > deadline {
                bail!("the leader does not answer /health");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for &id in &self.members {
            loop {
                if self.indexes(id).is_some_and(|(a, _)| a >= target) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("node {id} did not apply index {target} in time");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(target)
    }

    pub fn stop_all(&mut self) {
        self.heal();
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        // Clean-up at the end (and on drop): nodes already stopped are fine.
        for id in ids {
            let _ = self.resume(id);
            let _ = self.kill9(id);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}
