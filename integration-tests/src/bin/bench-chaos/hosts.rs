//! The hosts of the day: OMAs (sshd, API, NBD, a prober of the appliances' R ports) and
//! appliances (a real agent with the seed's profile, a prober of its L forwards).

use super::*;

/// The seed's ports on the OMA: its API and its NBD service.
pub(crate) const API: u16 = 8082;

pub(crate) const NBD: u16 = 10809;

/// One OMA host.
pub(crate) struct Oma {
    pub(crate) host: NetHost,
    pub(crate) sshd: Sshd,
    pub(crate) api: NsHttp,
    pub(crate) _nbd: NsHttp,
    /// The appliances' R ports, read inside the host.
    pub(crate) prober: Prober,
}

/// One appliance: its host, the real agent in it, its R port on the OMAs, its links.
pub(crate) struct Appliance {
    pub(crate) id: String,
    pub(crate) host: NetHost,
    /// Its three L forwards, read inside its host.
    pub(crate) prober: Prober,
    pub(crate) agent: TestAgent,
    /// Its own link to each OMA (the interface inside the OMA's host), by OMA index.
    pub(crate) links: Vec<String>,
    pub(crate) _api: NsHttp,
}

/// The seed's profile for appliance `id` on group `group`, every setting the default.
pub(crate) fn seed_profile(
    id: &str,
    group: &str,
    r_port: u16,
    sshd: &Sshd,
    fingerprints: &[String],
) -> ProfileSpec {
    let mut p = ProfileSpec::new(id, sshd.user.clone(), &sshd.client_key);
    p.group = Some(group.into());
    p.forwards = vec![
        format!("L {API}:localhost:{API}"),
        format!("L {NBD}:localhost:{NBD}"),
        format!("L 10808:localhost:{NBD}"),
        format!("R {r_port}:localhost:8081"),
    ];
    p.host_key_fingerprints = fingerprints.to_vec();
    let health: tunnelfleet_protocol::HealthSpec = serde_json::from_value(
        serde_json::json!({ "http": format!("http://localhost:{API}/health") }),
    )
    .unwrap_or_else(|e| panic!("the seed's health check: {e}"));
    p.health = Some(health);
    p
}

/// A loop inside a host that `GET`s `localhost:PORT/health` for each of its ports every 100 ms
/// and prints the bodies on one line; the latest line is kept (no process per check, so a
/// fault's timing is read to about 100 ms).
pub(crate) struct Prober {
    pub(crate) latest: Arc<Mutex<(Instant, Vec<String>)>>,
    pub(crate) _child: KillOnDrop,
}

pub(crate) const PROBE_LOOP: &str = r#"
import sys, time, urllib.request
ports = sys.argv[1:]
while True:
    out = []
    for port in ports:
        try:
            out.append(urllib.request.urlopen("http://localhost:%s/health" % port, timeout=0.5).read().decode())
        except Exception:
            out.append("-")
    print("|".join(out), flush=True)
    time.sleep(0.1)
"#;

impl Prober {
    pub(crate) fn start(host: &NetHost, ports: &[u16]) -> anyhow::Result<Prober> {
        use std::io::BufRead;
        let mut child = host
            .command("python3")
            .arg("-c")
            .arg(PROBE_LOOP)
            .args(ports.iter().map(u16::to_string))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn_owned()
            .context("starting a prober")?;
        let stdout = child.stdout.take().context("prober stdout")?;
        let latest = Arc::new(Mutex::new((
            Instant::now(),
            vec!["-".to_string(); ports.len()],
        )));
        let l = latest.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let parts = line.split('|').map(str::to_string).collect();
                *l.lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now(), parts);
            }
        });
        Ok(Prober {
            latest,
            _child: KillOnDrop(child),
        })
    }

    /// The latest bodies, if read within the last second (a stalled prober reads as down).
    pub(crate) fn read(&self) -> Vec<String> {
        let (at, v) = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if at.elapsed() > Duration::from_secs(1) {
            return vec!["-".to_string(); v.len()];
        }
        v
    }
}

/// The OMA an appliance's forwards reach now, if all four carry data: its API and both NBD
/// forwards answer from the same OMA (read inside the appliance's host), and that OMA reaches
/// the appliance's API through R (read inside the OMA's host).
pub(crate) fn forwards_on(i: usize, apps: &[Appliance], omas: &[Oma]) -> Option<usize> {
    let a = &apps[i];
    let seen = a.prober.read();
    let [api, nbd, alt] = seen.as_slice() else {
        return None;
    };
    let o = omas
        .iter()
        .position(|o| *api == format!("{} api ok", o.host.name))?;
    let nbd_ok = format!("{} nbd ok", omas[o].host.name);
    if *nbd != nbd_ok || *alt != nbd_ok {
        return None;
    }
    let reverse = omas[o].prober.read();
    (reverse.get(i).map(String::as_str) == Some(format!("{} api ok", a.host.name).as_str()))
        .then_some(o)
}

/// Every appliance with all forwards up, where.
pub(crate) fn all_up(apps: &[Appliance], omas: &[Oma]) -> Vec<Option<usize>> {
    (0..apps.len())
        .map(|i| forwards_on(i, apps, omas))
        .collect()
}
