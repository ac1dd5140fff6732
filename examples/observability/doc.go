// Package observability holds the tests and benchmarks of the library's
// metrics and spans, read through the OpenTelemetry SDK (a ManualReader
// and an in-memory span exporter). They live in the examples module so
// that the SDK never enters the library's own go.mod; the instruments are
// listed in docs/observability.md.
package observability
