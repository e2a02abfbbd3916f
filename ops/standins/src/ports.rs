//! Ports on 127.0.0.1 that were free a moment ago, for services that must be told their port
//! before they bind; never the same one twice in a process. The demo and the tests use it.

/// `n` distinct TCP ports on 127.0.0.1 that were free a moment ago, for services that must be
/// told their port before they bind (an OMA's sshd, a forward's target). Never the same port
/// twice in one process: the kernel readily hands a just-released port to the next `bind(0)`,
/// and two tests running side by side once got the same one.
pub fn free_tcp_ports(n: usize) -> std::io::Result<Vec<u16>> {
    (0..n)
        .map(|_| {
            unique_port(|| {
                let l = std::net::TcpListener::bind("127.0.0.1:0")?;
                Ok(l.local_addr()?.port())
            })
        })
        .collect()
}

/// A UDP port on 127.0.0.1 that was free a moment ago, by the same rule.
pub fn free_udp_port() -> std::io::Result<u16> {
    unique_port(|| {
        let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
        Ok(s.local_addr()?.port())
    })
}

/// Calls `pick` until it returns a port this process has not handed out before.
fn unique_port(pick: impl Fn() -> std::io::Result<u16>) -> std::io::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = pick()?;
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}
