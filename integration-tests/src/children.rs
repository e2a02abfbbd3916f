//! Processes a test starts end with the test process.
//!
//! Every helper that starts a daemon (sshd, etcd, a coordinator or agent process, ChromeDriver,
//! a service in a test host) ends it when its owner is dropped, at the end of the test or
//! while a panic unwinds. This is the net under that: a command made with [`owned`] runs its
//! program under `setpriv --pdeathsig KILL` (util-linux: it sets the parent-death signal and
//! execs the program in the same process), and [`SpawnOwned::spawn_owned`] forks it from one
//! thread that lives as long as the test process. So when the test process ends in any way —
//! the harness exiting with a task still holding a daemon, a panic that aborts, a kill -9 —
//! the kernel kills what it started. (The signal follows the thread that forked, hence the one
//! long-lived thread: a child forked from a test's own thread would be killed when that
//! thread ended, mid-test for a daemon another test's runtime holds.) `ip netns exec` and
//! `sshd -D` exec in place, so the signal stays with the daemon.

use std::ffi::OsStr;
use std::io;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc;

/// util-linux's `setpriv`.
pub const SETPRIV: &str = "/usr/bin/setpriv";

type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// The thread every owned process is forked from; it ends only with the process.
fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("test-children".into())
            .spawn(move || {
                for (mut command, back) in rx {
                    let _ = back.send(command.spawn());
                }
            })
            .expect("the thread that starts test processes");
        tx
    })
}

/// A command running `program` that, started with [`SpawnOwned::spawn_owned`], is killed
/// (SIGKILL) when the test process ends.
pub fn owned(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(SETPRIV);
    c.args(["--pdeathsig", "KILL", "--"]).arg(program);
    c
}

/// Starting a process made with [`owned`].
pub trait SpawnOwned {
    /// Like `spawn`, from the thread that lives as long as the test process, returning once
    /// the program runs with the signal set. The command is used up: build a new one to start the program again. A command not made with [`owned`]
    /// is refused (it would outlive the test process).
    fn spawn_owned(&mut self) -> io::Result<Child>;
}

impl SpawnOwned for Command {
    fn spawn_owned(&mut self) -> io::Result<Child> {
        let death_signal = self.get_program() == OsStr::new(SETPRIV)
            && self
                .get_args()
                .take(2)
                .eq(["--pdeathsig", "KILL"].map(OsStr::new));
        if !death_signal {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{:?}: not made with children::owned, it would outlive the test process",
                    self.get_program()
                ),
            ));
        }
        let command = std::mem::replace(self, Command::new("/nonexistent/used-up-command"));
        let gone = || io::Error::other("the thread that starts test processes is gone");
        let (tx, rx) = mpsc::channel();
        spawner().send((command, tx)).map_err(|_| gone())?;
        let child = rx.recv().map_err(|_| gone())??;
        // setpriv sets the signal after the fork, then execs the program: until it has, a test
        // process ending would leave it behind. A moment, once per daemon.
        let comm = format!("/proc/{}/comm", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_to_string(&comm).is_ok_and(|c| c.trim_end() == "setpriv")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(child)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(") ")
                .next()
                .is_some_and(|rest| !rest.starts_with('Z'))
        })
    }

    const HELPER: &str = "TUNNELFLEET_CHILDREN_HELPER";

    /// Not a test of its own (ignored in every run): the process
    /// [`a_child_started_owned_dies_with_the_test_process`] starts (this test binary, run for
    /// this one function with `--ignored` and `HELPER` set). It starts a `sleep` owned, prints
    /// its pid and exits without dropping it, as a harness exiting with a task still holding a
    /// daemon does.
    #[test]
    #[ignore = "a helper process of a_child_started_owned_dies_with_the_test_process"]
    fn helper_exits_holding_an_owned_child() {
        assert!(std::env::var_os(HELPER).is_some(), "run by its test only");
        let child = owned("sleep").arg("600").spawn_owned().unwrap();
        println!("owned pid {}", child.id());
        std::process::exit(0);
    }

    #[test]
    fn a_child_started_owned_dies_with_the_test_process() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "children::tests::helper_exits_holding_an_owned_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let pid: u32 = stdout
            .lines()
            .find_map(|l| l.split("owned pid ").nth(1))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("the helper printed no pid: {stdout}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let survived = alive(pid);
        if survived {
            crate::faults::signal(pid, libc::SIGKILL);
        }
        assert!(
            !survived,
            "the owned child outlived the process that started it"
        );
    }

    #[test]
    fn a_command_not_made_owned_is_refused() {
        let e = Command::new("sleep").arg("600").spawn_owned().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("sleep"), "{e}");
    }
}
