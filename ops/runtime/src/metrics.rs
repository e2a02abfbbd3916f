//! The Prometheus registry behind each daemon's `/metrics`, fed by an OpenTelemetry meter
//! provider and rendered as the text format. The agent's and the coordinator's instruments
//! differ; this part is the same for both.

use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;

/// The exporter could not be built or the registry not encoded.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct ExportError(String);

/// A Prometheus registry fed by an OpenTelemetry meter provider, rendered as the text format:
/// what the agent's and the coordinator's `/metrics` share. Each owner has its own registry, so
/// several agents or coordinators can run in one process (tests).
pub struct Exporter {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

impl Exporter {
    /// A fresh registry and the provider that feeds it.
    pub fn new() -> Result<Exporter, ExportError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .build()
            .map_err(|e| ExportError(e.to_string()))?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        Ok(Exporter { registry, provider })
    }

    /// A meter whose instruments land in this registry.
    pub fn meter(&self, scope: &'static str) -> Meter {
        self.provider.meter(scope)
    }

    /// The text exposition; observable instruments' callbacks run now.
    pub fn render(&self) -> Result<String, ExportError> {
        use prometheus::Encoder;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(|e| ExportError(e.to_string()))?;
        String::from_utf8(out).map_err(|e| ExportError(e.to_string()))
    }
}
