//! Ports that were free a moment ago, never the same one twice in a test process (the rule
//! lives in `tunnelfleet_standins::services`, which the demo uses too).

/// A TCP port that was free a moment ago (for services that cannot bind port 0 themselves).
pub fn free_port() -> u16 {
    tunnelfleet_standins::ports::free_tcp_ports(1).expect("free port")[0]
}

/// A UDP port that was free a moment ago (a coordinator restarted on the same address).
pub fn free_udp_port() -> u16 {
    tunnelfleet_standins::ports::free_udp_port().expect("free udp port")
}
