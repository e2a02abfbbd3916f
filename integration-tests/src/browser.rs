//! A real headless Chromium, driven over WebDriver (Debian's `chromium` and `chromium-driver`,
//! through fantoccini), for tests of the fleet page.

use crate::children::SpawnOwned;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's ChromeDriver.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A headless Chromium in a throwaway profile; the driver and the browser are killed on drop.
pub struct Browser {
    /// The WebDriver session.
    pub client: fantoccini::Client,
    driver: std::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Whether Chromium and ChromeDriver are here; under CI their absence is a failure.
    pub fn available(test: &str) -> bool {
        if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
            return true;
        }
        if std::env::var_os("CI").is_some() {
            panic!(
                "{test}: {CHROMIUM} or {CHROMEDRIVER} is missing and CI is set; install chromium chromium-driver"
            );
        }
        crate::skip::skipped(
            test,
            &format!(
                "{CHROMIUM} or {CHROMEDRIVER} not found (apt-get install chromium chromium-driver)"
            ),
        );
        false
    }

    /// Starts ChromeDriver on a free port and a headless Chromium session through it.
    pub async fn start() -> Browser {
        let port = crate::free_port();
        let profile = tempfile::tempdir().expect("profile dir");
        let driver = crate::children::owned(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own process group: the browser it starts is killed with it.
            .process_group(0)
            .spawn_owned()
            .expect("start chromedriver");
        let caps: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(serde_json::json!({
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless=new",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-dev-shm-usage",
                        "--no-first-run",
                        "--window-size=1400,900",
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
            }))
            .expect("capabilities");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            let mut b = fantoccini::ClientBuilder::new(
                hyper_util::client::legacy::connect::HttpConnector::new(),
            );
            b.capabilities(caps.clone());
            match b.connect(&url).await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("chromedriver on {url}: {e}"),
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// Polls until the element at `css` has text containing `want`; returns that text.
    pub async fn wait_text(&self, secs: u64, css: &str, want: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut last = String::new();
        loop {
            if let Ok(e) = self.client.find(fantoccini::Locator::Css(css)).await
                && let Ok(t) = e.text().await
            {
                if t.contains(want) {
                    return t;
                }
                last = t;
            }
            if tokio::time::Instant::now() >= deadline {
                let url = self.client.current_url().await.map(|u| u.to_string());
                let page = self.client.source().await.unwrap_or_default();
                panic!(
                    "timed out after {secs}s waiting for {css:?} to show {want:?}; it shows {last:?}; at {url:?}: {}",
                    page.chars().take(3000).collect::<String>()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Types `token` into the sign-in form and submits it.
    pub async fn submit_token(&self, token: &str) {
        let form = self
            .client
            .find(fantoccini::Locator::Css("#token"))
            .await
            .expect("the sign-in form's token field");
        form.send_keys(token).await.expect("typing the token");
        self.client
            .find(fantoccini::Locator::Css("#signin"))
            .await
            .expect("the sign-in button")
            .click()
            .await
            .expect("signing in");
    }

    /// Opens the fleet page at `web` and signs in with `token`.
    pub async fn sign_in(&self, web: std::net::SocketAddr, token: &str) {
        self.client
            .goto(&format!("http://{web}/"))
            .await
            .expect("opening the fleet page");
        self.submit_token(token).await;
    }

    /// Ends the session; the processes go with the drop.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver leads its process group: the browser it started goes with it.
        crate::faults::signal_group(self.driver.id(), libc::SIGKILL);
        let _ = self.driver.wait();
    }
}
