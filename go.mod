module github.com/bulkfhir/bulkexport

go 1.23.0

require (
	github.com/stretchr/testify v1.12.1
	go.opentelemetry.io/otel v1.38.0
	go.opentelemetry.io/otel/metric v1.38.0
	go.opentelemetry.io/otel/trace v1.38.0
	golang.org/x/sync v0.16.0
)

require go.yaml.in/yaml/v3 v3.0.5 // indirect
