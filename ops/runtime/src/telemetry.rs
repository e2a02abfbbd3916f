//! Logging and tracing setup shared by the binaries: logs human-readable by default, JSON on
//! request; spans exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! `RUST_LOG` overrides the default filter, as everywhere in the tracing ecosystem; the
//! standard `OTEL_*` variables (endpoint, headers, timeout, batch delay) configure the export,
//! as every OpenTelemetry SDK reads them. Export is OTLP over HTTP/protobuf (port 4318 of a
//! collector), plain or `https://`; nothing is exported when the variable is unset.
//!
//! Over `https://` the collector's certificate is checked against the web PKI roots, or only
//! against the CA certificates of `OTEL_EXPORTER_OTLP_CERTIFICATE` (PEM) when set; a client
//! certificate for a collector that asks for one comes from `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`
//! and `OTEL_EXPORTER_OTLP_CLIENT_KEY` (refused when group or others can read it). Each has its
//! `OTEL_EXPORTER_OTLP_TRACES_*` form, which wins. `OTEL_EXPORTER_OTLP_HEADERS`
//! (`key=value,…`, an API key for a hosted collector) is sent with every export and never
//! logged. A setting that cannot be used is reported once and export stays off.

use std::sync::{Arc, Mutex};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Keeps the span exporter alive; dropping it flushes what is buffered. Drop it outside the
/// async runtime (at the end of `main`): the exporter's HTTP client blocks.
#[must_use = "dropping the guard stops the span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("OTLP span export: flushing at exit: {e}");
        }
    }
}

/// Installs the global subscriber (stderr, and OTLP when configured) for `service`. Call once,
/// before the runtime starts.
pub fn init(format: LogFormat, default_filter: &str, service: &'static str) -> Telemetry {
    // Colours only for a terminal: a log file or the journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    init_with(
        format,
        default_filter,
        service,
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
        ansi,
    )
}

/// Like [`init`], the log lines written to `file` (plain text) instead of stderr: a program
/// whose screen is for something else (the demo's story) keeps its log apart.
pub fn init_to_file(file: std::fs::File, default_filter: &str, service: &'static str) -> Telemetry {
    init_with(
        LogFormat::Human,
        default_filter,
        service,
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(Arc::new(file)),
        false,
    )
}

fn init_with(
    format: LogFormat,
    default_filter: &str,
    service: &'static str,
    writer: tracing_subscriber::fmt::writer::BoxMakeWriter,
    ansi: bool,
) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let provider = otlp_provider(service);
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .boxed()
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    if provider.is_some() {
        tracing::info!(
            endpoint = %std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default(),
            "exporting spans over OTLP/HTTP"
        );
    }
    Telemetry { provider }
}

/// The OTLP tracer provider when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific
/// variable) is set; a bad setting is reported and export stays off.
fn otlp_provider(service: &'static str) -> Option<SdkTracerProvider> {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return None;
    }
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    // reqwest's blocking client runs its own runtime: build it off any async context.
    let client = match std::thread::spawn(otlp_client).join() {
        Ok(Ok(c)) => ExportClient {
            inner: c,
            last_error: Arc::default(),
        },
        Ok(Err(e)) => {
            eprintln!("OTLP span export disabled: {e}");
            return None;
        }
        Err(_) => {
            eprintln!("OTLP span export disabled: building its HTTP client failed");
            return None;
        }
    };
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_http_client(client.clone())
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("OTLP span export disabled: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(Reported::new(exporter, client.last_error))
            .with_resource(resource)
            .build(),
    )
}

/// The export's HTTP client, keeping the last transport error with its causes (the OTLP
/// exporter reports only "network error").
#[derive(Debug, Clone)]
struct ExportClient {
    inner: reqwest::blocking::Client,
    last_error: Arc<Mutex<Option<String>>>,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let result = self.inner.send_bytes(request).await;
        if let Err(e) = &result {
            let mut why = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                why.push_str(": ");
                why.push_str(&s.to_string());
                source = s.source();
            }
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        }
        result
    }
}

/// A span exporter whose failures are logged (the SDK's own reports are compiled out): the
/// first failure, then at most one a minute with how many failed meanwhile, and the first
/// success after failures.
#[derive(Debug)]
struct Reported<E> {
    inner: E,
    failures: Mutex<(u64, Option<std::time::Instant>)>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl<E> Reported<E> {
    fn new(inner: E, last_error: Arc<Mutex<Option<String>>>) -> Reported<E> {
        Reported {
            inner,
            failures: Mutex::new((0, None)),
            last_error,
        }
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Reported<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let result = self.inner.export(batch).await;
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(()) => {
                if f.0 > 0 {
                    tracing::info!("OTLP span export works again after {} failures", f.0);
                }
                *f = (0, None);
            }
            Err(e) => {
                f.0 += 1;
                let due =
                    f.1.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60));
                if due {
                    let cause = self
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take()
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default();
                    tracing::warn!("OTLP span export failed ({} in a row): {e}{cause}", f.0);
                    f.1 = Some(std::time::Instant::now());
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Why the span export's HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// A certificate or key file of the `OTEL_EXPORTER_OTLP_*` variables.
    #[error("{var}: {source}")]
    Pem {
        /// The variable that named the file.
        var: String,
        /// What was wrong with it.
        source: crate::pem::PemError,
    },
    /// The client key file is readable by group or others.
    #[error("{var}: {source}")]
    LooseKey {
        /// The variable that named the file.
        var: String,
        /// The permission check's verdict.
        source: crate::secret::SecretFileError,
    },
    /// Only one of the client certificate and key is set.
    #[error("{0} is set without {1}")]
    HalfClientIdentity(String, String),
    /// A timeout that is not a whole number of milliseconds.
    #[error("{var}: {value:?} is not a number of milliseconds")]
    Timeout {
        /// The variable.
        var: String,
        /// Its value.
        value: String,
    },
    /// rustls or reqwest refused the configuration.
    #[error("TLS: {0}")]
    Tls(String),
}

/// The value of `OTEL_EXPORTER_OTLP_TRACES_<name>`, else of `OTEL_EXPORTER_OTLP_<name>`, with
/// the variable it came from; empty counts as unset.
fn otlp_var(name: &str) -> Option<(String, String)> {
    [
        format!("OTEL_EXPORTER_OTLP_TRACES_{name}"),
        format!("OTEL_EXPORTER_OTLP_{name}"),
    ]
    .into_iter()
    .find_map(|var| {
        let v = std::env::var(&var).ok().filter(|v| !v.is_empty())?;
        Some((var, v))
    })
}

/// The span export's HTTP client: TLS over ring with the roots and client identity of the
/// `OTEL_EXPORTER_OTLP_*` variables, and their timeout (10 s by default, as the SDK's).
fn otlp_client() -> Result<reqwest::blocking::Client, OtlpError> {
    use crate::pem;
    let pem_err = |var: &str| {
        let var = var.to_string();
        move |source| OtlpError::Pem { var, source }
    };
    let roots = match otlp_var("CERTIFICATE") {
        Some((var, path)) => pem::roots(std::path::Path::new(&path)).map_err(pem_err(&var))?,
        None => {
            let mut r = rustls::RootCertStore::empty();
            r.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            r
        }
    };
    let tls = rustls::ClientConfig::builder_with_provider(pem::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| OtlpError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let tls = match (otlp_var("CLIENT_CERTIFICATE"), otlp_var("CLIENT_KEY")) {
        (None, None) => tls.with_no_client_auth(),
        (Some((cert_var, cert)), Some((key_var, key))) => {
            let key = std::path::Path::new(&key);
            crate::secret::check_permissions(key).map_err(|source| OtlpError::LooseKey {
                var: key_var.clone(),
                source,
            })?;
            let chain = pem::certs(std::path::Path::new(&cert)).map_err(pem_err(&cert_var))?;
            let key = pem::key(key).map_err(pem_err(&key_var))?;
            tls.with_client_auth_cert(chain, key)
                .map_err(|e| OtlpError::Tls(e.to_string()))?
        }
        (Some((set, _)), None) => {
            return Err(OtlpError::HalfClientIdentity(
                set,
                "OTEL_EXPORTER_OTLP_CLIENT_KEY".into(),
            ));
        }
        (None, Some((set, _))) => {
            return Err(OtlpError::HalfClientIdentity(
                set,
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE".into(),
            ));
        }
    };
    let timeout = match otlp_var("TIMEOUT") {
        None => std::time::Duration::from_secs(10),
        Some((var, value)) => match value.trim().parse::<u64>() {
            Ok(ms) => std::time::Duration::from_millis(ms),
            Err(_) => return Err(OtlpError::Timeout { var, value }),
        },
    };
    reqwest::blocking::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .build()
        .map_err(|e| OtlpError::Tls(e.to_string()))
}
