//! A target server on this machine: its process, found by the TCP port it
//! listens on, so its CPU time is read from `/proc` (to the clock tick)
//! rather than from its metrics (whole seconds).

use std::net::IpAddr;

use anyhow::Context;

/// Clock ticks per second of the process times in `/proc/<pid>/stat`
/// (Linux's `USER_HZ`, the same on every architecture it runs on here).
const TICKS_PER_SECOND: f64 = 100.0;

/// The process listening at `url` when that is a loopback address of this
/// machine (and `/proc` shows who holds the socket); `None` otherwise.
pub fn server_pid(url: &str) -> Option<u32> {
    let url = reqwest::Url::parse(url).ok()?;
    let local = match url.host_str()? {
        "localhost" => true,
        host => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
    };
    if !local {
        return None;
    }
    let inode = listening_inode(url.port_or_known_default()?)?;
    let socket = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let holds = std::fs::read_dir(entry.path().join("fd"))
                .ok()?
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|link| link.as_os_str() == socket.as_str())
                });
            holds.then_some(pid)
        })
}

/// The inode of the listening TCP socket bound to `port`, from
/// `/proc/net/tcp` and `/proc/net/tcp6`.
fn listening_inode(port: u16) -> Option<String> {
    const LISTEN: &str = "0A";
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .find_map(|table| {
            table.lines().skip(1).find_map(|line| {
                // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = fields.get(1)?.rsplit_once(':')?.1;
                let listening = fields.get(3) == Some(&LISTEN);
                (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                    .then(|| fields.get(9).map(|inode| (*inode).to_owned()))
                    .flatten()
            })
        })
}

/// The CPU time (user and system) process `pid` (`self` for this one) has
/// used, in seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds_of(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (second field) may hold spaces; the rest follows its
    // closing parenthesis: state, ..., utime (14th field), stime (15th).
    let rest = stat.rsplit_once(')').context("unreadable /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<u64>()? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_listening_on_a_loopback_port_is_found() -> anyhow::Result<()> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        assert_eq!(server_pid(&url), Some(std::process::id()));
        drop(listener);
        assert_eq!(server_pid(&url), None);
        assert_eq!(server_pid("http://192.0.2.1:9000"), None);
        Ok(())
    }

    #[test]
    fn this_process_has_used_some_cpu() -> anyhow::Result<()> {
        let before = cpu_seconds_of("self")?;
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(spin.elapsed());
        }
        assert!(cpu_seconds_of("self")? > before);
        Ok(())
    }
}
