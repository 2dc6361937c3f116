//! Metrics read straight from `/proc`, and network interfaces read with
//! getifaddrs (never by running `ip` or `ifconfig`).
//!
//! The metric names are part of the protocol and of the Prometheus output:
//! `cpu_usage_percent`, `memory_usage_percent`, `memory_used_kb`,
//! `memory_total_kb`, `memory_available_kb`, `uptime_seconds`,
//! `load_average`, `load_average_5m`, `load_average_15m`, `process_count`.
//! `load_average` (one number, the 1-minute load) and `uptime_seconds` (an
//! integer) have the types of the seed agent users know. Parsers take text,
//! so tests feed fixtures.
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    pub cpu_usage_percent: f64,
    pub memory_usage_percent: f64,
    pub memory_used_kb: u64,
    pub memory_total_kb: u64,
    pub memory_available_kb: u64,
    /// Whole seconds since boot (the seed's integer).
    pub uptime_seconds: u64,
    /// The 1-minute load average (the seed's single number).
    pub load_average: f64,
    pub load_average_5m: f64,
    pub load_average_15m: f64,
    pub process_count: u64,
}

/// CPU time counters from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

pub fn parse_cpu(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes { busy: total - idle, total })
}

pub fn cpu_percent(a: CpuTimes, b: CpuTimes) -> f64 {
    let dt = b.total.saturating_sub(a.total);
    if dt == 0 {
        return 0.0;
    }
    round2(100.0 * b.busy.saturating_sub(a.busy) as f64 / dt as f64)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// (total, available, used) in kB from `/proc/meminfo`. Kernels before 3.14
/// have no `MemAvailable`: estimate it as free + buffers + cached +
/// reclaimable slab - shared memory.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64, u64)> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some(k), Some(v)) = (it.next(), it.next()) {
            if let Ok(n) = v.parse::<u64>() {
                m.insert(k.trim_end_matches(':').to_string(), n);
            }
        }
    }
    let total = *m.get("MemTotal")?;
    let avail = match m.get("MemAvailable") {
        Some(a) => *a,
        None => {
            let g = |k: &str| m.get(k).copied().unwrap_or(0);
            (g("MemFree") + g("Buffers") + g("Cached") + g("SReclaimable")).saturating_sub(g("Shmem")).min(total)
        }
    };
    Some((total, avail, total.saturating_sub(avail)))
}

/// A plain decimal as the kernel writes it ("12345.67", "0.50"), or None.
/// By hand: `str::parse::<f64>` links core's general float parser and its
/// tables (about 13 KB of the size budget, docs/performance.md). All the
/// digits make one integer, divided by a power of ten; both are exact below
/// 2^53, so the one rounding is the division's and the result is the one
/// `str::parse` gives. A sign, an exponent or more than 15 digits: None.
pub fn parse_decimal(s: &str) -> Option<f64> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = || int.bytes().chain(frac.bytes());
    if int.is_empty() || int.len() + frac.len() > 15 || !digits().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let m = digits().fold(0u64, |m, b| m * 10 + u64::from(b - b'0'));
    let scale = frac.bytes().fold(1.0, |d, _| d * 10.0);
    Some(m as f64 / scale)
}

pub fn parse_loadavg(text: &str) -> [f64; 3] {
    let v: Vec<f64> = text.split_whitespace().take(3).filter_map(parse_decimal).collect();
    [v.first().copied().unwrap_or(0.0), v.get(1).copied().unwrap_or(0.0), v.get(2).copied().unwrap_or(0.0)]
}

/// Whole seconds since boot (fraction dropped).
#[allow(
    clippy::cast_possible_truncation,
    reason = "float to integer `as` drops the fraction and saturates: whole seconds"
)]
pub fn parse_uptime(text: &str) -> u64 {
    text.split_whitespace().next().and_then(parse_decimal).map(|f| f as u64).unwrap_or(0)
}

/// Samples metrics; remembers the last CPU counters so each sample gives the
/// CPU usage since the previous one.
pub struct Sampler {
    proc_root: std::path::PathBuf,
    last_cpu: Option<CpuTimes>,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new(Path::new("/proc"))
    }
}

impl Sampler {
    pub fn new(proc_root: &Path) -> Self {
        let mut s = Sampler { proc_root: proc_root.to_path_buf(), last_cpu: None };
        s.last_cpu = s.read_cpu();
        s
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.proc_root.join(name)).unwrap_or_default()
    }

    fn read_cpu(&self) -> Option<CpuTimes> {
        parse_cpu(&self.read("stat"))
    }

    pub fn sample(&mut self) -> Metrics {
        let cpu = self.read_cpu();
        let cpu_usage_percent = match (self.last_cpu, cpu) {
            (Some(a), Some(b)) => cpu_percent(a, b),
            _ => 0.0,
        };
        if cpu.is_some() {
            self.last_cpu = cpu;
        }
        let (total, avail, used) = parse_meminfo(&self.read("meminfo")).unwrap_or((0, 0, 0));
        let process_count = std::fs::read_dir(&self.proc_root)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
                    .count() as u64
            })
            .unwrap_or(0);
        let [l1, l5, l15] = parse_loadavg(&self.read("loadavg"));
        Metrics {
            cpu_usage_percent,
            memory_usage_percent: if total > 0 { round2(100.0 * used as f64 / total as f64) } else { 0.0 },
            memory_used_kb: used,
            memory_total_kb: total,
            memory_available_kb: avail,
            uptime_seconds: parse_uptime(&self.read("uptime")),
            load_average: l1,
            load_average_5m: l5,
            load_average_15m: l15,
            process_count,
        }
    }
}

/// One network interface with its MAC and addresses.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    pub ipv4: Vec<String>,
    pub ipv6: Vec<String>,
    pub up: bool,
}

/// Every interface, from getifaddrs, sorted by name.
pub fn network() -> Vec<Interface> {
    use nix::net::if_::InterfaceFlags;
    let mut map: BTreeMap<String, Interface> = BTreeMap::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    for a in addrs {
        let e = map
            .entry(a.interface_name.clone())
            .or_insert_with(|| Interface { name: a.interface_name.clone(), ..Default::default() });
        e.up |= a.flags.contains(InterfaceFlags::IFF_UP);
        let Some(addr) = a.address else { continue };
        if let Some(l) = addr.as_link_addr() {
            if let Some(mac) = l.addr() {
                e.mac = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            }
        } else if let Some(v4) = addr.as_sockaddr_in() {
            e.ipv4.push(v4.ip().to_string());
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            e.ipv6.push(v6.ip().to_string());
        }
    }
    map.into_values().collect()
}

/// Prometheus text exposition of the metrics (for the status endpoint).
pub fn prometheus(m: &Metrics) -> String {
    let mut s = String::new();
    let mut g = |name: &str, help: &str, v: f64| {
        s.push_str(&format!(
            "# HELP xcp_vm_agent_{name} {help}\n# TYPE xcp_vm_agent_{name} gauge\nxcp_vm_agent_{name} {v}\n"
        ));
    };
    g("cpu_usage_percent", "CPU busy share since the previous sample, percent.", m.cpu_usage_percent);
    g("memory_usage_percent", "Memory in use, percent of total.", m.memory_usage_percent);
    g("memory_used_kb", "Memory in use (total minus available), kB.", m.memory_used_kb as f64);
    g("memory_total_kb", "Total memory, kB.", m.memory_total_kb as f64);
    g("memory_available_kb", "Available memory, kB.", m.memory_available_kb as f64);
    g("uptime_seconds", "Seconds since boot.", m.uptime_seconds as f64);
    g("process_count", "Processes running.", m.process_count as f64);
    s.push_str("# HELP xcp_vm_agent_load_average Load average.\n# TYPE xcp_vm_agent_load_average gauge\n");
    for (w, v) in [("1m", m.load_average), ("5m", m.load_average_5m), ("15m", m.load_average_15m)] {
        s.push_str(&format!("xcp_vm_agent_load_average{{window=\"{w}\"}} {v}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:        2048000 kB\nMemFree:          100000 kB\nMemAvailable:    1024000 kB\nBuffers:           20000 kB\nCached:           300000 kB\nShmem:             10000 kB\nSReclaimable:      40000 kB\n";

    #[test]
    fn meminfo_with_and_without_memavailable() {
        assert_eq!(parse_meminfo(MEMINFO), Some((2048000, 1024000, 1024000)));
        let old: String =
            MEMINFO.lines().filter(|l| !l.starts_with("MemAvailable")).map(|l| format!("{l}\n")).collect();
        // 100000 + 20000 + 300000 + 40000 - 10000
        assert_eq!(parse_meminfo(&old), Some((2048000, 450000, 1598000)));
        assert_eq!(parse_meminfo("garbage"), None);
    }

    #[test]
    fn cpu_usage_between_samples() {
        let a = parse_cpu("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = parse_cpu("cpu  150 0 150 900 0 0 0 0 0 0\n").unwrap();
        assert_eq!(a.total, 1000);
        assert_eq!(cpu_percent(a, b), 50.0);
        assert_eq!(cpu_percent(b, b), 0.0);
        assert!(parse_cpu("intr 1 2").is_none());
    }

    #[test]
    fn loadavg_and_uptime() {
        assert_eq!(parse_loadavg("0.50 0.25 0.10 1/234 5678\n"), [0.5, 0.25, 0.1]);
        assert_eq!(parse_uptime("12345.67 2000.00\n"), 12345);
        assert_eq!(parse_uptime(""), 0);
    }

    #[test]
    fn parse_decimal_is_str_parse_for_kernel_numbers() {
        for s in [
            "0",
            "0.00",
            "0.50",
            "0.1",
            "7.3",
            "1.01",
            "12345.67",
            "98765432.10",
            "123456789012.345",
            "999999999999999",
        ] {
            assert_eq!(parse_decimal(s), Some(s.parse::<f64>().unwrap()), "{s}");
        }
        // Every value with two decimals below 1000, as in /proc/loadavg.
        for i in 0..100_000u32 {
            let s = format!("{}.{:02}", i / 100, i % 100);
            assert_eq!(parse_decimal(&s), Some(s.parse::<f64>().unwrap()), "{s}");
        }
        for s in ["", ".5", "-1", "1e3", "1.2.3", "x", "1/234", "1234567890123456"] {
            assert_eq!(parse_decimal(s), None, "{s}");
        }
    }

    #[test]
    fn sampler_reads_a_fake_proc() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("meminfo"), MEMINFO).unwrap();
        std::fs::write(d.path().join("stat"), "cpu  1 0 1 8 0 0 0 0\n").unwrap();
        std::fs::write(d.path().join("uptime"), "99.5 1.0\n").unwrap();
        std::fs::write(d.path().join("loadavg"), "1.00 2.00 3.00 1/1 1\n").unwrap();
        for pid in ["1", "42", "self"] {
            std::fs::create_dir(d.path().join(pid)).unwrap();
        }
        let mut s = Sampler::new(d.path());
        std::fs::write(d.path().join("stat"), "cpu  4 0 4 12 0 0 0 0\n").unwrap();
        let m = s.sample();
        assert_eq!(m.cpu_usage_percent, 60.0);
        assert_eq!(m.memory_usage_percent, 50.0);
        assert_eq!(m.process_count, 2);
        assert_eq!(m.uptime_seconds, 99);
        assert_eq!((m.load_average, m.load_average_5m, m.load_average_15m), (1.0, 2.0, 3.0));
        // The seed's types on the wire: one number and an integer.
        let j = serde_json::to_value(&m).unwrap();
        assert!(j["load_average"].is_f64() && j["load_average"] == 1.0, "{j}");
        assert!(j["uptime_seconds"].is_u64() && j["uptime_seconds"] == 99, "{j}");
        assert_eq!((j["load_average_5m"].as_f64(), j["load_average_15m"].as_f64()), (Some(2.0), Some(3.0)));
        let p = prometheus(&m);
        assert!(p.contains("xcp_vm_agent_memory_total_kb 2048000"));
        assert!(p.contains("xcp_vm_agent_load_average{window=\"15m\"} 3"));
    }

    #[test]
    fn network_has_loopback() {
        let n = network();
        let lo = n.iter().find(|i| i.name == "lo").expect("lo");
        assert!(lo.ipv4.contains(&"127.0.0.1".to_string()));
    }
}
