//! A fleet of real Docker hosts on one machine, for the scale-out tests.
//!
//! Two extra Docker daemons, each in a network namespace of its own with its own data-root,
//! exec-root, pidfile, unix socket and a TLS listener (a throwaway CA made by openssl), joined
//! by a bridge that lives in a third namespace (the root namespace has Docker's `FORWARD DROP`
//! rule). The test process, in the root namespace, reaches them over a veth into that bridge,
//! as a supervisor reaches remote engines. Needs root, `ip`, `nsenter`, `openssl` and
//! `dockerd`; where they are missing the fixture says so loudly and the test skips (a failure
//! under `CI=true`).
//!
//! Names carry the test process's pid and a letter per fixture, so test binaries and processes
//! running at once do not collide (interface names stay under 15 characters). Everything is
//! undone in `Drop`, which also runs when a test panics: container processes and the daemons
//! (and their containerd and shims) killed by pid, leftover mounts unmounted, namespaces,
//! cgroups and files deleted. A fixture left behind by a process that was itself killed is
//! swept by the next one.
//!
//! One fixture runs at a time per test process (each is two daemons on a two-core machine).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wharf::{Engine, TlsFiles};

/// The prefix of every name a fleet makes (namespaces, interfaces, directories, cgroups).
const PREFIX: &str = "wf";

/// Where fleets keep their files (short: the daemons' unix sockets live there, and a socket's
/// path may not exceed 107 bytes).
fn root_dir() -> PathBuf {
    std::env::temp_dir().join("wf-fleet")
}

/// One extra Docker host.
pub struct Host {
    /// The engine's name (`h2`, `h3`).
    pub name: String,
    /// Its address on the fleet's bridge.
    pub ip: String,
    netns: String,
    /// Its veth's end on the bridge (set down to cut the host off).
    bridge_port: String,
    dir: PathBuf,
    daemon: Option<Child>,
}

impl Host {
    /// The daemon's unix socket (reachable even when the host's link is cut).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// The daemon's `tcp://ip:2376` address.
    pub fn addr(&self) -> String {
        format!("tcp://{}:2376", self.ip)
    }
}

/// A running fleet of two extra Docker hosts. Dropping it tears everything down.
pub struct Fleet {
    id: String,
    base: PathBuf,
    /// The hosts, in order.
    pub hosts: Vec<Host>,
    _one_at_a_time: MutexGuard<'static, ()>,
}

/// Runs a command; its stderr in the error.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command for its effect during cleanup, where failures are expected (already gone).
fn quietly(program: &str, args: &[&str]) {
    let _ = run(program, args);
}

/// Reports a fleet test that cannot run: a panic under `CI=true`, a loud skip otherwise.
fn cannot_run(test: &str, why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs a fleet of Docker hosts and CI=true, but {why}");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test}: it needs network namespaces and extra Docker daemons (root), but \
         {why}. (Under CI=true this is a failure.) ***"
    );
}

impl Fleet {
    /// Starts two extra Docker hosts, or says why it cannot (loudly; a panic under `CI=true`)
    /// and returns `None`.
    pub async fn start(test: &str) -> Option<Fleet> {
        static ONE: Mutex<()> = Mutex::new(());
        let guard = ONE.lock().unwrap_or_else(|e| e.into_inner());
        if unsafe { libc::geteuid() } != 0 {
            cannot_run(test, "the tests do not run as root");
            return None;
        }
        for tool in ["ip", "nsenter", "openssl", "dockerd"] {
            if which(tool).is_none() {
                cannot_run(test, &format!("`{tool}` is not installed"));
                return None;
            }
        }
        sweep_stale();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("{PREFIX}{pid}{}", (b'a' + (n % 26) as u8) as char);
        // A /24 of 10.250-10.254 per fixture, from the pid and the letter, skipping those this
        // machine already has an address in (another test process's fleet).
        let taken = Command::new("ip")
            .args(["-4", "-o", "addr", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let subnet = (0..5 * 254)
            .map(|i| (pid.wrapping_mul(26).wrapping_add(n).wrapping_add(i)) % (5 * 254))
            .map(|k| format!("10.{}.{}", 250 + k / 254, 1 + k % 254))
            .find(|subnet| !taken.contains(&format!(" {subnet}.")))
            .expect("a free /24 in 10.250.0.0/13");
        let base = root_dir().join(&id);
        let mut fleet = Fleet {
            id: id.clone(),
            base: base.clone(),
            hosts: Vec::new(),
            _one_at_a_time: guard,
        };
        if let Err(e) = fleet.build(&subnet) {
            cannot_run(test, &format!("the fleet could not be set up: {e}"));
            return None;
        }
        for host in &fleet.hosts {
            if let Err(e) = wait_up(host, Duration::from_secs(60)).await {
                let log = std::fs::read_to_string(host.dir.join("dockerd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                cannot_run(
                    test,
                    &format!(
                        "the daemon {} did not come up: {e}; log tail: {tail:?}",
                        host.name
                    ),
                );
                return None;
            }
        }
        Some(fleet)
    }

    fn build(&mut self, subnet: &str) -> Result<(), String> {
        let id = self.id.clone();
        let certs = self.base.join("certs");
        std::fs::create_dir_all(&certs).map_err(|e| e.to_string())?;
        let sw = format!("{id}-sw");
        run("ip", &["netns", "add", &sw])?;
        run("ip", &["-n", &sw, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &sw, "link", "set", "br0", "up"])?;
        let (root_if, root_peer) = (format!("{id}r"), format!("{id}rp"));
        run(
            "ip",
            &[
                "link", "add", &root_if, "type", "veth", "peer", "name", &root_peer, "netns", &sw,
            ],
        )?;
        run(
            "ip",
            &["addr", "add", &format!("{subnet}.1/24"), "dev", &root_if],
        )?;
        run("ip", &["link", "set", &root_if, "up"])?;
        run(
            "ip",
            &["-n", &sw, "link", "set", &root_peer, "master", "br0", "up"],
        )?;
        let ips: Vec<String> = (2..=3).map(|n| format!("{subnet}.{n}")).collect();
        make_certs(&certs, &ips)?;
        for (i, ip) in ips.iter().enumerate() {
            let n = i + 2;
            let netns = format!("{id}-h{n}");
            let (ifname, port) = (format!("{id}{n}"), format!("{id}{n}p"));
            run("ip", &["netns", "add", &netns])?;
            run(
                "ip",
                &[
                    "link", "add", &ifname, "netns", &netns, "type", "veth", "peer", "name", &port,
                    "netns", &sw,
                ],
            )?;
            run(
                "ip",
                &["-n", &sw, "link", "set", &port, "master", "br0", "up"],
            )?;
            run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &netns,
                    "addr",
                    "add",
                    &format!("{ip}/24"),
                    "dev",
                    &ifname,
                ],
            )?;
            run("ip", &["-n", &netns, "link", "set", &ifname, "up"])?;
            let dir = self.base.join(format!("h{n}"));
            for sub in ["data", "exec"] {
                std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
            }
            std::fs::write(dir.join("daemon.json"), "{}").map_err(|e| e.to_string())?;
            let mut host = Host {
                name: format!("h{n}"),
                ip: ip.clone(),
                netns,
                bridge_port: port,
                dir,
                daemon: None,
            };
            host.daemon = Some(spawn_dockerd(&host, &certs)?);
            self.hosts.push(host);
        }
        Ok(())
    }

    /// The client's certificate files.
    pub fn tls(&self) -> TlsFiles {
        let c = self.base.join("certs");
        TlsFiles {
            ca: c.join("ca.pem"),
            cert: c.join("cert.pem"),
            key: c.join("key.pem"),
        }
    }

    /// The engine of host `i` over TCP with TLS, named after the host, its API version
    /// negotiated.
    pub async fn engine(&self, i: usize) -> Engine {
        let host = &self.hosts[i];
        let engine = Engine::tls(
            &host.name,
            &host.addr(),
            &self.tls(),
            Duration::from_secs(10),
        )
        .expect("the fleet's certificates load");
        engine
            .negotiate(Duration::from_secs(10))
            .await
            .expect("the fleet's engine answers over TLS");
        engine
    }

    /// The engine of host `i` through its unix socket (reachable when its link is cut).
    pub async fn engine_by_socket(&self, i: usize) -> Engine {
        let host = &self.hosts[i];
        Engine::unix(
            format!("{}-socket", host.name),
            &host.socket().display().to_string(),
            Duration::from_secs(10),
        )
        .await
        .expect("the fleet's engine answers on its socket")
    }

    /// A `[[engines]]` table per host, for a configuration file.
    pub fn engines_toml(&self) -> String {
        let TlsFiles { ca, cert, key } = self.tls();
        self.hosts
            .iter()
            .map(|h| {
                format!(
                    "[[engines]]\nname = \"{}\"\nhost = \"{}\"\ntls_ca = \"{}\"\ntls_cert = \
                     \"{}\"\ntls_key = \"{}\"\n\n",
                    h.name,
                    h.addr(),
                    ca.display(),
                    cert.display(),
                    key.display()
                )
            })
            .collect()
    }

    /// A configuration file listing the hosts' engines (`[[engines]]`), in the fleet's folder.
    pub fn config_file(&self) -> PathBuf {
        let path = self.base.join("fleet.toml");
        std::fs::write(&path, self.engines_toml()).expect("the fleet's folder is writable");
        path
    }

    /// SIGKILLs host `i`'s dockerd (its containers keep running under their shims, as on a
    /// real host whose daemon crashed).
    pub fn kill_dockerd(&mut self, i: usize) {
        if let Some(mut daemon) = self.hosts[i].daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }

    /// Starts host `i`'s dockerd again (after [`Fleet::kill_dockerd`]) and waits until it
    /// answers; its containers from before are gone (the daemon kills what it finds).
    pub async fn restart_dockerd(&mut self, i: usize) {
        let certs = self.base.join("certs");
        let host = &mut self.hosts[i];
        assert!(host.daemon.is_none(), "{}'s dockerd is running", host.name);
        // Its containerd outlived it and would keep the new one from starting (as a host's
        // service manager would, stop it; the containers' shims stay).
        let dir = host.dir.display().to_string();
        for pid in processes_naming(&dir) {
            let argv0 = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if argv0.split(|b| *b == 0).next() == Some(b"containerd".as_slice()) {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
                let deadline = Instant::now() + Duration::from_secs(5);
                while alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        // Its pid file may name a zombie (where nothing reaps orphans), which dockerd would
        // take for a running containerd.
        let _ = std::fs::remove_file(host.dir.join("exec/containerd/containerd.pid"));
        host.daemon = Some(spawn_dockerd(host, &certs).expect("dockerd starts again"));
        wait_up(host, Duration::from_secs(60))
            .await
            .expect("the restarted dockerd answers");
    }

    /// Cuts host `i` off the network (its daemon and containers keep running).
    pub fn cut(&self, i: usize) {
        let sw = format!("{}-sw", self.id);
        run(
            "ip",
            &["-n", &sw, "link", "set", &self.hosts[i].bridge_port, "down"],
        )
        .expect("the link goes down");
    }

    /// Reconnects host `i`.
    pub fn heal(&self, i: usize) {
        let sw = format!("{}-sw", self.id);
        run(
            "ip",
            &["-n", &sw, "link", "set", &self.hosts[i].bridge_port, "up"],
        )
        .expect("the link comes up");
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The daemons' last words, for the failed test's report.
            for host in &self.hosts {
                let log = std::fs::read_to_string(host.dir.join("dockerd.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                eprintln!("--- dockerd {} (last lines) ---\n{tail}", host.name);
            }
        }
        let daemons: Vec<Child> = self
            .hosts
            .iter_mut()
            .filter_map(|h| h.daemon.take())
            .collect();
        let netns: Vec<String> = self.hosts.iter().map(|h| h.netns.clone()).collect();
        teardown(&self.id, &self.base, &netns, daemons);
    }
}

/// Starts `host`'s dockerd in its namespace, with its own directories and TLS listener; its
/// log goes to `dockerd.log` in its directory.
fn spawn_dockerd(host: &Host, certs: &Path) -> Result<Child, String> {
    let n = &host.name[1..];
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(host.dir.join("dockerd.log"))
        .map_err(|e| e.to_string())?;
    let p = |name: &str| host.dir.join(name).display().to_string();
    let c = |name: &str| certs.join(name).display().to_string();
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", host.netns))
        .args(["--", "dockerd", "--config-file", &p("daemon.json")])
        .args(["--data-root", &p("data"), "--exec-root", &p("exec")])
        .args(["--pidfile", &p("docker.pid")])
        .args(["--host", &format!("unix://{}", p("docker.sock"))])
        .args(["--host", &format!("tcp://{}:2376", host.ip)])
        .args(["--tlsverify", "--tlscacert", &c("ca.pem")])
        .args(["--tlscert", &c(&format!("server{n}-cert.pem"))])
        .args(["--tlskey", &c(&format!("server{n}-key.pem"))])
        .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"])
        .args(["--storage-driver", "overlay2"])
        .args(["--cgroup-parent", &format!("/{}", host.netns)])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("dockerd: {e}"))
}

/// Undoes fleet `id`: kills what runs from it, unmounts, deletes namespaces, cgroups and files.
fn teardown(id: &str, base: &Path, netns: &[String], daemons: Vec<Child>) {
    // The containers' processes first (a daemon stops faster with nothing to stop).
    for ns in netns {
        kill_cgroup(ns);
    }
    // The daemons, by pid: SIGTERM, a grace, then SIGKILL.
    let mut pids: Vec<i32> = daemons.iter().map(|d| d.id() as i32).collect();
    pids.extend(pidfiles(base));
    pids.sort_unstable();
    pids.dedup();
    for &pid in &pids {
        signal(pid, nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in &pids {
        signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
    for mut daemon in daemons {
        let _ = daemon.wait();
    }
    // Their containerd and shims (their command lines name the fleet's directory).
    let needle = base.display().to_string();
    for pid in processes_naming(&needle) {
        signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
    for ns in netns {
        kill_cgroup(ns);
    }
    unmount_under(base);
    let _ = std::fs::remove_dir_all(base);
    for ns in netns {
        quietly("ip", &["netns", "del", ns]);
        remove_cgroup(ns);
    }
    quietly("ip", &["netns", "del", &format!("{id}-sw")]);
    quietly("ip", &["link", "del", &format!("{id}r")]);
}

/// Tears down fleets whose test process is gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|ns| ns.split('-').next())
        .filter(|id| stale(id))
        .map(str::to_owned)
        .collect();
    if let Ok(entries) = std::fs::read_dir(root_dir()) {
        ids.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|id| stale(id)),
        );
    }
    ids.sort();
    ids.dedup();
    for id in ids {
        let netns: Vec<String> = (2..=3).map(|n| format!("{id}-h{n}")).collect();
        teardown(&id, &root_dir().join(&id), &netns, Vec::new());
    }
}

/// Whether fleet `id` (`wf<pid><letter>`) belongs to a process that is gone.
fn stale(id: &str) -> bool {
    let Some(rest) = id.strip_prefix(PREFIX) else {
        return false;
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let Ok(pid) = digits.parse::<i32>() else {
        return false;
    };
    rest.len() == digits.len() + 1 && pid != std::process::id() as i32 && !alive(pid)
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

/// A throwaway CA, a server certificate per address and a client certificate (P-256 keys).
fn make_certs(dir: &Path, ips: &[String]) -> Result<(), String> {
    let f = |name: &str| dir.join(name).display().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let req = |key: &str, out: &str, subject: &str, x509: bool| -> Result<(), String> {
        let mut args = vec!["req"];
        if x509 {
            args.extend(["-x509", "-days", "2"]);
        }
        args.extend(ec);
        let (key, out) = (f(key), f(out));
        args.extend(["-keyout", &key, "-out", &out, "-subj", subject]);
        run("openssl", &args)
    };
    let sign = |csr: &str, ext: &str, text: &str, out: &str| -> Result<(), String> {
        std::fs::write(dir.join(ext), text).map_err(|e| e.to_string())?;
        let (csr, ext, out, ca, ca_key) = (f(csr), f(ext), f(out), f("ca.pem"), f("ca-key.pem"));
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &out,
                "-extfile",
                &ext,
            ],
        )
    };
    req("ca-key.pem", "ca.pem", "/CN=wharf-fleet-ca", true)?;
    for (i, ip) in ips.iter().enumerate() {
        let n = i + 2;
        let (key, csr, cert) = (
            format!("server{n}-key.pem"),
            format!("server{n}.csr"),
            format!("server{n}-cert.pem"),
        );
        req(&key, &csr, &format!("/CN=h{n}"), false)?;
        let ext = format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n");
        sign(&csr, &format!("server{n}.ext"), &ext, &cert)?;
    }
    req("key.pem", "client.csr", "/CN=wharf-client", false)?;
    sign(
        "client.csr",
        "client.ext",
        "extendedKeyUsage=clientAuth\n",
        "cert.pem",
    )
}

/// Waits until the host's daemon answers on its TLS address.
async fn wait_up(host: &Host, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let answered = match Engine::unix(
            host.name.clone(),
            &host.socket().display().to_string(),
            Duration::from_secs(2),
        )
        .await
        {
            Ok(engine) => engine
                .ping(Duration::from_secs(2))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match answered {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > limit => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    if pid > 0 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

fn alive(pid: i32) -> bool {
    // A zombie is not alive: its status line says so.
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

/// The pids in the fleet's pidfiles.
fn pidfiles(base: &Path) -> Vec<i32> {
    (2..=3)
        .filter_map(|n| std::fs::read_to_string(base.join(format!("h{n}/docker.pid"))).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Processes whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|&pid| pid != std::process::id() as i32)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// The cgroup directories (one per controller) of cgroup parent `/name`.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path().join(name))
        .filter(|p| p.is_dir())
        .collect();
    // cgroup v2: one tree.
    let unified = Path::new("/sys/fs/cgroup").join(name);
    if unified.join("cgroup.procs").exists() && !dirs.contains(&unified) {
        dirs.push(unified);
    }
    dirs
}

/// SIGKILLs every process in the cgroups under `/name`.
fn kill_cgroup(name: &str) {
    for dir in cgroup_dirs(name) {
        for procs in walk(&dir)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .filter(|p| p.exists())
        {
            for pid in std::fs::read_to_string(procs).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse() {
                    signal(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
}

/// Removes the (emptied) cgroups under `/name`, deepest first.
fn remove_cgroup(name: &str) {
    for dir in cgroup_dirs(name) {
        for d in walk(&dir).into_iter().rev() {
            for _ in 0..20 {
                if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// `dir` and every directory under it, parents before children.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = std::fs::read_dir(&out[i]) {
            out.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    out
}

/// Unmounts (lazily) everything mounted under `base`, deepest first.
fn unmount_under(base: &Path) {
    let prefix = base.display().to_string();
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        quietly("umount", &["-l", point]);
    }
}
