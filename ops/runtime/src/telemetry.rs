//! Logging and tracing setup shared by the binaries: logs human-readable by default, JSON on
//! request; spans exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! `RUST_LOG` overrides the default filter, as everywhere in the tracing ecosystem; the
//! standard `OTEL_*` variables (endpoint, headers, timeout, batch delay) configure the export,
//! as every OpenTelemetry SDK reads them. Export is OTLP over HTTP/protobuf (port 4318 of a
//! collector); nothing is exported when the variable is unset.

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
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only for a terminal: a log file or the journal gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
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
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
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
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    )
}
